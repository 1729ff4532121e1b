/**
 * Reads back a classic pcap file (what `meshcap collect` writes for the default broker format):
 * records, captured bytes, and the TCP payload they carry (Ethernet → IPv4/IPv6 → TCP headers
 * parsed per frame, so the figure is exact, not inferred). Little-endian files (µs or ns magic),
 * read in chunks (record-walk.ts). A file still being written may end in part of a record: `trailing`.
 */
import fs from 'node:fs';
import { walkRecords } from './record-walk.js';

export interface PcapScan {
  format: 'pcap' | 'pcap-ns';
  packets: number;
  /** Sum of captured frame lengths (record headers excluded). */
  frameBytes: number;
  /** TCP payload bytes of every frame (0 for SYN, ACK, FIN without data). */
  payload: number;
  /** Frames that are not Ethernet + IPv4/IPv6 + TCP (should be 0 for meshcap). */
  other: number;
  /** Frames cut by the snap length (their payload is counted as captured). */
  truncated: number;
  trailing: number;
}

const REC = 16;

function tcpPayload(b: Buffer, off: number, cap: number): number {
  if (cap < 14) return -1;
  const type = b.readUInt16BE(off + 12);
  if (type === 0x0800) {
    if (cap < 34) return -1;
    const ihl = (b[off + 14]! & 0x0f) * 4;
    if (b[off + 23] !== 6 || cap < 14 + ihl + 20) return -1;
    const total = b.readUInt16BE(off + 16);
    const doff = (b[off + 14 + ihl + 12]! >> 4) * 4;
    return total - ihl - doff;
  }
  if (type === 0x86dd) {
    if (cap < 54 + 20 || b[off + 20] !== 6) return -1;
    const plen = b.readUInt16BE(off + 18);
    const doff = (b[off + 54 + 12]! >> 4) * 4;
    return plen - doff;
  }
  return -1;
}

export function scanPcap(file: string): PcapScan {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(24);
    if (fs.readSync(fd, head, 0, 24, 0) < 24) throw new Error(`${file}: shorter than a pcap header`);
    const magic = head.readUInt32LE(0);
    if (magic !== 0xa1b2c3d4 && magic !== 0xa1b23c4d) throw new Error(`${file}: not a little-endian pcap file (magic 0x${magic.toString(16)})`);
    const r: PcapScan = { format: magic === 0xa1b2c3d4 ? 'pcap' : 'pcap-ns', packets: 0, frameBytes: 0, payload: 0, other: 0, truncated: 0, trailing: 0 };
    r.trailing = walkRecords(fd, size, {
      start: 24,
      headBytes: REC,
      length(buf, pos, offset) {
        const cap = buf.readUInt32LE(pos + 8);
        if (cap > 1 << 20) throw new Error(`${file}: record of ${cap} bytes at offset ${offset}`);
        return REC + cap;
      },
      visit(buf, pos, len) {
        const cap = len - REC;
        r.packets++;
        r.frameBytes += cap;
        if (cap < buf.readUInt32LE(pos + 12)) r.truncated++;
        const p = tcpPayload(buf, pos + REC, cap);
        if (p < 0) r.other++;
        else r.payload += p;
      },
    });
    return r;
  } finally {
    fs.closeSync(fd);
  }
}

/** Sums scans of several files. */
export function scanPcaps(files: string[]): PcapScan & { files: number } {
  const t = { format: 'pcap' as PcapScan['format'], packets: 0, frameBytes: 0, payload: 0, other: 0, truncated: 0, trailing: 0, files: files.length };
  for (const f of files) {
    const s = scanPcap(f);
    t.format = s.format;
    t.packets += s.packets;
    t.frameBytes += s.frameBytes;
    t.payload += s.payload;
    t.other += s.other;
    t.truncated += s.truncated;
    t.trailing += s.trailing;
  }
  return t;
}
