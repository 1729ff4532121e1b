/**
 * Walks the length-prefixed records of a capture file in 8 MiB chunks (pcap records, pcapng
 * blocks), so multi-GB files cost a sequential read: the caller says how long the record at a
 * position is and looks at each whole one. A record longer than the buffer grows it.
 */
import fs from 'node:fs';

export interface RecordWalk {
  /** Bytes at which records start (after a file header). */
  start: number;
  /** The smallest prefix that tells a record's length. */
  headBytes: number;
  /** Length of the record at buf[pos..] (whole, header included); `offset` is its file offset. Throws on nonsense. */
  length(buf: Buffer, pos: number, offset: number): number;
  /** Called for each whole record. */
  visit(buf: Buffer, pos: number, len: number): void;
}

/** Walks every whole record; returns the bytes at the end that are not one (a file still being written). */
export function walkRecords(fd: number, size: number, w: RecordWalk): number {
  let buf = Buffer.allocUnsafe(16 << 20);
  let have = 0; // bytes in buf
  let pos = 0; // parse position in buf
  let filePos = w.start;
  for (;;) {
    // Refill: keep the unparsed tail, read more.
    if (pos > 0) {
      buf.copy(buf, 0, pos, have);
      have -= pos;
      pos = 0;
    }
    const n = filePos < size ? fs.readSync(fd, buf, have, Math.min(buf.length - have, size - filePos), filePos) : 0;
    filePos += n;
    have += n;
    let progressed = false;
    while (have - pos >= w.headBytes) {
      const len = w.length(buf, pos, filePos - have + pos);
      if (have - pos < len) {
        if (len > buf.length) {
          const bigger = Buffer.allocUnsafe(len * 2);
          buf.copy(bigger, 0, pos, have);
          have -= pos;
          pos = 0;
          buf = bigger;
        }
        break;
      }
      w.visit(buf, pos, len);
      pos += len;
      progressed = true;
    }
    if (n === 0 && !progressed) break;
  }
  return have - pos;
}
