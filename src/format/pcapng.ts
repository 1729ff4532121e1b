/**
 * pcapng (draft-ietf-opsawg-pcapng): the default on-disk format.
 *
 * One section per file: SHB, one IDB (Ethernet, if_tsresol = 9: nanoseconds), then an EPB per
 * frame with epb_flags (direction), an opt_comment where meshcap has something to say (the first
 * packet of a flow names the Envoy node, tap and trace; gaps and truncations are explained), and
 * epb_dropcount after a gap. The ISB at the end of a file carries the totals.
 * Little-endian throughout (the byte-order magic tells readers).
 */
import { nsHiLo, type FileHeaderOptions, type RecordFramer } from './record-framer.js';

const SHB = 0x0a0d0d0a;
const IDB = 0x00000001;
const EPB = 0x00000006;
const ISB = 0x00000005;
const BYTE_ORDER_MAGIC = 0x1a2b3c4d;
export const LINKTYPE_ETHERNET = 1;

const OPT_ENDOFOPT = 0;
const OPT_COMMENT = 1;
const EPB_FLAGS = 2;
const EPB_DROPCOUNT = 4;

const EPB_HEAD = 28; // type, total length, interface id, ts high, ts low, caplen, origlen
const pad4 = (n: number): number => (n + 3) & ~3;

const scratchTs = new Uint32Array(2);

/**
 * The last timestamp split into 64-bit nanosecond words: every segment of one event shares its
 * timestamp, so the split (float division and modulo) runs once per event, not per packet.
 */
let lastSec = -1;
let lastNsec = -1;
let tsHi = 0;
let tsLo = 0;
function timestampWords(sec: number, nsec: number): void {
  if (sec === lastSec && nsec === lastNsec) return;
  nsHiLo(sec, nsec, scratchTs);
  lastSec = sec;
  lastNsec = nsec;
  tsHi = scratchTs[0]!;
  tsLo = scratchTs[1]!;
}

/** A word view of buf's memory when `off` lands on a word boundary, cached per buffer. */
let viewBuffer: ArrayBufferLike | null = null;
let view: Uint32Array | null = null;
function wordView(buf: Buffer, off: number): Uint32Array | null {
  if (((buf.byteOffset + off) & 3) !== 0) return null;
  if (buf.buffer !== viewBuffer) {
    viewBuffer = buf.buffer;
    view = new Uint32Array(buf.buffer, 0, buf.buffer.byteLength >>> 2);
  }
  return view;
}

/** The same record tail and header with byte writes, for buffers not aligned to words. */
function finishSlow(buf: Buffer, start: number, o: number, capLen: number, origLen: number, tsSec: number, tsNsec: number, dir: number, dropCount: number): number {
  buf.writeUInt32LE(EPB_FLAGS | (4 << 16), o);
  buf.writeUInt32LE(dir & 3, o + 4);
  o += 8;
  if (dropCount > 0) {
    buf.writeUInt32LE(EPB_DROPCOUNT | (8 << 16), o);
    buf.writeUInt32LE(dropCount, o + 4);
    buf.writeUInt32LE(0, o + 8);
    o += 12;
  }
  buf.writeUInt32LE(OPT_ENDOFOPT, o);
  o += 4;
  const total = o + 4 - start;
  buf.writeUInt32LE(total, o);
  timestampWords(tsSec, tsNsec);
  buf.writeUInt32LE(EPB, start);
  buf.writeUInt32LE(total, start + 4);
  buf.writeUInt32LE(0, start + 8);
  buf.writeUInt32LE(tsHi, start + 12);
  buf.writeUInt32LE(tsLo, start + 16);
  buf.writeUInt32LE(capLen, start + 20);
  buf.writeUInt32LE(origLen, start + 24);
  return o + 4;
}

export const pcapngFramer: RecordFramer = {
  name: 'pcapng',
  head: EPB_HEAD,
  // head + flags option + end of options + trailing length
  minOverhead: EPB_HEAD + 8 + 4 + 4,
  carriesAnnotations: true,
  kernelFormat: 0,

  timestampWords(tsSec, tsNsec, out) {
    timestampWords(tsSec, tsNsec);
    out[0] = tsHi;
    out[1] = tsLo;
  },

  recordSize(capLen, commentLen, hasDrop) {
    let size = EPB_HEAD + pad4(capLen) + 8 /* epb_flags */ + 4 /* endofopt */ + 4 /* total length */;
    if (commentLen > 0) size += 4 + pad4(commentLen);
    if (hasDrop) size += 12;
    return size;
  },

  finish(buf, frameOff, capLen, origLen, tsSec, tsNsec, dir, comment, dropCount) {
    const start = frameOff - EPB_HEAD;
    const u32 = wordView(buf, start);
    let o = frameOff + capLen;
    // Zero the padding explicitly: the block is reused.
    while (o & 3) buf[o++] = 0;
    if (comment !== null && comment.length > 0) {
      buf.writeUInt16LE(OPT_COMMENT, o);
      buf.writeUInt16LE(comment.length, o + 2);
      comment.copy(buf, o + 4);
      o += 4 + comment.length;
      while (o & 3) buf[o++] = 0;
    }
    if (u32 === null) return finishSlow(buf, start, o, capLen, origLen, tsSec, tsNsec, dir, dropCount);
    // Records are 4-aligned: whole words through the Uint32Array view (little-endian host).
    let w = (buf.byteOffset + o) >>> 2;
    u32[w++] = EPB_FLAGS | (4 << 16); // code 2, length 4
    u32[w++] = dir & 3;
    if (dropCount > 0) {
      u32[w++] = EPB_DROPCOUNT | (8 << 16);
      u32[w++] = dropCount;
      u32[w++] = 0;
    }
    u32[w++] = OPT_ENDOFOPT;
    const end = (w + 1) << 2;
    const total = end - (buf.byteOffset + start);
    u32[w] = total;
    timestampWords(tsSec, tsNsec);
    const h = (buf.byteOffset + start) >>> 2;
    u32[h] = EPB;
    u32[h + 1] = total;
    u32[h + 2] = 0; // interface 0
    u32[h + 3] = tsHi;
    u32[h + 4] = tsLo;
    u32[h + 5] = capLen;
    u32[h + 6] = origLen;
    return start + total;
  },

  fileHeader(opts: FileHeaderOptions) {
    return Buffer.concat([sectionHeader(opts.application ?? 'meshcap'), interfaceDescription(opts)]);
  },
};

/** Builds a block from its type and body (body must already be padded to 4). */
function block(type: number, body: Buffer): Buffer {
  const total = 12 + body.length;
  const b = Buffer.alloc(total);
  b.writeUInt32LE(type, 0);
  b.writeUInt32LE(total, 4);
  body.copy(b, 8);
  b.writeUInt32LE(total, total - 4);
  return b;
}

/** Encodes options (code, value) and the end-of-options marker. */
function options(opts: Array<[number, Buffer]>): Buffer {
  const parts: Buffer[] = [];
  for (const [code, value] of opts) {
    const h = Buffer.alloc(4);
    h.writeUInt16LE(code, 0);
    h.writeUInt16LE(value.length, 2);
    parts.push(h, value, Buffer.alloc(pad4(value.length) - value.length));
  }
  parts.push(Buffer.alloc(4));
  return Buffer.concat(parts);
}

function sectionHeader(application: string): Buffer {
  const fixed = Buffer.alloc(16);
  fixed.writeUInt32LE(BYTE_ORDER_MAGIC, 0);
  fixed.writeUInt16LE(1, 4); // major
  fixed.writeUInt16LE(0, 6); // minor
  fixed.writeBigInt64LE(-1n, 8); // section length unknown: the file is streamed
  return block(SHB, Buffer.concat([fixed, options([[4 /* shb_userappl */, Buffer.from(application)]])]));
}

function interfaceDescription(opts: FileHeaderOptions): Buffer {
  const fixed = Buffer.alloc(8);
  fixed.writeUInt16LE(LINKTYPE_ETHERNET, 0);
  fixed.writeUInt32LE(opts.snaplen, 4);
  const o: Array<[number, Buffer]> = [
    [2 /* if_name */, Buffer.from(opts.ifName ?? 'meshcap')],
    [3 /* if_description */, Buffer.from(opts.ifDescription ?? 'meshcap: plaintext from the Envoy TLS boundary (synthetic TCP/IP)')],
    [9 /* if_tsresol */, Buffer.from([9])],
  ];
  return block(IDB, Buffer.concat([fixed, options(o)]));
}

export interface InterfaceStatistics {
  startSec: number;
  startNsec: number;
  endSec: number;
  endNsec: number;
  /** Packets written to this file. */
  received: number;
  /** Packets meshcap knows were lost (gaps, truncation, drops) while this file was open. */
  dropped: number;
  /** opt_comment: why, when this block marks a loss in the middle of a file. */
  comment?: string;
}

/** ISB for interface 0: isb_starttime, isb_endtime, isb_ifrecv, isb_ifdrop. */
export function interfaceStatistics(s: InterfaceStatistics): Buffer {
  const ts = new Uint32Array(2);
  nsHiLo(s.endSec, s.endNsec, ts);
  const fixed = Buffer.alloc(12);
  fixed.writeUInt32LE(0, 0);
  fixed.writeUInt32LE(ts[0]!, 4);
  fixed.writeUInt32LE(ts[1]!, 8);
  const u64 = (n: number): Buffer => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(Math.max(0, Math.floor(n))));
    return b;
  };
  const time = (sec: number, nsec: number): Buffer => {
    const t = new Uint32Array(2);
    nsHiLo(sec, nsec, t);
    const b = Buffer.alloc(8);
    b.writeUInt32LE(t[0]!, 0);
    b.writeUInt32LE(t[1]!, 4);
    return b;
  };
  return block(
    ISB,
    Buffer.concat([
      fixed,
      options([
        [2 /* isb_starttime */, time(s.startSec, s.startNsec)],
        [3 /* isb_endtime */, time(s.endSec, s.endNsec)],
        [4 /* isb_ifrecv */, u64(s.received)],
        [5 /* isb_ifdrop */, u64(s.dropped)],
        ...(s.comment ? ([[1 /* opt_comment */, Buffer.from(s.comment)]] as Array<[number, Buffer]>) : []),
      ]),
    ]),
  );
}
