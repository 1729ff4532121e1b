/**
 * gRPC's length-prefixed messages out of one HTTP/2 request's DATA chunks.
 *
 * Each message is a 1-byte compressed flag, a 4-byte big-endian length and the bytes. A message
 * that lies inside one chunk is handed on as a view of that chunk (no copy); one that straddles
 * chunks is gathered into the reader's own buffer, which is kept for the next message, so the
 * steady state allocates nothing but the views. Either way the message is valid only during the
 * `onMessage` call: the consumer must not keep it.
 */

/** Why a request's framing was refused; the reader stops after it. */
export type FramingError =
  | { kind: 'too_large'; size: number }
  /** The request ended inside a message: `missing` bytes of its prefix, or of its body. */
  | { kind: 'truncated'; inPrefix: boolean; missing: number };

/** Buffers above this are dropped after their message, so one huge message does not pin memory. */
const KEEP_BYTES = 1024 * 1024;

export class GrpcMessageReader {
  /** Bytes of the 5-byte prefix seen so far. */
  private prefixHave = 0;
  private flag = 0;
  private size = 0;
  /** Bytes of the current message still to come (valid once the prefix is complete). */
  private left = 0;
  /** Gathering buffer for a message that straddles chunks, and how much of it is filled. */
  private gather: Buffer | null = null;
  private filled = 0;
  private failed = false;

  constructor(
    private readonly maxBytes: number,
    private readonly onMessage: (message: Buffer, compressed: boolean) => void,
    private readonly onError: (err: FramingError) => void,
  ) {}

  /** Consumes one DATA chunk; calls onMessage for every message it completes. */
  push(chunk: Buffer): void {
    let i = 0;
    const n = chunk.length;
    while (i < n && !this.failed) {
      if (this.prefixHave < 5) {
        if (this.prefixHave === 0 && n - i >= 5) {
          this.flag = chunk[i]!;
          this.size = chunk.readUInt32BE(i + 1);
          this.prefixHave = 5;
          i += 5;
        } else {
          const b = chunk[i++]!;
          if (this.prefixHave === 0) this.flag = b;
          else this.size = this.size * 256 + b;
          if (++this.prefixHave < 5) continue;
        }
        if (this.size > this.maxBytes) {
          this.failed = true;
          this.onError({ kind: 'too_large', size: this.size });
          return;
        }
        this.left = this.size;
        if (this.left === 0) {
          this.deliver(chunk.subarray(i, i));
          continue;
        }
        if (n - i >= this.left) {
          // The whole message is in this chunk: a view, no copy.
          const end = i + this.left;
          this.left = 0;
          this.deliver(chunk.subarray(i, end));
          i = end;
          continue;
        }
        if (!this.gather || this.gather.length < this.size) this.gather = Buffer.allocUnsafeSlow(this.size);
        this.filled = 0;
      }
      const take = Math.min(this.left, n - i);
      this.filled += chunk.copy(this.gather!, this.filled, i, i + take);
      i += take;
      this.left -= take;
      if (this.left === 0) {
        this.deliver(this.gather!.subarray(0, this.size));
        if (this.gather!.length > KEEP_BYTES) this.gather = null;
      }
    }
  }

  /** The request ended (END_STREAM): a message cut short is an error. */
  end(): void {
    if (this.failed || this.prefixHave === 0) return;
    this.failed = true;
    const inPrefix = this.prefixHave < 5;
    this.onError({ kind: 'truncated', inPrefix, missing: inPrefix ? 5 - this.prefixHave : this.left });
  }

  private deliver(message: Buffer): void {
    this.prefixHave = 0;
    this.size = 0;
    this.onMessage(message, this.flag === 1);
  }
}
