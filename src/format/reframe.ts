/**
 * Re-frames the frames of a Block in another record format (or a subset of them), for sinks whose
 * format differs from the one the block was laid out for (a pcap broker stream beside pcapng files,
 * a live viewer's filter, one broker lane of several). This is the one extra copy such sinks pay; a
 * sink whose format matches the block's writes its records (`block.records()`) as they are.
 */
import type { Block } from '../packet/block.js';
import { copyBytes } from '../packet/copy-bytes.js';
import type { RecordFramer } from './record-framer.js';

/**
 * What a sink adds to the first record it re-frames (a sink's own losses, reported on the next
 * packet that gets through): text appended to its comment and packets added to its drop count.
 * Only formats that carry annotations (pcapng) show it.
 */
export interface FirstRecordNote {
  text: Buffer;
  drops: number;
}

const SEPARATOR = Buffer.from('; ');

/**
 * Bytes and records that reframeBlock will write for the same arguments: the exact size of the
 * output buffer to take.
 */
export function reframedSize(block: Block, framer: RecordFramer, keep?: (i: number) => boolean, note?: FirstRecordNote | null): { bytes: number; count: number } {
  let bytes = 0;
  let count = 0;
  const ann = framer.carriesAnnotations;
  for (let i = 0; i < block.count; i++) {
    if (keep && !keep(i)) continue;
    const comment = ann ? (count === 0 && note ? withNote(block.commentOf(i), note) : block.commentOf(i)) : null;
    const drop = ann ? block.dropCount[i]! + (count === 0 && note ? note.drops : 0) : 0;
    bytes += framer.recordSize(block.capLen[i]!, comment ? comment.length : 0, drop > 0);
    count++;
  }
  return { bytes, count };
}

/**
 * Writes records for the frames of `block` selected by `keep` (all when absent) into `out` from
 * offset 0, and returns the bytes written. Comments and drop counts are carried when the target
 * format can hold them, and `note` is added to the first record written. Throws when `out` is too
 * small (size it with `reframedSize`, or `reframedSizeBound` for any block).
 */
export function reframeBlock(block: Block, framer: RecordFramer, out: Buffer, keep?: (i: number) => boolean, note?: FirstRecordNote | null): number {
  let o = 0;
  let first = true;
  const ann = framer.carriesAnnotations;
  for (let i = 0; i < block.count; i++) {
    if (keep && !keep(i)) continue;
    const comment = ann ? (first && note ? withNote(block.commentOf(i), note) : block.commentOf(i)) : null;
    const drop = ann ? block.dropCount[i]! + (first && note ? note.drops : 0) : 0;
    first = false;
    const cap = block.capLen[i]!;
    const size = framer.recordSize(cap, comment ? comment.length : 0, drop > 0);
    if (o + size > out.length) throw new RangeError(`reframe: output buffer of ${out.length} bytes is too small`);
    const frameOff = o + framer.head;
    copyBytes(out, frameOff, block.buf.subarray(block.frameOff[i]!, block.frameOff[i]! + cap));
    o = framer.finish(out, frameOff, cap, block.origLen[i]!, block.tsSec[i]!, block.tsNsec[i]!, block.dir[i]!, comment, drop);
  }
  return o;
}

/** The frame's own comment followed by the note (allocates: once per re-framed block, at most). */
function withNote(comment: Buffer | null, note: FirstRecordNote): Buffer {
  return comment ? Buffer.concat([comment, SEPARATOR, note.text]) : note.text;
}

/** An upper bound of reframeBlock's output for any block of `blockSize` bytes (without a note). */
export function reframedSizeBound(blockSize: number, from: RecordFramer, to: RecordFramer): number {
  // Per frame the target adds at most its own overhead (plus padding) beyond the frame bytes;
  // the source used at least its minimum overhead per frame, and a frame is at least 54 bytes.
  const frames = Math.ceil(blockSize / (54 + from.minOverhead));
  return blockSize + frames * (to.recordSize(0, 0, true) + 3);
}
