/**
 * A minimal protobuf wire-format reader over a Buffer, for the ingest hot path.
 *
 * protobufjs' reflection decoders build an object per message; the tap decoder only needs to walk
 * tags and take views of `bytes` fields, so it reads the wire directly: one reader per decoder,
 * no allocation per field, `bytes` returned as subarray views of the received message.
 */

export const enum WireType {
  Varint = 0,
  Fixed64 = 1,
  Len = 2,
  StartGroup = 3,
  EndGroup = 4,
  Fixed32 = 5,
}

export class WireError extends Error {}

const TWO_32 = 4294967296;

export class WireReader {
  buf: Buffer = Buffer.alloc(0);
  pos = 0;
  /** Low and high 32 bits of the last varint read by varint64(). */
  lo = 0;
  hi = 0;

  reset(buf: Buffer, pos = 0): void {
    this.buf = buf;
    this.pos = pos;
  }

  /** A varint that must fit in 32 bits (tags, lengths, enums, bools, uint32). */
  uint32(end: number): number {
    let result = 0;
    let shift = 0;
    const buf = this.buf;
    while (true) {
      if (this.pos >= end) throw new WireError(`truncated varint at offset ${this.pos}`);
      const b = buf[this.pos++]!;
      if (shift < 28) result |= (b & 0x7f) << shift;
      else if (shift === 28) result += (b & 0x0f) * 268435456; // bits 28..31
      // Bits beyond 32 are dropped: int32 fields are sign-extended to 10 bytes on the wire.
      if ((b & 0x80) === 0) break;
      shift += 7;
      if (shift > 63) throw new WireError(`varint longer than 10 bytes at offset ${this.pos}`);
    }
    return result >>> 0;
  }

  /** A 64-bit varint, left in lo/hi. */
  varint64(end: number): void {
    let lo = 0;
    let hi = 0;
    let shift = 0;
    const buf = this.buf;
    while (true) {
      if (this.pos >= end) throw new WireError(`truncated varint at offset ${this.pos}`);
      const b = buf[this.pos++]!;
      if (shift < 28) lo |= (b & 0x7f) << shift;
      else if (shift === 28) {
        lo |= (b & 0x0f) << 28;
        hi |= (b & 0x7f) >>> 4;
      } else hi |= (b & 0x7f) << (shift - 32);
      if ((b & 0x80) === 0) break;
      shift += 7;
      if (shift > 63) throw new WireError(`varint longer than 10 bytes at offset ${this.pos}`);
    }
    this.lo = lo >>> 0;
    this.hi = hi >>> 0;
  }

  /** A uint64 as a number when exact (< 2^53), else its decimal string: one key per value. */
  uint64Key(end: number): number | string {
    this.varint64(end);
    if (this.hi < 0x200000) return this.hi * TWO_32 + this.lo;
    return ((BigInt(this.hi) << 32n) | BigInt(this.lo)).toString();
  }

  /** A uint64 as a number (precision lost above 2^53; used for counters like seq_num). */
  uint64Number(end: number): number {
    this.varint64(end);
    return this.hi * TWO_32 + this.lo;
  }

  /** An int64 as a number (seconds of a Timestamp). */
  int64Number(end: number): number {
    this.varint64(end);
    if (this.hi & 0x80000000) return -((~this.hi >>> 0) * TWO_32 + (~this.lo >>> 0) + 1);
    return this.hi * TWO_32 + this.lo;
  }

  /** The end offset of a length-delimited field whose tag was just read. */
  lenEnd(end: number): number {
    const len = this.uint32(end);
    const stop = this.pos + len;
    if (stop > end) throw new WireError(`length ${len} at offset ${this.pos} overruns its message`);
    return stop;
  }

  skip(wireType: number, end: number): void {
    switch (wireType) {
      case WireType.Varint:
        this.varint64(end);
        return;
      case WireType.Fixed64:
        this.pos += 8;
        break;
      case WireType.Len:
        this.pos = this.lenEnd(end);
        return;
      case WireType.Fixed32:
        this.pos += 4;
        break;
      case WireType.StartGroup: {
        // Deprecated groups: skip fields until the matching end-group tag.
        while (true) {
          const tag = this.uint32(end);
          if ((tag & 7) === WireType.EndGroup) return;
          this.skip(tag & 7, end);
        }
      }
      default:
        throw new WireError(`invalid wire type ${wireType} at offset ${this.pos}`);
    }
    if (this.pos > end) throw new WireError(`fixed-width field overruns its message at offset ${this.pos}`);
  }

  utf8(start: number, stop: number): string {
    return this.buf.toString('utf8', start, stop);
  }
}
