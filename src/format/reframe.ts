/**
 * Re-frames the frames of a Block in another record format (or a subset of them), for sinks whose
 * format differs from the one the block was laid out for (a pcap broker stream beside pcapng files,
 * a live viewer's filter). This is the one extra copy such sinks pay; a sink whose format matches
 * the block's writes its records (`block.records()`) as they are.
 */
import type { Block } from '../packet/block.js';
import { copyBytes } from '../packet/copy-bytes.js';
import type { RecordFramer } from './record-framer.js';

/**
 * Writes records for the frames of `block` selected by `keep` (all when absent) into `out` from
 * offset 0, and returns the bytes written. Comments and drop counts are carried when the target
 * format can hold them. Throws when `out` is too small (size it with `reframedSizeBound`).
 */
export function reframeBlock(block: Block, framer: RecordFramer, out: Buffer, keep?: (i: number) => boolean): number {
  let o = 0;
  for (let i = 0; i < block.count; i++) {
    if (keep && !keep(i)) continue;
    const cap = block.capLen[i]!;
    const comment = framer.carriesAnnotations ? block.commentOf(i) : null;
    const drop = framer.carriesAnnotations ? block.dropCount[i]! : 0;
    const size = framer.recordSize(cap, comment ? comment.length : 0, drop > 0);
    if (o + size > out.length) throw new RangeError(`reframe: output buffer of ${out.length} bytes is too small`);
    const frameOff = o + framer.head;
    copyBytes(out, frameOff, block.buf.subarray(block.frameOff[i]!, block.frameOff[i]! + cap));
    o = framer.finish(out, frameOff, cap, block.origLen[i]!, block.tsSec[i]!, block.tsNsec[i]!, block.dir[i]!, comment, drop);
  }
  return o;
}

/** An upper bound of reframeBlock's output for any block of `blockSize` bytes. */
export function reframedSizeBound(blockSize: number, from: RecordFramer, to: RecordFramer): number {
  // Per frame the target adds at most its own overhead (plus padding) beyond the frame bytes;
  // the source used at least its minimum overhead per frame, and a frame is at least 54 bytes.
  const frames = Math.ceil(blockSize / (54 + from.minOverhead));
  return blockSize + frames * (to.recordSize(0, 0, true) + 3);
}
