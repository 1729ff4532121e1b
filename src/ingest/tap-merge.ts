/**
 * Many tap files merged into one stream of events in time order, in bounded memory: a k-way merge
 * (binary heap) over TapFileReaders, each holding one batch of its file.
 *
 * Ties between files go to the file named first, and a file's own events keep their order, so the
 * result is what a stable sort of every event of every file by time gave when convert read
 * everything first (for files in time order; see tap-file-reader.ts for the others).
 *
 * Memory. Each file reads in chunks of `memoryBytes / files` (64 KiB to 1 MiB: larger measured no
 * faster, and a chunk read just before it is sliced is still in the CPU caches; a smaller file
 * costs its size) and holds no descriptor between reads. When the files in play need more than
 * the budget, the readers whose next event is furthest in the future are parked: they keep their
 * next key, give their memory back, and are resumed (their batch read again) when their turn
 * comes. So memory follows the number of connections open at the same time, not the input size
 * nor the number of files.
 */
import type { TapEventHandler } from './tap-event.js';
import { ReaderState, TapFileReader } from './tap-file-reader.js';
import type { TapFileFormat } from './tap-file.js';
import { ChunkPool } from './tap-file-source.js';

export interface MergeOptions {
  /** Input buffers of all files together (a file's largest message may add to it). */
  memoryBytes: number;
  /** Largest message accepted (length-delimited and JSON formats). */
  maxMessageBytes: number;
  /** Read size per file; by default the budget shared out (64 KiB to 1 MiB). */
  chunkBytes?: number;
}

export const DEFAULT_MERGE: MergeOptions = {
  memoryBytes: 64 * 1024 * 1024,
  maxMessageBytes: 256 * 1024 * 1024,
};

const MIN_CHUNK = 64 * 1024;
const MAX_CHUNK = 1024 * 1024;
const SPARE_CHUNKS = 16;

/** Thrown when a file cannot be read; names the file. */
export class TapFileError extends Error {
  constructor(
    readonly file: string,
    cause: Error,
  ) {
    super(cause.message);
  }
}

export class TapMerge {
  readonly readers: TapFileReader[] = [];
  /** Readers with events left, by the key of their next event. */
  private readonly heap: KeyHeap;
  /** Readers holding a batch in memory, and the bytes they hold. */
  private readonly held = new Set<TapFileReader>();
  private heldBytes = 0;
  private current: TapFileReader | null = null;
  private merging = false;
  private readonly pool: ChunkPool;

  /** `files`: how many will be added (the memory budget is shared out among them). */
  constructor(
    files: number,
    private readonly handler: TapEventHandler,
    private readonly opts: MergeOptions = DEFAULT_MERGE,
  ) {
    const chunk = opts.chunkBytes ?? Math.min(MAX_CHUNK, Math.max(MIN_CHUNK, Math.floor(opts.memoryBytes / Math.max(1, files) / MIN_CHUNK) * MIN_CHUNK));
    // Spare chunks kept for reuse (parked and finished readers give theirs back): a few, outside
    // the budget, enough that resuming a reader rarely faults in fresh memory.
    this.pool = new ChunkPool(chunk, SPARE_CHUNKS);
    this.heap = new KeyHeap(files);
  }

  /**
   * Adds a file and reads its first batch now, so that a file that cannot be read fails here, in
   * the order the files are given (TapFileError), before anything is converted.
   */
  add(file: string, format: TapFileFormat): TapFileReader {
    if (this.merging) throw new Error('TapMerge: add every file before the first next()');
    const r = new TapFileReader(this.readers.length, file, format, this.handler, this.pool, this.opts.maxMessageBytes);
    this.readers.push(r);
    let more: boolean;
    try {
      more = r.start();
    } catch (err) {
      throw new TapFileError(file, err as Error);
    }
    if (more) {
      this.held.add(r);
      this.heldBytes += r.memory;
      this.heap.push(r.index, r.headSec, r.headNsec);
      if (this.heldBytes > this.opts.memoryBytes) this.enforceBudget(null);
    }
    return r;
  }

  /**
   * The reader whose head (`peek()`) is the next event, or null at the end. The event must be
   * consumed before the next call, which moves past it.
   */
  next(): TapFileReader | null {
    this.merging = true;
    const cur = this.current;
    if (cur !== null) {
      this.current = null;
      const before = cur.memory;
      let more: boolean;
      try {
        more = cur.advance();
      } catch (err) {
        throw new TapFileError(cur.file, err as Error);
      }
      this.heldBytes += cur.memory - before;
      if (more) this.heap.rekeyTop(cur.headSec, cur.headNsec);
      else {
        this.held.delete(cur);
        this.heap.pop();
      }
    }
    if (this.heap.size === 0) return null;
    const top = this.readers[this.heap.top()]!;
    if (top.state === ReaderState.Parked) {
      try {
        top.resume();
      } catch (err) {
        throw new TapFileError(top.file, err as Error);
      }
      this.held.add(top);
      this.heldBytes += top.memory;
    }
    if (this.heldBytes > this.opts.memoryBytes) this.enforceBudget(top);
    this.current = top;
    return top;
  }

  /** Input bytes read so far, all files (for progress). */
  consumed(): number {
    let n = 0;
    for (const r of this.readers) n += r.consumed;
    return n;
  }

  /** Bytes of all files added. */
  totalBytes(): number {
    let n = 0;
    for (const r of this.readers) n += r.size;
    return n;
  }

  /** Parks the readers that will be needed last until the held memory fits the budget. */
  private enforceBudget(keep: TapFileReader | null): void {
    while (this.heldBytes > this.opts.memoryBytes) {
      let victim: TapFileReader | null = null;
      for (const r of this.held) {
        if (r === keep || r.state !== ReaderState.Buffered) continue;
        if (victim === null || later(r, victim)) victim = r;
      }
      if (victim === null) return;
      this.heldBytes -= victim.memory;
      victim.park();
      this.held.delete(victim);
    }
  }
}

/** a's head comes after b's. */
function later(a: TapFileReader, b: TapFileReader): boolean {
  return a.headSec !== b.headSec ? a.headSec > b.headSec : a.headNsec !== b.headNsec ? a.headNsec > b.headNsec : a.index > b.index;
}

/**
 * A binary min-heap of reader indexes by (seconds, nanoseconds, index), keys held in typed arrays
 * beside the indexes: with thousands of files, comparing keys in place instead of through reader
 * objects spread over the heap keeps the merge out of cache misses.
 */
class KeyHeap {
  private id: Int32Array;
  private sec: Float64Array;
  private nsec: Float64Array;
  size = 0;

  constructor(capacity: number) {
    this.id = new Int32Array(Math.max(1, capacity));
    this.sec = new Float64Array(this.id.length);
    this.nsec = new Float64Array(this.id.length);
  }

  top(): number {
    return this.id[0]!;
  }

  push(id: number, sec: number, nsec: number): void {
    if (this.size === this.id.length) this.grow();
    let i = this.size++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.after(p, id, sec, nsec)) break;
      this.move(p, i);
      i = p;
    }
    this.put(i, id, sec, nsec);
  }

  /** The top's key changed (it can only grow): moves it down to its place. */
  rekeyTop(sec: number, nsec: number): void {
    this.siftDown(this.id[0]!, sec, nsec);
  }

  pop(): void {
    const last = --this.size;
    if (last > 0) this.siftDown(this.id[last]!, this.sec[last]!, this.nsec[last]!);
  }

  private siftDown(id: number, sec: number, nsec: number): void {
    const n = this.size;
    let i = 0;
    for (;;) {
      let c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && this.after(c, this.id[c + 1]!, this.sec[c + 1]!, this.nsec[c + 1]!)) c++;
      if (!this.after2(id, sec, nsec, c)) break;
      this.move(c, i);
      i = c;
    }
    this.put(i, id, sec, nsec);
  }

  /** Entry at slot i comes after (id, sec, nsec). */
  private after(i: number, id: number, sec: number, nsec: number): boolean {
    const s = this.sec[i]!;
    if (s !== sec) return s > sec;
    const ns = this.nsec[i]!;
    return ns !== nsec ? ns > nsec : this.id[i]! > id;
  }

  /** (id, sec, nsec) comes after the entry at slot i. */
  private after2(id: number, sec: number, nsec: number, i: number): boolean {
    const s = this.sec[i]!;
    if (s !== sec) return sec > s;
    const ns = this.nsec[i]!;
    return ns !== nsec ? nsec > ns : id > this.id[i]!;
  }

  private grow(): void {
    const n = this.id.length * 2;
    const id = new Int32Array(n);
    const sec = new Float64Array(n);
    const nsec = new Float64Array(n);
    id.set(this.id);
    sec.set(this.sec);
    nsec.set(this.nsec);
    this.id = id;
    this.sec = sec;
    this.nsec = nsec;
  }

  private move(from: number, to: number): void {
    this.id[to] = this.id[from]!;
    this.sec[to] = this.sec[from]!;
    this.nsec[to] = this.nsec[from]!;
  }

  private put(i: number, id: number, sec: number, nsec: number): void {
    this.id[i] = id;
    this.sec[i] = sec;
    this.nsec[i] = nsec;
  }
}
