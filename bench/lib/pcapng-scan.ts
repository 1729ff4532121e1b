/**
 * Reads back what a capture file says, fast and without a dissector: packets (EPBs), comments,
 * epb_dropcount and the Interface Statistics Block's isb_ifrecv / isb_ifdrop. Little-endian
 * sections (what meshcap and text2pcap write on x86). Reads in chunks (record-walk.ts), so multi-GB
 * files cost a sequential read and a walk over block headers.
 */
import fs from 'node:fs';
import { walkRecords } from './record-walk.js';

export interface PcapngScan {
  blocks: number;
  packets: number;
  /** Sum of captured frame lengths. */
  frameBytes: number;
  comments: number;
  /** Comments saying meshcap dropped packets (output buffers full). */
  dropComments: number;
  /** Sum of epb_dropcount. */
  dropCount: number;
  /** The last ISB's isb_ifrecv / isb_ifdrop, null when the file has none (still being written). */
  isbRecv: number | null;
  isbDrop: number | null;
  /** A few comment texts, for the report. */
  sampleComments: string[];
  /** Bytes at the end that are not a whole block (a file still being written). */
  trailing: number;
}

const SHB = 0x0a0d0d0a;
const EPB = 6;
const ISB = 5;
const pad4 = (n: number) => (n + 3) & ~3;

function u64(b: Buffer, o: number): number {
  return b.readUInt32LE(o) + b.readUInt32LE(o + 4) * 2 ** 32;
}

/** Calls `each(code, valueOffset, valueLength)` for the options in buf[o, end), up to opt_endofopt. */
function walkOptions(buf: Buffer, o: number, end: number, each: (code: number, at: number, len: number) => void): void {
  while (o + 4 <= end) {
    const code = buf.readUInt16LE(o);
    const olen = buf.readUInt16LE(o + 2);
    if (code === 0) break;
    each(code, o + 4, olen);
    o += 4 + pad4(olen);
  }
}

/** isb_ifrecv (4) and isb_ifdrop (5) of the ISB at buf[pos, pos + len). */
function isbCounts(buf: Buffer, pos: number, len: number): { recv: number | null; drop: number | null } {
  const c: { recv: number | null; drop: number | null } = { recv: null, drop: null };
  walkOptions(buf, pos + 20, pos + len - 4, (code, at) => {
    if (code === 4) c.recv = u64(buf, at);
    if (code === 5) c.drop = u64(buf, at);
  });
  return c;
}

export function scanPcapng(file: string, opts: { sampleComments?: number } = {}): PcapngScan {
  const r: PcapngScan = { blocks: 0, packets: 0, frameBytes: 0, comments: 0, dropComments: 0, dropCount: 0, isbRecv: null, isbDrop: null, sampleComments: [], trailing: 0 };
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    r.trailing = walkRecords(fd, size, {
      start: 0,
      headBytes: 12,
      length(buf, pos, offset) {
        const len = buf.readUInt32LE(pos + 4);
        if (len < 12 || len % 4 !== 0) throw new Error(`${file}: bad block length ${len} at offset ${offset}`);
        return len;
      },
      visit(buf, pos, len) {
        const type = buf.readUInt32LE(pos);
        r.blocks++;
        if (type === EPB) {
          r.packets++;
          const cap = buf.readUInt32LE(pos + 20);
          r.frameBytes += cap;
          walkOptions(buf, pos + 28 + pad4(cap), pos + len - 4, (code, at, olen) => {
            if (code === 1) {
              r.comments++;
              const text = buf.toString('utf8', at, at + olen);
              if (text.includes('meshcap dropped')) r.dropComments++;
              if (r.sampleComments.length < (opts.sampleComments ?? 0) && !r.sampleComments.includes(text)) r.sampleComments.push(text);
            } else if (code === 4) r.dropCount += u64(buf, at);
          });
        } else if (type === ISB) {
          const c = isbCounts(buf, pos, len);
          if (c.recv !== null) r.isbRecv = c.recv;
          if (c.drop !== null) r.isbDrop = c.drop;
        } else if (type === SHB && buf.readUInt32LE(pos + 8) !== 0x1a2b3c4d) {
          throw new Error(`${file}: big-endian pcapng is not supported here`);
        }
      },
    });
  } finally {
    fs.closeSync(fd);
  }
  return r;
}

/** Just the ISB at the end of a completed meshcap file (reads its last 256 bytes). */
export function readIsb(file: string): { recv: number; drop: number } | null {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const n = Math.min(size, 256);
    const b = Buffer.alloc(n);
    fs.readSync(fd, b, 0, n, size - n);
    const len = b.readUInt32LE(n - 4);
    if (len > n || len < 12) return null;
    const s = n - len;
    if (b.readUInt32LE(s) !== ISB) return null;
    const c = isbCounts(b, s, len);
    return { recv: c.recv ?? 0, drop: c.drop ?? 0 };
  } finally {
    fs.closeSync(fd);
  }
}
