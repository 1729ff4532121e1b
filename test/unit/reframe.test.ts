import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { pcapFramer, pcapNsFramer } from '../../src/format/pcap.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import type { RecordFramer } from '../../src/format/record-framer.js';
import { reframeBlock, reframedSize, reframedSizeBound, type FirstRecordNote } from '../../src/format/reframe.js';
import { BlockPool, type Block } from '../../src/packet/block.js';
import { Slicer } from '../../src/packet/slicer.js';
import { parseCapture } from '../helpers/pcap-read.js';
import { tsharkFields } from '../helpers/tshark.js';

const ep = (last: number, port: number): Endpoint => ({ v6: false, ip: Uint8Array.from([10, 0, 0, last]), port, synthetic: false });

/** A block laid out for `framer`: a commented SYN, then 5000 bytes (4 segments) after 2 lost packets. */
function sampleBlock(framer: RecordFramer): Block {
  const pool = new BlockPool(1, 64 * 1024, framer);
  const out = { current: pool.acquire(), rotate: () => null };
  const slicer = new Slicer(out, { snaplen: 262144 });
  const flow = new TcpFlow(1, 'n', 1, ep(1, 443), ep(2, 40000), 1460, true, '');
  slicer.control(flow, 0, 0x02, 1_700_000_000, 123_456_789, Buffer.from('hello'), 0);
  slicer.data(flow, 1, Buffer.alloc(5000, 7), 1_700_000_001, 5, null, 2);
  return out.current!;
}

describe('reframeBlock', () => {
  for (const [from, to] of [
    [pcapngFramer, pcapFramer],
    [pcapFramer, pcapngFramer],
    [pcapngFramer, pcapNsFramer],
  ] as const) {
    it(`turns ${from.name} records into ${to.name} records with the same frames and times`, () => {
      const block = sampleBlock(from);
      const buf = Buffer.alloc(reframedSizeBound(block.size, from, to));
      const n = reframeBlock(block, to, buf);
      const file = parseCapture(Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf.subarray(0, n)]));
      expect(file.packets.length).toBe(block.count);
      file.packets.forEach((p, i) => {
        expect(p.data.equals(block.frame(i))).toBe(true);
        const ns = BigInt(block.tsSec[i]!) * 1_000_000_000n + BigInt(block.tsNsec[i]!);
        expect(p.tsNs).toBe(to === pcapFramer ? (ns / 1000n) * 1000n : ns);
      });
      // Only the selected frames, when a filter is given.
      const some = reframeBlock(block, to, buf, (i) => i % 2 === 0);
      expect(parseCapture(Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf.subarray(0, some)])).packets.length).toBe(Math.ceil(block.count / 2));
    });
  }

  it('sizes its output exactly, and adds a note to the first record it writes (pcapng) or nothing (pcap)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-reframe-'));
    const block = sampleBlock(pcapngFramer);
    const keep = (i: number): boolean => i % 2 === 1;
    const note = { text: Buffer.from('3 lost here'), drops: 3 };
    for (const to of [pcapngFramer, pcapFramer]) {
      for (const k of [undefined, keep]) {
        const { bytes, count } = reframedSize(block, to, k, note);
        const buf = Buffer.alloc(bytes);
        expect(reframeBlock(block, to, buf, k, note)).toBe(bytes);
        const file = parseCapture(Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf]));
        expect(file.packets.length).toBe(count);
        expect(count).toBe(k ? Math.floor(block.count / 2) : block.count);
        if (to === pcapngFramer) {
          // Wireshark's reading: the note on the first record written, and only there.
          const file = path.join(dir, `note-${k ? 'some' : 'all'}.pcapng`);
          fs.writeFileSync(file, Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf]));
          const rows = await tsharkFields(file, ['frame.number', 'frame.drop_count', 'frame.comment'], {});
          const own = block.commentOf(k ? 1 : 0)?.toString();
          expect(rows[0]!.slice(1)).toEqual([String(3 + block.dropCount[k ? 1 : 0]!), own ? `${own}; 3 lost here` : '3 lost here']);
          // The records after it keep their own annotations.
          const kept = [...Array(block.count).keys()].filter((i) => !k || k(i));
          expect(rows.slice(1).map((r) => [r[1], r[2]])).toEqual(kept.slice(1).map((i) => [block.dropCount[i] ? String(block.dropCount[i]) : '', block.commentOf(i)?.toString() ?? '']));
        }
        // One byte short is refused, not overrun.
        expect(() => reframeBlock(block, to, Buffer.alloc(bytes - 1), k, note)).toThrow(/too small/);
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('writes what a frame-by-frame copy writes, whatever the frames, filter, comments and note (property)', () => {
    const framers = [pcapngFramer, pcapFramer, pcapNsFramer];
    fc.assert(
      fc.property(
        fc.constantFrom(...framers),
        fc.constantFrom(...framers),
        fc.array(fc.record({ len: fc.integer({ min: 1, max: 9000 }), comment: fc.option(fc.string({ maxLength: 300 }), { freq: 3 }), drop: fc.integer({ min: 0, max: 2 }) }), { minLength: 1, maxLength: 30 }),
        fc.option(fc.array(fc.boolean(), { minLength: 200, maxLength: 200 })),
        fc.option(fc.record({ text: fc.string({ minLength: 1, maxLength: 80 }).map((t) => Buffer.from(t)), drops: fc.integer({ min: 1, max: 9 }) })),
        (from, to, events, mask, note) => {
          const pool = new BlockPool(1, 1024 * 1024, from);
          const out = { current: pool.acquire(), rotate: () => null };
          const slicer = new Slicer(out, { snaplen: 262144 });
          const flow = new TcpFlow(1, 'n', 1, ep(1, 443), ep(2, 40000), 1460, true, '');
          events.forEach((e, j) => slicer.data(flow, j & 1, Buffer.alloc(e.len, j), 1_700_000_000 + j, j, e.comment === null ? null : Buffer.from(e.comment), e.drop));
          const block = out.current!;
          const keep = mask ? (i: number): boolean => mask[i % mask.length]! : undefined;
          const { bytes } = reframedSize(block, to, keep, note);
          const got = Buffer.alloc(bytes, 0xee);
          const want = Buffer.alloc(bytes, 0xee);
          expect(reframeBlock(block, to, got, keep, note)).toBe(bytes);
          expect(frameByFrame(block, to, want, keep, note)).toBe(bytes);
          expect(got.equals(want)).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
  });
});

/** The plain way: each frame copied from the block on its own (a view per frame). */
function frameByFrame(block: Block, framer: RecordFramer, out: Buffer, keep?: (i: number) => boolean, note?: FirstRecordNote | null): number {
  let o = 0;
  let first = true;
  for (let i = 0; i < block.count; i++) {
    if (keep && !keep(i)) continue;
    let comment = framer.carriesAnnotations ? block.commentOf(i) : null;
    let drop = framer.carriesAnnotations ? block.dropCount[i]! : 0;
    if (first && note && framer.carriesAnnotations) {
      comment = comment ? Buffer.concat([comment, Buffer.from('; '), note.text]) : note.text;
      drop += note.drops;
    }
    first = false;
    const frameOff = o + framer.head;
    block.frame(i).copy(out, frameOff);
    o = framer.finish(out, frameOff, block.capLen[i]!, block.origLen[i]!, block.tsSec[i]!, block.tsNsec[i]!, block.dir[i]!, comment, drop);
  }
  return o;
}

