/**
 * The hot loop: one tap event in, Ethernet + IP + TCP frames out, written straight into the
 * current Block with room for the output format's record framing around each frame.
 *
 * For an event longer than one MSS the payload is copied into the block once, at the position of
 * the first segment, and the later segments are then moved apart (last first) to open gaps for
 * their headers. Buffer#copy with offsets would allocate a view per segment; this path allocates
 * nothing per packet. Where WebAssembly SIMD is available (always, on Node 20) the packet kernel
 * (kernel.wat) does the moving, checksums, headers and framing of a whole event in one call, summing
 * each piece as it moves it; the JavaScript path below does the same job for the annotated first
 * segment of a flow, and everywhere without the kernel (MESHCAP_NO_WASM=1).
 */
import { Direction, type Block } from './block.js';
import { TEMPLATE_SLOT, templateSlot } from './wasm-kernel.js';
import { copyBytes } from './copy-bytes.js';
import { checksumInto, sumBytesLE, writeChecksumLE } from './checksum.js';
import { ETH_LEN, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, TCP_WINDOW_SCALE, W_IPID, W_PSEUDO, W_SEQ, headerLength, tcpOffset, writeTemplate } from './frame-template.js';

/** What the slicer needs of a flow; d is the direction (0 = client→server, 1 = back). */
export interface WireState {
  readonly id: number;
  readonly v6: boolean;
  readonly mss: number;
  /** Sequence numbers, IP ids, pseudo-header sums, addresses: frame-template.ts's layout. */
  readonly wire: Uint32Array;
  /** The direction Envoy received (pcapng inbound); the other one is outbound. */
  readonly readDir: number;
}

/** pcapng direction flag of direction d of a flow, relative to Envoy. */
function dirFlagOf(w: WireState, d: number): number {
  return d === w.readDir ? Direction.Inbound : Direction.Outbound;
}

export interface SlicerOptions {
  /** Frames are cut to this many bytes (caplen), their original length kept. 0 = no limit. */
  snaplen: number;
}

/** Where frames go: the current block, and a way to hand it off and get an empty one. */
export interface BlockOutput {
  current: Block | null;
  /** Hands the current block to the sinks and returns a fresh one (null: none free). */
  rotate(): Block | null;
}

export interface SliceResult {
  packets: number;
  bytes: number;
  /** Segments that found no free block and were dropped (their sequence space is still used). */
  dropped: number;
}

const MAX_SEGMENTS = 65536;

export class Slicer {
  private readonly snaplen: number;
  /** Scratch: final frame offset of each segment of the chunk being laid out. */
  private readonly frameAt = new Uint32Array(MAX_SEGMENTS);
  /** Scratch: the record header's two timestamp words for the kernel. */
  private readonly tsWords = new Uint32Array(2);
  /** The JavaScript path's header templates per direction (IPv4, IPv6) and whose they are now. */
  private readonly tmpl4 = [Buffer.alloc(headerLength(false)), Buffer.alloc(headerLength(false))];
  private readonly tmpl6 = [Buffer.alloc(headerLength(true)), Buffer.alloc(headerLength(true))];
  private readonly tmplOf: [WireState | null, WireState | null] = [null, null];
  readonly result: SliceResult = { packets: 0, bytes: 0, dropped: 0 };

  constructor(
    private readonly out: BlockOutput,
    opts: SlicerOptions,
  ) {
    this.snaplen = opts.snaplen > 0 ? opts.snaplen : 0x7fffffff;
  }

  /**
   * Emits `payload` from direction d as MSS-sized segments (ACK, PSH on the last one) and advances
   * seq[d]. `comment`/`drop` annotate the first segment. Returns this.result (reused).
   */
  data(w: WireState, d: number, payload: Buffer, tsSec: number, tsNsec: number, comment: Buffer | null, drop: number): SliceResult {
    const res = this.result;
    res.packets = res.bytes = res.dropped = 0;
    const total = payload.length;
    if (total === 0) return res;
    const hdr = headerLength(w.v6);
    if (hdr + Math.min(w.mss, total) > this.snaplen) {
      this.dataSnapped(w, d, payload, tsSec, tsNsec, comment, drop);
      return res;
    }
    let pos = 0;
    while (pos < total) {
      const block = this.out.current ?? this.firstBlock();
      if (!block) return this.dropRest(w, d, total - pos, res);
      // The first segment carries the annotations (comment, drop count): the JavaScript path lays
      // it out alone; everything else goes through the kernel where there is one.
      const annotated = pos === 0 && (comment !== null || drop > 0);
      const bytes =
        block.kernel !== null && !annotated
          ? this.kernelChunk(block, w, d, payload, pos, tsSec, tsNsec)
          : this.jsChunk(block, w, d, payload, pos, annotated ? 1 : MAX_SEGMENTS, tsSec, tsNsec, comment, drop);
      if (bytes === 0) {
        // Not one more segment fits: hand the block on.
        if (block.count === 0) throw new Error(`block of ${block.size} bytes cannot hold one ${hdr + w.mss}-byte frame`);
        if (!this.out.rotate()) return this.dropRest(w, d, total - pos, res);
        continue;
      }
      pos += bytes;
    }
    return res;
  }

  /**
   * As many segments of payload[pos..] as fit in the block, through the packet kernel: one copy of
   * their bytes into the block here, everything else in one kernel call. Returns the payload bytes
   * placed (0: not one segment fits).
   */
  private kernelChunk(block: Block, w: WireState, d: number, payload: Buffer, pos: number, tsSec: number, tsNsec: number): number {
    const framer = block.framer;
    const kernel = block.kernel!;
    const hdr = headerLength(w.v6);
    const mss = w.mss;
    const rest = payload.length - pos;
    const stride = framer.recordSize(hdr + mss, 0, false);
    const room = block.size - block.used;
    let n = Math.ceil(rest / mss);
    let bytes = rest;
    if ((n - 1) * stride + framer.recordSize(hdr + rest - (n - 1) * mss, 0, false) > room) {
      n = Math.floor(room / stride);
      bytes = n * mss;
      if (n === 0) return 0;
    }
    const rec = block.used;
    const first = rec + framer.head;
    copyBytes(block.buf, first + hdr, pos === 0 && bytes === payload.length ? payload : payload.subarray(pos, pos + bytes));
    // The flow's template into its slot of the kernel's scratch area, unless it is still there.
    const slot = templateSlot(w.id, d);
    if (kernel.tmplOf[slot] !== w) {
      writeTemplate(w.wire, w.v6, d, kernel.scratchView, slot * TEMPLATE_SLOT);
      kernel.tmplOf[slot] = w;
    }
    framer.timestampWords(tsSec, tsNsec, this.tsWords);
    const wire = w.wire;
    const seq = wire[W_SEQ + d]!;
    const dir = dirFlagOf(w, d);
    const last = pos + bytes === payload.length;
    // Unsigned 32-bit values go in as int32 (`| 0`, the same bits): a number above 2^31 would be
    // boxed on the way into WebAssembly, an allocation per event.
    const end = kernel.segments(
      block.base + rec,
      bytes,
      mss,
      kernel.scratch + slot * TEMPLATE_SLOT,
      hdr,
      w.v6 ? 1 : 0,
      seq | 0,
      wire[W_SEQ + (d ^ 1)]! | 0,
      wire[W_IPID + d]!,
      wire[W_PSEUDO + d]!,
      last ? TCP_ACK | TCP_PSH : TCP_ACK,
      framer.kernelFormat,
      this.tsWords[0]! | 0,
      this.tsWords[1]! | 0,
      dir,
    );
    // The metadata sinks re-frame from (live viewers, brokers in another format).
    const i0 = block.count;
    if (i0 === 0) block.firstFrameAt = Date.now();
    let frameOff = first;
    for (let i = i0, iEnd = i0 + n; i < iEnd; i++) {
      const capLen = i === iEnd - 1 ? hdr + bytes - (n - 1) * mss : hdr + mss;
      block.frameOff[i] = frameOff;
      block.capLen[i] = capLen;
      block.origLen[i] = capLen;
      block.tsSec[i] = tsSec;
      block.tsNsec[i] = tsNsec;
      block.dir[i] = dir;
      block.flowId[i] = w.id;
      frameOff += stride;
    }
    block.count = i0 + n;
    block.used = end - block.base;
    wire[W_SEQ + d] = (seq + bytes) >>> 0;
    if (!w.v6) wire[W_IPID + d] = (wire[W_IPID + d]! + n) & 0xffff;
    this.result.packets += n;
    this.result.bytes += bytes;
    return bytes;
  }

  /**
   * The JavaScript path: up to maxSegments segments of payload[pos..] that fit in the block, the
   * first one annotated when pos is 0. Returns the payload bytes placed (0: not one fits).
   */
  private jsChunk(block: Block, w: WireState, d: number, payload: Buffer, pos: number, maxSegments: number, tsSec: number, tsNsec: number, comment: Buffer | null, drop: number): number {
    const framer = block.framer;
    const hdr = headerLength(w.v6);
    const total = payload.length;
    // Lay out as many segments as fit in this block.
    let at = block.used;
    let n = 0;
    let bytes = 0;
    while (pos + bytes < total && n < maxSegments) {
      const len = Math.min(w.mss, total - pos - bytes);
      const first = pos === 0 && n === 0;
      const size = framer.recordSize(hdr + len, first && comment ? comment.length : 0, first && drop > 0);
      if (at + size > block.size) break;
      this.frameAt[n++] = at + framer.head;
      at += size;
      bytes += len;
    }
    if (n === 0) return 0;
    // One copy of the payload into the block, then open the header gaps from the end.
    const stage = this.frameAt[0]! + hdr;
    copyBytes(block.buf, stage, pos === 0 && bytes === total ? payload : payload.subarray(pos, pos + bytes));
    for (let k = n - 1; k > 0; k--) {
      const from = stage + k * w.mss;
      const len = k === n - 1 ? bytes - k * w.mss : w.mss;
      block.buf.copyWithin(this.frameAt[k]! + hdr, from, from + len);
    }
    for (let k = 0; k < n; k++) {
      const len = k === n - 1 ? bytes - k * w.mss : w.mss;
      const last = pos + (k + 1) * w.mss >= total;
      const first = pos === 0 && k === 0;
      this.finishSegment(block, w, d, this.frameAt[k]!, len, last ? TCP_ACK | TCP_PSH : TCP_ACK, tsSec, tsNsec, hdr + len, first ? comment : null, first ? drop : 0, 0);
    }
    this.result.packets += n;
    this.result.bytes += bytes;
    return bytes;
  }

  /**
   * A segment without payload: SYN, SYN-ACK (with MSS and window-scale options), ACK, FIN, RST.
   * Returns false when no block was free (the caller counts the drop); SYN/FIN still take their
   * sequence number only when written.
   */
  control(w: WireState, d: number, flags: number, tsSec: number, tsNsec: number, comment: Buffer | null, drop: number): boolean {
    const hdr = headerLength(w.v6);
    const optLen = flags & TCP_SYN ? 8 : 0;
    const block = this.blockFor(hdr + optLen, comment ? comment.length : 0, drop > 0);
    if (!block) return false;
    const frameOff = block.used + block.framer.head;
    if (optLen) {
      // MSS (kind 2), NOP, window scale (kind 3). Written before the header so that the header
      // copy cannot be clobbered; the TCP checksum covers them.
      const o = frameOff + hdr;
      const b = block.buf;
      b[o] = 2;
      b[o + 1] = 4;
      b[o + 2] = w.mss >>> 8;
      b[o + 3] = w.mss & 0xff;
      b[o + 4] = 1;
      b[o + 5] = 3;
      b[o + 6] = 3;
      b[o + 7] = TCP_WINDOW_SCALE;
    }
    this.finishSegment(block, w, d, frameOff, 0, flags, tsSec, tsNsec, hdr + optLen, comment, drop, optLen);
    // SYN and FIN each consume one sequence number.
    if (flags & (TCP_SYN | TCP_FIN)) w.wire[W_SEQ + d] = (w.wire[W_SEQ + d]! + 1) >>> 0;
    return true;
  }

  /**
   * Writes headers, checksums and framing for one segment whose payload (len bytes, after
   * optLen option bytes) is already in place at frameOff + header length.
   */
  private finishSegment(
    block: Block,
    w: WireState,
    d: number,
    frameOff: number,
    len: number,
    flags: number,
    tsSec: number,
    tsNsec: number,
    capLen: number,
    comment: Buffer | null,
    drop: number,
    optLen: number,
  ): void {
    const b = block.buf;
    const wire = w.wire;
    b.set(this.template(w, d), frameOff);
    const tcp = frameOff + tcpOffset(w.v6);
    const tcpLen = 20 + optLen + len;
    const ip = frameOff + ETH_LEN;
    if (w.v6) {
      b[ip + 4] = tcpLen >>> 8;
      b[ip + 5] = tcpLen & 0xff;
    } else {
      const total = 20 + tcpLen;
      const id = wire[W_IPID + d]!;
      wire[W_IPID + d] = (id + 1) & 0xffff;
      b[ip + 2] = total >>> 8;
      b[ip + 3] = total & 0xff;
      b[ip + 4] = id >>> 8;
      b[ip + 5] = id & 0xff;
      // Byte-wise over 20 bytes: the sum stays a small integer (no boxing).
      writeChecksumLE(b, ip + 10, sumBytesLE(b, ip, ip + 20));
    }
    const seq = wire[W_SEQ + d]!;
    // A bare SYN carries no acknowledgement (Wireshark flags a non-zero one).
    const ack = flags & TCP_ACK ? wire[W_SEQ + (d ^ 1)]! : 0;
    b[tcp + 4] = seq >>> 24;
    b[tcp + 5] = (seq >>> 16) & 0xff;
    b[tcp + 6] = (seq >>> 8) & 0xff;
    b[tcp + 7] = seq & 0xff;
    b[tcp + 8] = ack >>> 24;
    b[tcp + 9] = (ack >>> 16) & 0xff;
    b[tcp + 10] = (ack >>> 8) & 0xff;
    b[tcp + 11] = ack & 0xff;
    if (optLen) b[tcp + 12] = ((20 + optLen) / 4) << 4;
    b[tcp + 13] = flags;
    // A SYN's sequence number is consumed by the caller (control), data's here.
    wire[W_SEQ + d] = (seq + len) >>> 0;
    const lenLE = ((tcpLen & 0xff) << 8) | (tcpLen >>> 8);
    const init = wire[W_PSEUDO + d]! + lenLE;
    if (block.kernel !== null) writeChecksumLE(b, tcp + 16, init + block.kernel.sum(block.base + tcp, frameOff + capLen - tcp));
    else checksumInto(b, block.u32, tcp, frameOff + capLen, init, tcp + 16);
    this.record(block, w, d, frameOff, capLen, capLen, tsSec, tsNsec, comment, drop);
  }

  private record(block: Block, w: WireState, d: number, frameOff: number, capLen: number, origLen: number, tsSec: number, tsNsec: number, comment: Buffer | null, drop: number): void {
    const i = block.count++;
    if (i === 0) block.firstFrameAt = Date.now();
    block.frameOff[i] = frameOff;
    block.capLen[i] = capLen;
    block.origLen[i] = origLen;
    block.tsSec[i] = tsSec;
    block.tsNsec[i] = tsNsec;
    block.dir[i] = dirFlagOf(w, d);
    block.flowId[i] = w.id;
    if (comment) block.setComment(i, comment);
    if (drop) block.dropCount[i] = drop;
    block.used = block.framer.finish(block.buf, frameOff, capLen, origLen, tsSec, tsNsec, dirFlagOf(w, d), comment, drop);
  }

  /**
   * Slow path for a snaplen shorter than a segment: each frame keeps its first `snaplen` bytes,
   * the TCP checksum still covers the whole segment (computed from the source payload).
   */
  private dataSnapped(w: WireState, d: number, payload: Buffer, tsSec: number, tsNsec: number, comment: Buffer | null, drop: number): void {
    const res = this.result;
    const hdr = headerLength(w.v6);
    const total = payload.length;
    for (let pos = 0; pos < total; pos += w.mss) {
      const len = Math.min(w.mss, total - pos);
      const capLen = Math.min(hdr + len, this.snaplen);
      const first = pos === 0;
      const block = this.blockFor(capLen, first && comment ? comment.length : 0, first && drop > 0);
      if (!block) {
        this.dropRest(w, d, total - pos, res);
        return;
      }
      const frameOff = block.used + block.framer.head;
      const b = block.buf;
      const capPayload = capLen - Math.min(capLen, hdr);
      // The template and headers are written into a full-size header area even when the snaplen
      // cuts into them; the record only keeps capLen bytes.
      const wire = w.wire;
      b.set(this.template(w, d), frameOff);
      if (capPayload > 0) copyBytes(b, frameOff + hdr, payload.subarray(pos, pos + capPayload));
      const tcp = frameOff + tcpOffset(w.v6);
      const tcpLen = 20 + len;
      const ip = frameOff + ETH_LEN;
      if (w.v6) b.writeUInt16BE(tcpLen, ip + 4);
      else {
        b.writeUInt16BE(20 + tcpLen, ip + 2);
        b.writeUInt16BE(wire[W_IPID + d]!, ip + 4);
        wire[W_IPID + d] = (wire[W_IPID + d]! + 1) & 0xffff;
        writeChecksumLE(b, ip + 10, sumBytesLE(b, ip, ip + 20));
      }
      const last = pos + len >= total;
      b.writeUInt32BE(wire[W_SEQ + d]!, tcp + 4);
      b.writeUInt32BE(wire[W_SEQ + (d ^ 1)]!, tcp + 8);
      b[tcp + 13] = last ? TCP_ACK | TCP_PSH : TCP_ACK;
      const lenLE = ((tcpLen & 0xff) << 8) | (tcpLen >>> 8);
      // Header bytes from the block, payload bytes from the source (parity: header is 20 bytes).
      const sum = wire[W_PSEUDO + d]! + lenLE + sumBytesLE(b, tcp, tcp + 20) + sumBytesLE(payload, pos, pos + len);
      writeChecksumLE(b, tcp + 16, sum);
      wire[W_SEQ + d] = (wire[W_SEQ + d]! + len) >>> 0;
      this.record(block, w, d, frameOff, capLen, hdr + len, tsSec, tsNsec, first ? comment : null, first ? drop : 0);
      res.packets++;
      res.bytes += len;
    }
  }

  /** The JavaScript path's template of direction d of a flow, rebuilt only when that direction's flow changes. */
  private template(w: WireState, d: number): Buffer {
    const t = (w.v6 ? this.tmpl6 : this.tmpl4)[d]!;
    if (this.tmplOf[d] !== w) {
      writeTemplate(w.wire, w.v6, d, t, 0);
      this.tmplOf[d] = w;
    }
    return t;
  }

  /** A block with room for one record, rotating if needed. */
  private blockFor(capLen: number, commentLen: number, hasDrop: boolean): Block | null {
    let block = this.out.current ?? this.firstBlock();
    if (!block) return null;
    // The header area is always fully written, even when capLen is shorter.
    const need = block.framer.recordSize(Math.max(capLen, headerLength(true) + 8), commentLen, hasDrop);
    if (block.used + need > block.size) block = this.out.rotate();
    return block;
  }

  private firstBlock(): Block | null {
    return this.out.current ?? this.out.rotate();
  }

  /** Sequence space for bytes that found no block is still consumed: Wireshark shows the gap. */
  private dropRest(w: WireState, d: number, bytes: number, res: SliceResult): SliceResult {
    res.dropped += Math.ceil(bytes / w.mss);
    w.wire[W_SEQ + d] = (w.wire[W_SEQ + d]! + bytes) >>> 0;
    return res;
  }
}

