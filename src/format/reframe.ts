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
    const here = count === 0 ? note : null;
    const comment = commentFor(block, i, ann, here);
    bytes += framer.recordSize(block.capLen[i]!, comment ? comment.length : 0, dropFor(block, i, ann, here) > 0);
    count++;
  }
  return { bytes, count };
}

/**
 * Bytes of the block copied into `out` at a time: a window of records, moved into place while it is
 * in the cache.
 */
const WINDOW = 256 * 1024;

/**
 * Writes records for the frames of `block` selected by `keep` (all when absent) into `out` from
 * offset 0, and returns the bytes written. Comments and drop counts are carried when the target
 * format can hold them, and `note` is added to the first record written. Throws when `out` is too
 * small (size it with `reframedSize`, or `reframedSizeBound` for any block).
 *
 * No allocation per frame: the block's bytes come over a window at a time — one copy out of the
 * shared memory (a view per window), placed so that the window's first frame lands where its record
 * needs it — and the window's later frames are moved down to their places inside `out`
 * (copyWithin, a native memmove). A window ends at a frame not kept, at its size, at the end of
 * `out`, or where a record written would reach the next frame's bytes (a target record longer than
 * the source's, e.g. a comment added): the next window copies that frame afresh from the block.
 */
export function reframeBlock(block: Block, framer: RecordFramer, out: Buffer, keep?: (i: number) => boolean, note?: FirstRecordNote | null): number {
  const ann = framer.carriesAnnotations;
  const head = framer.head;
  const n = block.count;
  let o = 0;
  let first = true;
  let i = 0;
  while (i < n) {
    if (keep && !keep(i)) {
      i++;
      continue;
    }
    // The window: block bytes [a, b), placed at p, where frame i's record puts its frame.
    const a = block.frameOff[i]!;
    const p = o + head;
    const b = Math.min(Math.max(a + WINDOW, a + block.capLen[i]!), block.used, a + out.length - p);
    if (b > a) copyBytes(out, p, block.buf.subarray(a, b));
    let k = i;
    do {
      const cap = block.capLen[k]!;
      const here = first ? note : null;
      const comment = commentFor(block, k, ann, here);
      const drop = dropFor(block, k, ann, here);
      const size = framer.recordSize(cap, comment ? comment.length : 0, drop > 0);
      if (o + size > out.length) throw new RangeError(`reframe: output buffer of ${out.length} bytes is too small`);
      first = false;
      const src = p + (block.frameOff[k]! - a);
      const frameOff = o + head;
      if (frameOff !== src) out.copyWithin(frameOff, src, src + cap);
      o = framer.finish(out, frameOff, cap, block.origLen[k]!, block.tsSec[k]!, block.tsNsec[k]!, block.dir[k]!, comment, drop);
      k++;
    } while (k < n && (!keep || keep(k)) && block.frameOff[k]! + block.capLen[k]! <= b && o <= p + (block.frameOff[k]! - a));
    i = k;
  }
  return o;
}

/**
 * Frame i's comment in a format that carries annotations (`ann`), followed by `note` where it is
 * the first record written (allocates then: once per re-framed block, at most); null otherwise.
 */
function commentFor(block: Block, i: number, ann: boolean, note: FirstRecordNote | null | undefined): Buffer | null {
  if (!ann) return null;
  const own = block.commentOf(i);
  return note ? appendComment(own, note.text) : own;
}

/** A frame's comment with `text` added after it ("; " between), or `text` alone (allocates). */
export function appendComment(own: Buffer | null, text: Buffer): Buffer {
  return own ? Buffer.concat([own, SEPARATOR, text]) : text;
}

/** Frame i's drop count in a format that carries annotations, plus the note's. */
function dropFor(block: Block, i: number, ann: boolean, note: FirstRecordNote | null | undefined): number {
  return ann ? block.dropCount[i]! + (note ? note.drops : 0) : 0;
}

/** An upper bound of reframeBlock's output for any block of `blockSize` bytes (without a note). */
export function reframedSizeBound(blockSize: number, from: RecordFramer, to: RecordFramer): number {
  // Per frame the target adds at most its own overhead (plus padding) beyond the frame bytes;
  // the source used at least its minimum overhead per frame, and a frame is at least 54 bytes.
  const frames = Math.ceil(blockSize / (54 + from.minOverhead));
  return blockSize + frames * (to.recordSize(0, 0, true) + 3);
}
