/**
 * Block: a preallocated arena of finished frames plus their metadata, the unit handed to sinks.
 *
 * The slicer writes each frame once, straight into the block, leaving room before and after it
 * for the record framing of the primary output format (pcapng EPB, pcap record header), which the
 * framer fills in place. A file sink then writes `buf[start, used)` as it is: the payload is copied
 * once, from the received message into the block. Sinks that need another format re-frame from the
 * metadata (frameOff/capLen/...).
 *
 * Blocks live in one shared, page-aligned memory per pool (the capture writer thread writes them
 * from there). A block's records may begin after a short lead (`start`, < 4 KiB) that the file
 * sink asks for, so that they land at the same offset modulo 4 KiB in the file as in memory: whole
 * pages can then go to disk by direct I/O, without a copy into the page cache.
 */
import type { RecordFramer } from '../format/record-framer.js';
import { bindKernel, blockMemory, type Kernel } from './wasm-kernel.js';

/** The page size direct I/O works in; blocks sit at multiples of it in their memory. */
export const PAGE = 4096;

/** Frame direction relative to Envoy, as pcapng epb_flags encodes it. */
export const enum Direction {
  /** remote → local (Envoy received it). */
  Inbound = 1,
  /** local → remote (Envoy sent it). */
  Outbound = 2,
}

export class Block {
  readonly buf: Buffer;
  /** Aligned word view over buf, for the checksum loop. */
  readonly u32: Uint32Array;
  /** Where the records begin (the lead before it is unused). */
  start = 0;
  /** Where the next record goes; the records are buf[start, used). */
  used = 0;
  count = 0;
  readonly frameOff: Uint32Array;
  readonly capLen: Uint32Array;
  readonly origLen: Uint32Array;
  readonly tsSec: Float64Array;
  readonly tsNsec: Uint32Array;
  readonly dir: Uint8Array;
  readonly flowId: Uint32Array;
  /**
   * Sparse per-frame extras: comment text (UTF-8, see commentOf) and packets known lost before the
   * frame. Comments are rare (a flow's first packet, gaps): an index into a short list rather than
   * a slot per frame, which kept ~2.8 MB of nulls in the old generation for every major GC to walk.
   */
  private readonly commentIdx: Uint32Array;
  private readonly comments: Buffer[] = [];
  readonly dropCount: Uint32Array;
  /** Sinks still holding this block; the pool takes it back at zero. */
  refs = 0;
  /** Wall-clock ms when the first frame went in (flush deadline, latency metrics). */
  firstFrameAt = 0;

  /** Where buf starts in the WebAssembly memory, and the packet kernel over it (null: JS path). */
  readonly base: number;
  readonly kernel: Kernel | null;

  /** `arena`: the pool's memory, this block's offset in it, and the kernel bound to it (or null). */
  constructor(
    readonly size: number,
    readonly framer: RecordFramer,
    readonly maxFrames: number,
    arena: { memory: WebAssembly.Memory; offset: number; kernel: Kernel | null },
    prefault = true,
  ) {
    this.buf = Buffer.from(arena.memory.buffer, arena.offset, size);
    this.base = arena.offset;
    this.kernel = arena.kernel;
    // A new memory reads as zeros; writing them maps every page now rather than on the hot path.
    if (prefault) this.buf.fill(0);
    // Word view over the whole underlying memory: index (byteOffset + offset) >>> 2.
    this.u32 = new Uint32Array(this.buf.buffer, this.base, size >>> 2);
    this.frameOff = new Uint32Array(maxFrames);
    this.capLen = new Uint32Array(maxFrames);
    this.origLen = new Uint32Array(maxFrames);
    this.tsSec = new Float64Array(maxFrames);
    this.tsNsec = new Uint32Array(maxFrames);
    this.dir = new Uint8Array(maxFrames);
    this.flowId = new Uint32Array(maxFrames);
    this.commentIdx = new Uint32Array(maxFrames);
    this.dropCount = new Uint32Array(maxFrames);
  }

  reset(): void {
    if (this.comments.length > 0) {
      this.commentIdx.fill(0, 0, this.count);
      this.comments.length = 0;
    }
    this.dropCount.fill(0, 0, this.count);
    this.start = 0;
    this.used = 0;
    this.count = 0;
    this.refs = 0;
    this.firstFrameAt = 0;
  }

  /** Leaves `lead` bytes unused before the first record (an empty block only). */
  lead(lead: number): void {
    if (this.count > 0 || lead < 0 || lead >= PAGE) throw new RangeError(`block lead ${lead}: must be 0..${PAGE - 1}, on an empty block`);
    this.start = lead;
    this.used = lead;
  }

  /** Bytes of records in the block. */
  get recordBytes(): number {
    return this.used - this.start;
  }

  /** The records, as a view (allocates: once per block, for sinks). */
  records(): Buffer {
    return this.buf.subarray(this.start, this.used);
  }

  /** Frame i's comment, or null. */
  commentOf(i: number): Buffer | null {
    const k = this.commentIdx[i]!;
    return k === 0 ? null : this.comments[k - 1]!;
  }

  /** Sets (or, with null, clears) frame i's comment. */
  setComment(i: number, comment: Buffer | null): void {
    if (comment === null) {
      this.commentIdx[i] = 0;
      return;
    }
    const k = this.commentIdx[i]!;
    if (k !== 0) this.comments[k - 1] = comment;
    else {
      this.comments.push(comment);
      this.commentIdx[i] = this.comments.length;
    }
  }

  /** Bytes still free. */
  get free(): number {
    return this.size - this.used;
  }

  /** The frame bytes of frame i (a view; allocates — for tests and slow paths only). */
  frame(i: number): Buffer {
    return this.buf.subarray(this.frameOff[i]!, this.frameOff[i]! + this.capLen[i]!);
  }
}

/**
 * A fixed set of blocks, reused. When every block is out (sinks still writing), `acquire` returns
 * null and the caller counts the packets it cannot place: capture never waits on a sink.
 */
export class BlockPool {
  private readonly idle: Block[] = [];
  readonly all: Block[] = [];

  /**
   * `useKernel` false: the JavaScript path only (tests compare the two byte for byte).
   * `prefault` false: pages are mapped as the slicer first fills them (one-shot conversions, whose
   * input may need a fraction of the pool; a server maps them all at start).
   */
  constructor(count: number, size: number, framer: RecordFramer, useKernel = true, prefault = true) {
    // The smallest record is a TCP ACK frame (54 bytes) plus framing.
    const maxFrames = Math.ceil(size / (54 + framer.minOverhead));
    // Blocks page-aligned inside one shared WebAssembly memory: the packet kernel works in place,
    // the capture writer thread writes from it, and whole pages suit direct I/O.
    const stride = (size + PAGE - 1) & ~(PAGE - 1);
    const memory = blockMemory(stride * count);
    const kernel = useKernel ? bindKernel(memory, stride * count) : null;
    for (let i = 0; i < count; i++) {
      const b = new Block(size, framer, maxFrames, { memory, offset: i * stride, kernel }, prefault);
      this.all.push(b);
      this.idle.push(b);
    }
  }

  acquire(): Block | null {
    return this.idle.pop() ?? null;
  }

  release(block: Block): void {
    block.reset();
    this.idle.push(block);
  }

  get available(): number {
    return this.idle.length;
  }
}
