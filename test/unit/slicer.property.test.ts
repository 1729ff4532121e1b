/**
 * Property tests of the slicer: for random payload sizes, MSS values, address families and output
 * formats, the frames written into blocks parse as valid Ethernet/IP/TCP (checksums recomputed
 * here byte by byte, independently of src/packet/checksum.ts), sequence numbers are continuous,
 * and reassembling the payloads yields the input exactly.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { pcapFramer, pcapNsFramer } from '../../src/format/pcap.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import type { RecordFramer } from '../../src/format/record-framer.js';
import { BlockPool, type Block } from '../../src/packet/block.js';
import { Slicer, type BlockOutput } from '../../src/packet/slicer.js';

function onesComplement(bytes: Uint8Array[]): number {
  let sum = 0;
  const all = Buffer.concat(bytes.map((b) => Buffer.from(b)));
  for (let i = 0; i < all.length; i += 2) sum += (all[i]! << 8) | (i + 1 < all.length ? all[i + 1]! : 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

interface Parsed {
  seq: number;
  ack: number;
  flags: number;
  payload: Buffer;
  capLen: number;
  origLen: number;
}

/** Parses one frame and checks its IPv4 header checksum and TCP checksum. */
function parseFrame(frame: Buffer, origLen: number): Parsed {
  const type = frame.readUInt16BE(12);
  let tcpStart: number;
  let pseudo: Uint8Array[];
  let tcpLen: number;
  if (type === 0x0800) {
    const ip = frame.subarray(14, 34);
    expect(onesComplement([ip])).toBe(0xffff); // header checksum valid
    const total = ip.readUInt16BE(2);
    expect(total).toBe(origLen - 14);
    tcpLen = total - 20;
    tcpStart = 34;
    pseudo = [ip.subarray(12, 20), Buffer.from([0, 6, tcpLen >>> 8, tcpLen & 0xff])];
  } else {
    expect(type).toBe(0x86dd);
    const ip = frame.subarray(14, 54);
    tcpLen = ip.readUInt16BE(4);
    expect(tcpLen).toBe(origLen - 54);
    tcpStart = 54;
    pseudo = [ip.subarray(8, 40), Buffer.from([0, 0, tcpLen >>> 8, tcpLen & 0xff, 0, 0, 0, 6])];
  }
  const tcp = frame.subarray(tcpStart, tcpStart + tcpLen);
  expect(onesComplement([...pseudo, tcp])).toBe(0xffff); // TCP checksum valid
  const dataOff = (tcp[12]! >>> 4) * 4;
  return { seq: tcp.readUInt32BE(4), ack: tcp.readUInt32BE(8), flags: tcp[13]!, payload: Buffer.from(tcp.subarray(dataOff)), capLen: frame.length, origLen };
}

/** Reads records back out of a block through the format's own framing (not the metadata). */
function recordsOf(block: Block, framer: RecordFramer): Array<{ frame: Buffer; origLen: number; dir: number }> {
  const out: Array<{ frame: Buffer; origLen: number; dir: number }> = [];
  const b = block.buf;
  let o = 0;
  while (o < block.used) {
    if (framer.name === 'pcapng') {
      expect(b.readUInt32LE(o)).toBe(6);
      const total = b.readUInt32LE(o + 4);
      expect(b.readUInt32LE(o + total - 4)).toBe(total);
      const cap = b.readUInt32LE(o + 20);
      const orig = b.readUInt32LE(o + 24);
      // options: find epb_flags
      let p = o + 28 + ((cap + 3) & ~3);
      let dir = -1;
      while (b.readUInt16LE(p) !== 0) {
        const code = b.readUInt16LE(p);
        const len = b.readUInt16LE(p + 2);
        if (code === 2) dir = b.readUInt32LE(p + 4) & 3;
        p += 4 + ((len + 3) & ~3);
      }
      out.push({ frame: Buffer.from(b.subarray(o + 28, o + 28 + cap)), origLen: orig, dir });
      o += total;
    } else {
      const cap = b.readUInt32LE(o + 8);
      const orig = b.readUInt32LE(o + 12);
      out.push({ frame: Buffer.from(b.subarray(o + 16, o + 16 + cap)), origLen: orig, dir: -1 });
      o += 16 + cap;
    }
  }
  expect(o).toBe(block.used);
  return out;
}

function endpoints(v6: boolean): { local: Endpoint; remote: Endpoint } {
  const ip = (last: number): Uint8Array => (v6 ? Uint8Array.from([0x20, 1, 0xd, 0xb8, ...new Array(11).fill(0), last]) : Uint8Array.from([10, 0, 0, last]));
  return { local: { v6, ip: ip(1), port: 8443, synthetic: false }, remote: { v6, ip: ip(2), port: 51000, synthetic: false } };
}

/** A BlockOutput that keeps every filled block for inspection. */
function collectingOutput(framer: RecordFramer, blockSize: number, useKernel = true): BlockOutput & { done: Block[] } {
  const pool = new BlockPool(64, blockSize, framer, useKernel);
  const out = {
    current: null as Block | null,
    done: [] as Block[],
    rotate(): Block | null {
      if (out.current && out.current.count > 0) out.done.push(out.current);
      out.current = pool.acquire();
      return out.current;
    },
  };
  return out;
}

describe('Slicer', () => {
  it('reassembles random payloads exactly, with valid checksums and continuous sequence numbers', () => {
    fc.assert(
      fc.property(
        fc.array(fc.integer({ min: 1, max: 70_000 }), { minLength: 1, maxLength: 6 }),
        fc.integer({ min: 88, max: 9000 }),
        fc.boolean(),
        fc.constantFrom(pcapngFramer, pcapFramer),
        fc.integer({ min: 0, max: 0xffffffff }),
        (sizes, mss, v6, framer, seed) => {
          const { local, remote } = endpoints(v6);
          const flow = new TcpFlow(1, 'node', seed, local, remote, mss, true, '');
          const out = collectingOutput(framer, 256 * 1024);
          const slicer = new Slicer(out, { snaplen: 262144 });
          const d = flow.writeDir;
          const isn = flow.seqOf(d);
          let x = seed >>> 0;
          const payloads = sizes.map((n) => {
            const p = Buffer.allocUnsafe(n);
            for (let i = 0; i < n; i++) p[i] = (x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 24;
            return p;
          });
          payloads.forEach((p, i) => slicer.data(flow, d, p, 1_700_000_000 + i, 999_999_999, i === 0 ? Buffer.from('first') : null, 0));
          out.rotate();
          const frames = out.done.flatMap((b) => recordsOf(b, framer));
          const parsed = frames.map((f) => parseFrame(f.frame, f.origLen));
          let expectSeq = isn;
          for (const p of parsed) {
            expect(p.seq).toBe(expectSeq);
            expect(p.payload.length).toBeLessThanOrEqual(mss);
            expect(p.ack).toBe(flow.seqOf(d ^ 1));
            expectSeq = (expectSeq + p.payload.length) >>> 0;
          }
          expect(Buffer.concat(parsed.map((p) => p.payload)).equals(Buffer.concat(payloads))).toBe(true);
          expect(flow.seqOf(d)).toBe(expectSeq);
          if (framer === pcapngFramer) expect(new Set(frames.map((f) => f.dir))).toEqual(new Set([flow.dirFlag(d)]));
        },
      ),
      { numRuns: 150 },
    );
  });

  it('the WebAssembly kernel and the JavaScript path write the same bytes and the same metadata', () => {
    // Four interleaved flows, IPv4 and IPv6 mixed; ids 1 and 257 (2 and 513) share a template
    // slot of the kernel's cache, so a slot is taken over and written again.
    const FLOW_IDS = [1, 257, 2, 513];
    fc.assert(
      fc.property(
        fc.array(
          fc.record({ size: fc.integer({ min: 1, max: 70_000 }), dir: fc.integer({ min: 0, max: 1 }), flow: fc.integer({ min: 0, max: 3 }), comment: fc.boolean(), drop: fc.integer({ min: 0, max: 2 }) }),
          { minLength: 1, maxLength: 8 },
        ),
        fc.integer({ min: 88, max: 9000 }),
        fc.boolean(),
        fc.constantFrom(pcapngFramer, pcapFramer, pcapNsFramer),
        fc.integer({ min: 0, max: 0xffffffff }),
        (events, mss, v6, framer, seed) => {
          const run = (useKernel: boolean): Block[] => {
            const flows = FLOW_IDS.map((id, i) => {
              const { local, remote } = endpoints(v6 !== (i % 2 === 1));
              return new TcpFlow(id, 'node', seed + i, local, { ...remote, port: remote.port + i }, mss, true, '');
            });
            const out = collectingOutput(framer, 128 * 1024, useKernel);
            const slicer = new Slicer(out, { snaplen: 262144 });
            let x = seed >>> 0;
            events.forEach((e, i) => {
              const p = Buffer.allocUnsafe(e.size);
              for (let j = 0; j < e.size; j++) p[j] = (x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 24;
              slicer.data(flows[e.flow]!, e.dir, p, 1_700_000_000 + i * 7919, (seed + i * 104_729) % 1_000_000_000, e.comment ? Buffer.from(`c${i}`) : null, e.drop);
            });
            out.rotate();
            return out.done;
          };
          const [k, js] = [run(true), run(false)];
          expect(k[0]!.kernel).not.toBeNull();
          expect(js[0]!.kernel).toBeNull();
          expect(k.length).toBe(js.length);
          k.forEach((a, i) => {
            const b = js[i]!;
            expect(a.used).toBe(b.used);
            expect(a.count).toBe(b.count);
            expect(a.buf.subarray(0, a.used).equals(b.buf.subarray(0, b.used))).toBe(true);
            for (const f of ['frameOff', 'capLen', 'origLen', 'tsSec', 'tsNsec', 'dir', 'flowId', 'dropCount'] as const) expect(Array.from(a[f].subarray(0, a.count))).toEqual(Array.from(b[f].subarray(0, b.count)));
            const comments = (x: Block) => Array.from({ length: x.count }, (_, i) => x.commentOf(i));
            expect(comments(a)).toEqual(comments(b));
          });
        },
      ),
      { numRuns: 150 },
    );
  });

  it('cuts frames at the snaplen, keeps their original length, and still computes full checksums', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 20_000 }), fc.integer({ min: 60, max: 1400 }), fc.boolean(), (size, snaplen, v6) => {
        const { local, remote } = endpoints(v6);
        const flow = new TcpFlow(1, 'node', 7, local, remote, 1400, true, '');
        const out = collectingOutput(pcapngFramer, 1 << 20);
        const slicer = new Slicer(out, { snaplen });
        const payload = Buffer.alloc(size, 0xab);
        slicer.data(flow, 0, payload, 1, 2, null, 0);
        out.rotate();
        const frames = out.done.flatMap((b) => recordsOf(b, pcapngFramer));
        expect(frames.reduce((n, f) => n + f.origLen - (v6 ? 74 : 54), 0)).toBe(size);
        for (const f of frames) expect(f.frame.length).toBe(Math.min(f.origLen, snaplen));
        // Rebuild full frames from the known payload to verify the checksum over what was cut.
        let pos = 0;
        for (const f of frames) {
          const hdr = v6 ? 74 : 54;
          const len = f.origLen - hdr;
          const full = Buffer.concat([f.frame.subarray(0, Math.min(hdr, f.frame.length)), payload.subarray(pos, pos + len)]);
          if (f.frame.length >= hdr) parseFrame(full, f.origLen);
          pos += len;
        }
      }),
      { numRuns: 100 },
    );
  });

  it('writes a SYN with MSS and window-scale options and no acknowledgement number', () => {
    const { local, remote } = endpoints(false);
    const flow = new TcpFlow(1, 'node', 1, local, remote, 1460, true, '');
    const out = collectingOutput(pcapngFramer, 65536);
    const slicer = new Slicer(out, { snaplen: 262144 });
    const isn = flow.seqOf(0);
    expect(slicer.control(flow, 0, 0x02, 1, 0, null, 0)).toBe(true);
    out.rotate();
    const [rec] = recordsOf(out.done[0]!, pcapngFramer);
    const p = parseFrame(rec!.frame, rec!.origLen);
    expect(p.flags).toBe(0x02);
    expect(p.ack).toBe(0);
    expect(p.seq).toBe(isn);
    expect(p.payload.length).toBe(0);
    expect(rec!.frame[34 + 12]! >>> 4).toBe(7); // data offset: 20-byte header + 8 bytes of options
    expect(rec!.frame.subarray(54, 62)).toEqual(Buffer.from([2, 4, 0x05, 0xb4, 1, 3, 3, 14]));
    expect(flow.seqOf(0)).toBe((isn + 1) >>> 0);
  });
});
