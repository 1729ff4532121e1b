/**
 * How one output format wraps each frame: the record header goes in the `head` bytes reserved
 * before the frame, the trailer (padding, options) after it. The slicer asks `recordSize` before it
 * lays frames out, and calls `finish` once the frame bytes are in place.
 */
export interface RecordFramer {
  /** 'pcapng' | 'pcap' | 'pcap-ns'. */
  readonly name: string;
  /** Bytes reserved in front of every frame. */
  readonly head: number;
  /** The smallest head + tail this format adds to a frame (for sizing metadata arrays). */
  readonly minOverhead: number;
  /** Whether per-packet comments and drop counts survive in this format. */
  readonly carriesAnnotations: boolean;
  /** Whole record size for a frame of capLen bytes, with an optional comment and drop count. */
  recordSize(capLen: number, commentLen: number, hasDrop: boolean): number;
  /**
   * Writes header and trailer around the frame that starts at `frameOff` and returns the offset
   * just past the record.
   */
  finish(
    buf: Buffer,
    frameOff: number,
    capLen: number,
    origLen: number,
    tsSec: number,
    tsNsec: number,
    dir: number,
    comment: Buffer | null,
    dropCount: number,
  ): number;
  /**
   * How the packet kernel (src/packet/kernel.wat) frames this format's plain records: 0 = pcapng
   * EPB with epb_flags, 1 = classic pcap record header.
   */
  readonly kernelFormat: number;
  /** The two timestamp words of a record header (the kernel's ts0, ts1) into out[0] and out[1]. */
  timestampWords(tsSec: number, tsNsec: number, out: Uint32Array): void;
  /** The file (or stream) header: pcap global header, or pcapng SHB + IDB. */
  fileHeader(opts: FileHeaderOptions): Buffer;
}

export interface FileHeaderOptions {
  snaplen: number;
  /** Interface name and description (pcapng IDB). */
  ifName?: string;
  ifDescription?: string;
  /** shb_userappl. */
  application?: string;
}

/** The 64-bit count of nanoseconds since the epoch split into two u32, without BigInt. */
export function nsHiLo(tsSec: number, tsNsec: number, out: Uint32Array): void {
  // sec * 1e9 exceeds 2^53, so split sec at 2^16: total = A * 2^16 + B with A, B exact doubles.
  const sh = Math.floor(tsSec / 65536);
  const sl = tsSec - sh * 65536;
  const a = sh * 1e9; // < 2^46
  const b = sl * 1e9 + tsNsec; // < 2^46
  const aLo = a % 65536;
  const low = aLo * 65536 + b; // < 2^53
  out[1] = low % 4294967296;
  out[0] = (a - aLo) / 65536 + Math.floor(low / 4294967296);
}
