import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { pcapFramer, pcapNsFramer } from '../../src/format/pcap.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import type { RecordFramer } from '../../src/format/record-framer.js';
import { reframeBlock, reframedSize, reframedSizeBound } from '../../src/format/reframe.js';
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
});

