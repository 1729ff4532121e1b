/**
 * Minimal capture-file reader for tests: classic pcap (µs and ns magic, either byte order) and
 * pcapng (SHB / IDB / EPB / SPB, if_tsresol, either byte order), plus a TCP parser for
 * Ethernet / Linux SLL / Linux SLL2 / raw IP / BSD loopback frames carrying IPv4 or IPv6.
 *
 * Independent of meshcap's own writer on purpose: it is the yardstick the writer is measured with.
 */
import fs from 'node:fs';

export interface CapturedPacket {
  /** Capture timestamp, nanoseconds since the epoch. */
  tsNs: bigint;
  /** Captured bytes (caplen). */
  data: Buffer;
  /** Original length on the wire. */
  origLen: number;
  /** Link type of the interface this packet came from. */
  linkType: number;
  /** pcapng interface id (0 for classic pcap). */
  interfaceId: number;
}

export interface CaptureFile {
  format: 'pcap' | 'pcapng';
  /** Classic pcap: µs or ns magic. pcapng: resolution of interface 0. */
  tsPrecision: 'us' | 'ns' | 'other';
  bigEndian: boolean;
  /** Link type of the file (classic) or of interface 0 (pcapng). */
  linkType: number;
  snapLen: number;
  interfaces: Array<{ linkType: number; snapLen: number; tsUnitsPerSec: bigint; tsOffsetSec: bigint }>;
  packets: CapturedPacket[];
}

export const LINKTYPE_NULL = 0;
export const LINKTYPE_ETHERNET = 1;
export const LINKTYPE_RAW = 101;
export const LINKTYPE_LINUX_SLL = 113;
export const LINKTYPE_IPV4 = 228;
export const LINKTYPE_IPV6 = 229;
export const LINKTYPE_LINUX_SLL2 = 276;

export function readCaptureFile(file: string): CaptureFile {
  return parseCapture(fs.readFileSync(file));
}

export function parseCapture(buf: Buffer): CaptureFile {
  if (buf.length < 4) throw new Error('capture file too short');
  const magicLE = buf.readUInt32LE(0);
  if (magicLE === 0x0a0d0d0a) return parsePcapng(buf);
  return parseClassicPcap(buf);
}

function parseClassicPcap(buf: Buffer): CaptureFile {
  if (buf.length < 24) throw new Error('pcap: truncated global header');
  const m = buf.readUInt32LE(0);
  let bigEndian: boolean;
  let ns: boolean;
  if (m === 0xa1b2c3d4) [bigEndian, ns] = [false, false];
  else if (m === 0xa1b23c4d) [bigEndian, ns] = [false, true];
  else if (m === 0xd4c3b2a1) [bigEndian, ns] = [true, false];
  else if (m === 0x4d3cb2a1) [bigEndian, ns] = [true, true];
  else throw new Error(`pcap: unknown magic 0x${m.toString(16)}`);
  const u32 = (o: number) => (bigEndian ? buf.readUInt32BE(o) : buf.readUInt32LE(o));
  const snapLen = u32(16);
  // The link type's upper bits may hold FCS info (pcap spec); the low 16 bits are the type.
  const linkType = u32(20) & 0xffff;
  const packets: CapturedPacket[] = [];
  let off = 24;
  while (off + 16 <= buf.length) {
    const sec = BigInt(u32(off));
    const frac = BigInt(u32(off + 4));
    const inclLen = u32(off + 8);
    const origLen = u32(off + 12);
    if (off + 16 + inclLen > buf.length) throw new Error(`pcap: truncated record at offset ${off}`);
    packets.push({
      tsNs: sec * 1_000_000_000n + (ns ? frac : frac * 1000n),
      data: buf.subarray(off + 16, off + 16 + inclLen),
      origLen,
      linkType,
      interfaceId: 0,
    });
    off += 16 + inclLen;
  }
  if (off !== buf.length) throw new Error(`pcap: ${buf.length - off} trailing bytes`);
  return {
    format: 'pcap',
    tsPrecision: ns ? 'ns' : 'us',
    bigEndian,
    linkType,
    snapLen,
    interfaces: [{ linkType, snapLen, tsUnitsPerSec: ns ? 1_000_000_000n : 1_000_000n, tsOffsetSec: 0n }],
    packets,
  };
}

function parsePcapng(buf: Buffer): CaptureFile {
  let bigEndian = false;
  let interfaces: CaptureFile['interfaces'] = [];
  const packets: CapturedPacket[] = [];
  let first = true;
  let off = 0;
  let sawShb = false;
  while (off < buf.length) {
    if (off + 12 > buf.length) throw new Error(`pcapng: truncated block header at ${off}`);
    const typeLE = buf.readUInt32LE(off);
    if (typeLE === 0x0a0d0d0a) {
      // Section Header Block: byte-order magic decides the endianness of this section.
      const bom = buf.readUInt32LE(off + 8);
      if (bom === 0x1a2b3c4d) bigEndian = false;
      else if (bom === 0x4d3c2b1a) bigEndian = true;
      else throw new Error(`pcapng: bad byte-order magic at ${off}`);
      if (!first) interfaces = []; // a new section resets interface ids
      first = false;
      sawShb = true;
    } else if (!sawShb) {
      throw new Error('pcapng: first block is not a Section Header Block');
    }
    const u32 = (o: number) => (bigEndian ? buf.readUInt32BE(o) : buf.readUInt32LE(o));
    const u16 = (o: number) => (bigEndian ? buf.readUInt16BE(o) : buf.readUInt16LE(o));
    const type = u32(off);
    const len = u32(off + 4);
    if (len < 12 || len % 4 !== 0 || off + len > buf.length) throw new Error(`pcapng: bad block length ${len} at ${off}`);
    if (u32(off + len - 4) !== len) throw new Error(`pcapng: trailing block length mismatch at ${off}`);
    const body = off + 8;
    const bodyEnd = off + len - 4;
    switch (type) {
      case 0x0a0d0d0a:
        break;
      case 0x00000001: {
        // Interface Description Block
        const linkType = u16(body);
        const snapLen = u32(body + 4);
        let tsUnitsPerSec = 1_000_000n;
        let tsOffsetSec = 0n;
        for (const opt of iterOptions(buf, body + 8, bodyEnd, u16)) {
          if (opt.code === 9 && opt.value.length >= 1) {
            const r = opt.value[0]!;
            tsUnitsPerSec = r & 0x80 ? 2n ** BigInt(r & 0x7f) : 10n ** BigInt(r & 0x7f);
          } else if (opt.code === 14 && opt.value.length >= 8) {
            tsOffsetSec = bigEndian ? opt.value.readBigInt64BE(0) : opt.value.readBigInt64LE(0);
          }
        }
        interfaces.push({ linkType, snapLen, tsUnitsPerSec, tsOffsetSec });
        break;
      }
      case 0x00000006: {
        // Enhanced Packet Block
        const ifId = u32(body);
        const iface = interfaces[ifId];
        if (!iface) throw new Error(`pcapng: EPB references unknown interface ${ifId}`);
        const ts = (BigInt(u32(body + 4)) << 32n) | BigInt(u32(body + 8));
        const capLen = u32(body + 12);
        const origLen = u32(body + 16);
        if (body + 20 + capLen > bodyEnd) throw new Error(`pcapng: EPB data overruns block at ${off}`);
        packets.push({
          tsNs: toNs(ts, iface.tsUnitsPerSec, iface.tsOffsetSec),
          data: buf.subarray(body + 20, body + 20 + capLen),
          origLen,
          linkType: iface.linkType,
          interfaceId: ifId,
        });
        break;
      }
      case 0x00000003: {
        // Simple Packet Block: interface 0, no timestamp; captured length = min(orig, snaplen).
        const iface = interfaces[0];
        if (!iface) throw new Error('pcapng: SPB before any IDB');
        const origLen = u32(body);
        const capLen = iface.snapLen > 0 ? Math.min(origLen, iface.snapLen) : origLen;
        packets.push({
          tsNs: 0n,
          data: buf.subarray(body + 4, body + 4 + Math.min(capLen, bodyEnd - body - 4)),
          origLen,
          linkType: iface.linkType,
          interfaceId: 0,
        });
        break;
      }
      default:
        // NRB, ISB, DSB, custom blocks...: ignored.
        break;
    }
    off += len;
  }
  const if0 = interfaces[0];
  const res = if0?.tsUnitsPerSec;
  return {
    format: 'pcapng',
    tsPrecision: res === 1_000_000_000n ? 'ns' : res === 1_000_000n ? 'us' : 'other',
    bigEndian,
    linkType: if0?.linkType ?? -1,
    snapLen: if0?.snapLen ?? 0,
    interfaces,
    packets,
  };
}

function toNs(ts: bigint, unitsPerSec: bigint, offsetSec: bigint): bigint {
  const sec = ts / unitsPerSec;
  const rem = ts % unitsPerSec;
  return (sec + offsetSec) * 1_000_000_000n + (rem * 1_000_000_000n) / unitsPerSec;
}

function* iterOptions(
  buf: Buffer,
  start: number,
  end: number,
  u16: (o: number) => number,
): Generator<{ code: number; value: Buffer }> {
  let o = start;
  while (o + 4 <= end) {
    const code = u16(o);
    const len = u16(o + 2);
    if (code === 0) return;
    yield { code, value: buf.subarray(o + 4, Math.min(o + 4 + len, end)) };
    o += 4 + ((len + 3) & ~3);
  }
}

// ---------------------------------------------------------------------------------------------
// TCP/IP parsing

export interface TcpPacket {
  ipVersion: 4 | 6;
  src: string;
  dst: string;
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  /** Raw TCP flags byte (plus NS in bit 8). */
  flags: number;
  syn: boolean;
  ackFlag: boolean;
  fin: boolean;
  rst: boolean;
  psh: boolean;
  window: number;
  /** TCP options bytes. */
  options: Buffer;
  /** TCP payload (a view, trimmed to the IP length, excluding link-layer padding). */
  payload: Buffer;
  /** The IP header + TCP segment (a view), for checksum checks. */
  ip: Buffer;
}

export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;

/** Returns the IP datagram inside a link-layer frame, or null if it is not IPv4/IPv6. */
export function ipFromFrame(linkType: number, frame: Buffer): Buffer | null {
  let etherType: number;
  let off: number;
  switch (linkType) {
    case LINKTYPE_ETHERNET: {
      if (frame.length < 14) return null;
      etherType = frame.readUInt16BE(12);
      off = 14;
      while ((etherType === 0x8100 || etherType === 0x88a8) && frame.length >= off + 4) {
        etherType = frame.readUInt16BE(off + 2);
        off += 4;
      }
      break;
    }
    case LINKTYPE_LINUX_SLL:
      if (frame.length < 16) return null;
      etherType = frame.readUInt16BE(14);
      off = 16;
      break;
    case LINKTYPE_LINUX_SLL2:
      if (frame.length < 20) return null;
      etherType = frame.readUInt16BE(0);
      off = 20;
      break;
    case LINKTYPE_NULL: {
      if (frame.length < 4) return null;
      // Host byte order AF value: 2 = IPv4; 24/28/30 = IPv6 on the various BSDs.
      const af = frame.readUInt32LE(0) > 0xffff ? frame.readUInt32BE(0) : frame.readUInt32LE(0);
      etherType = af === 2 ? 0x0800 : [10, 24, 28, 30].includes(af) ? 0x86dd : -1;
      off = 4;
      break;
    }
    case LINKTYPE_RAW:
    case 12: // LINKTYPE_RAW on some systems (DLT_RAW)
    case LINKTYPE_IPV4:
    case LINKTYPE_IPV6: {
      if (frame.length < 1) return null;
      const v = frame[0]! >> 4;
      etherType = v === 4 ? 0x0800 : v === 6 ? 0x86dd : -1;
      off = 0;
      break;
    }
    default:
      throw new Error(`unsupported link type ${linkType}`);
  }
  if (etherType !== 0x0800 && etherType !== 0x86dd) return null;
  return frame.subarray(off);
}

/** Parses a TCP segment out of a captured frame; null for anything else (ARP, UDP, fragments…). */
export function parseTcp(linkType: number, frame: Buffer): TcpPacket | null {
  const ip = ipFromFrame(linkType, frame);
  if (!ip || ip.length < 20) return null;
  const version = ip[0]! >> 4;
  let src: string;
  let dst: string;
  let l4: Buffer;
  let ipDatagram: Buffer;
  if (version === 4) {
    const ihl = (ip[0]! & 0x0f) * 4;
    const totalLen = ip.readUInt16BE(2);
    if (ip[9] !== 6) return null;
    const fragField = ip.readUInt16BE(6);
    if ((fragField & 0x1fff) !== 0 || (fragField & 0x2000) !== 0) return null; // fragments
    // Total Length 0 = TSO: take what was captured.
    const end = totalLen === 0 ? ip.length : Math.min(totalLen, ip.length);
    ipDatagram = ip.subarray(0, end);
    src = ipv4ToString(ip, 12);
    dst = ipv4ToString(ip, 16);
    l4 = ip.subarray(ihl, end);
  } else if (version === 6) {
    if (ip.length < 40) return null;
    const plen = ip.readUInt16BE(4);
    let next = ip[6]!;
    const end = plen === 0 ? ip.length : Math.min(40 + plen, ip.length);
    ipDatagram = ip.subarray(0, end);
    let off = 40;
    // Skip extension headers: hop-by-hop 0, routing 43, destination options 60.
    while (next === 0 || next === 43 || next === 60) {
      if (off + 2 > end) return null;
      const hdrLen = (ip[off + 1]! + 1) * 8;
      next = ip[off]!;
      off += hdrLen;
    }
    if (next !== 6) return null;
    src = ipv6ToString(ip, 8);
    dst = ipv6ToString(ip, 24);
    l4 = ip.subarray(off, end);
  } else {
    return null;
  }
  if (l4.length < 20) return null;
  const dataOff = (l4[12]! >> 4) * 4;
  if (dataOff < 20 || dataOff > l4.length) return null;
  const flags = ((l4[12]! & 0x01) << 8) | l4[13]!;
  return {
    ipVersion: version,
    src,
    dst,
    srcPort: l4.readUInt16BE(0),
    dstPort: l4.readUInt16BE(2),
    seq: l4.readUInt32BE(4),
    ack: l4.readUInt32BE(8),
    flags,
    syn: (flags & TCP_SYN) !== 0,
    ackFlag: (flags & TCP_ACK) !== 0,
    fin: (flags & TCP_FIN) !== 0,
    rst: (flags & TCP_RST) !== 0,
    psh: (flags & TCP_PSH) !== 0,
    window: l4.readUInt16BE(14),
    options: l4.subarray(20, dataOff),
    payload: l4.subarray(dataOff),
    ip: ipDatagram,
  };
}

export function ipv4ToString(b: Buffer, off: number): string {
  return `${b[off]}.${b[off + 1]}.${b[off + 2]}.${b[off + 3]}`;
}

/** RFC 5952 canonical text form (lowercase, longest zero run compressed, ::ffff:a.b.c.d kept hex). */
export function ipv6ToString(b: Buffer, off: number): string {
  const words: number[] = [];
  for (let i = 0; i < 8; i++) words.push(b.readUInt16BE(off + i * 2));
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (words[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && words[j] === 0) j++;
    if (j - i > bestLen && j - i >= 2) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = words.map((w) => w.toString(16));
  if (bestStart < 0) return hex.join(':');
  const head = hex.slice(0, bestStart).join(':');
  const tail = hex.slice(bestStart + bestLen).join(':');
  return `${head}::${tail}`;
}

/** Reads a capture and returns its TCP segments with timestamps (non-TCP frames dropped). */
export function readTcpPackets(file: string): Array<TcpPacket & { tsNs: bigint; frame: number }> {
  const cap = readCaptureFile(file);
  const out: Array<TcpPacket & { tsNs: bigint; frame: number }> = [];
  cap.packets.forEach((p, i) => {
    const t = parseTcp(p.linkType, p.data);
    if (t) out.push({ ...t, tsNs: p.tsNs, frame: i + 1 });
  });
  return out;
}

/** One's-complement checksum helper (for asserting checksums independently of tshark). */
export function internetChecksum(parts: Buffer[]): number {
  let sum = 0;
  let odd: number | null = null;
  for (const p of parts) {
    let i = 0;
    if (odd !== null && p.length > 0) {
      sum += (odd << 8) | p[0]!;
      odd = null;
      i = 1;
    }
    for (; i + 1 < p.length; i += 2) sum += (p[i]! << 8) | p[i + 1]!;
    if (i < p.length) odd = p[i]!;
    if (sum > 0x7fffffff) sum = (sum & 0xffff) + (sum >>> 16);
  }
  if (odd !== null) sum += odd << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** True when an IPv4 header checksum verifies (always true for IPv6, which has none). */
export function ipv4HeaderChecksumOk(p: TcpPacket): boolean {
  if (p.ipVersion !== 4) return true;
  const ihl = (p.ip[0]! & 0x0f) * 4;
  return internetChecksum([p.ip.subarray(0, ihl)]) === 0;
}

/** True when the TCP checksum (pseudo-header + segment) verifies, for IPv4 and IPv6. */
export function tcpChecksumOk(p: TcpPacket): boolean {
  let segment: Buffer;
  let pseudo: Buffer;
  if (p.ipVersion === 4) {
    const ihl = (p.ip[0]! & 0x0f) * 4;
    segment = p.ip.subarray(ihl);
    pseudo = Buffer.alloc(12);
    p.ip.copy(pseudo, 0, 12, 20);
    pseudo[9] = 6;
    pseudo.writeUInt16BE(segment.length, 10);
  } else {
    // Assumes no extension headers (what meshcap and Linux loopback emit).
    segment = p.ip.subarray(40);
    pseudo = Buffer.alloc(40);
    p.ip.copy(pseudo, 0, 8, 40);
    pseudo.writeUInt32BE(segment.length, 32);
    pseudo[39] = 6;
  }
  return internetChecksum([pseudo, segment]) === 0;
}
