/**
 * Block: a preallocated arena of finished frames plus their metadata, the unit handed to sinks.
 *
 * The slicer writes each frame once, straight into the block, leaving room before and after it
 * for the record framing of the primary output format (pcapng EPB, pcap record header), which the
 * framer fills in place. A file sink then writes `buf[0, used)` as it is: the payload is copied
 * once, from the received message into the block. Sinks that need another format re-frame from the
 * metadata (frameOff/capLen/...).
 */
import type { RecordFramer } from '../format/record-framer.js';
import { kernelMemory, type Kernel } from './wasm-kernel.js';

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
  used = 0;
  count = 0;
  readonly frameOff: Uint32Array;
  readonly capLen: Uint32Array;
  readonly origLen: Uint32Array;
  readonly tsSec: Float64Array;
  readonly tsNsec: Uint32Array;
  readonly dir: Uint8Array;
  readonly flowId: Uint32Array;
  /** Sparse per-frame extras: comment text (UTF-8) and packets known lost before the frame. */
  readonly comment: (Buffer | null)[];
  readonly dropCount: Uint32Array;
  /** Sinks still holding this block; the pool takes it back at zero. */
  refs = 0;
  /** Wall-clock ms when the first frame went in (flush deadline, latency metrics). */
  firstFrameAt = 0;

  /** Where buf starts in the WebAssembly memory, and the packet kernel over it (null: JS path). */
  readonly base: number;
  readonly kernel: Kernel | null;

  /** `arena`: the kernel whose memory holds a pool's blocks, and this block's offset in it. */
  constructor(
    readonly size: number,
    readonly framer: RecordFramer,
    readonly maxFrames: number,
    arena?: { kernel: Kernel; offset: number },
  ) {
    if (arena) {
      this.buf = Buffer.from(arena.kernel.memory.buffer, arena.offset, size);
      this.base = arena.offset;
      this.kernel = arena.kernel;
    } else {
      // A non-pooled ArrayBuffer at offset 0, so the word view lines up with buf.
      this.buf = Buffer.allocUnsafeSlow(size);
      this.base = 0;
      this.kernel = null;
    }
    this.buf.fill(0); // touch every page now, not on the hot path
    // Word view over the whole underlying memory: index (byteOffset + offset) >>> 2.
    this.u32 = new Uint32Array(this.buf.buffer, this.base, size >>> 2);
    this.frameOff = new Uint32Array(maxFrames);
    this.capLen = new Uint32Array(maxFrames);
    this.origLen = new Uint32Array(maxFrames);
    this.tsSec = new Float64Array(maxFrames);
    this.tsNsec = new Uint32Array(maxFrames);
    this.dir = new Uint8Array(maxFrames);
    this.flowId = new Uint32Array(maxFrames);
    this.comment = new Array<Buffer | null>(maxFrames).fill(null);
    this.dropCount = new Uint32Array(maxFrames);
  }

  reset(): void {
    for (let i = 0; i < this.count; i++) {
      this.comment[i] = null;
      this.dropCount[i] = 0;
    }
    this.used = 0;
    this.count = 0;
    this.refs = 0;
    this.firstFrameAt = 0;
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

  /** `useKernel` false: the JavaScript path only (tests compare the two byte for byte). */
  constructor(count: number, size: number, framer: RecordFramer, useKernel = true) {
    // The smallest record is a TCP ACK frame (54 bytes) plus framing.
    const maxFrames = Math.ceil(size / (54 + framer.minOverhead));
    // Blocks 64-byte aligned inside one WebAssembly memory, so the packet kernel works in place.
    const stride = (size + 63) & ~63;
    const kernel = useKernel ? kernelMemory(stride * count) : null;
    for (let i = 0; i < count; i++) {
      const b = new Block(size, framer, maxFrames, kernel ? { kernel, offset: i * stride } : undefined);
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
