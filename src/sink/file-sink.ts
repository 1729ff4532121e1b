/**
 * Writes capture files to disk, with rotation like dumpcap/tcpdump.
 *
 *  - `-w FILE` alone: one file, FILE.
 *  - `-C MB` (millions of bytes, as tcpdump) and/or `-G SECONDS`: a ring of files named like
 *    dumpcap's, `STEM_NNNNN_YYYYmmddHHMMSS.EXT`; `-W N` keeps only the newest N.
 *  - Every file is written as NAME.part and renamed when complete, so a completed name is always a
 *    whole capture. Files are created mode 0600: they hold plaintext.
 *  - `-w -` writes one endless stream to standard output (pipe it into `wireshark -k -i -`).
 *
 * Blocks are written as they arrive (the pipeline flushes at least every flush interval), so after
 * a SIGKILL the open .part file is readable up to the last block written. The files are written by
 * the capture writer thread (capture-writer-thread.ts), straight from the blocks' shared memory and
 * by direct I/O where the filesystem allows (capture-file.ts); this side decides what goes where
 * (rotation, ring, loss markers) and never waits. A disk that cannot keep up makes the queue grow to
 * its bound, after which blocks are dropped and counted. A failed write (disk full) is undone (the
 * file is truncated back to its last whole record), logged and counted, and the sink carries on.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import type { PipelineStats } from '../control/stats.js';
import { interfaceStatistics } from '../format/pcapng.js';
import type { RecordFramer } from '../format/record-framer.js';
import { PAGE, type Block } from '../packet/block.js';
import { DONE_OK, type WriterCommand, type WriterInit, type WriterReply } from './capture-writer-thread.js';
import type { BlockSink } from './sink.js';
import { startWriterThread } from './writer-thread-start.js';

export interface FileSinkOptions {
  /** -w: file path, or '-' for standard output. */
  path: string;
  framer: RecordFramer;
  snaplen: number;
  /** -C: rotate when a file would exceed this many bytes (0 = off). */
  maxFileBytes: number;
  /** -G: rotate every this many seconds (0 = off). */
  rotateSeconds: number;
  /** -W: keep at most this many files (0 = all). */
  ringFiles: number;
  /** -a files:N — stop after this many files (0 = never). Calls onAutostop. */
  maxFiles?: number;
  /** Blocks allowed to wait for the disk before new ones are dropped. */
  maxQueuedBlocks: number;
  onAutostop?: (reason: string) => void;
}

/** The file being written, as this side sees it (commands sent, not necessarily done). */
interface OpenFile {
  part: string;
  /** Predicted size once every command sent so far is done (lays out the next block). */
  size: number;
  /** Packets sent to this file. */
  packets: number;
}

export class FileSink implements BlockSink {
  readonly name = 'file';
  private file: OpenFile | null = null;
  private readonly worker: Worker;
  /** Blocks sent to the thread and not yet answered, by sequence number, with their release. */
  private readonly inflight = new Map<number, { block: Block; release: (b: Block) => void }>();
  private seq = 0;
  /** The next sequence number to take back, and the thread's published outcomes (see WriterInit). */
  private reaped = 1;
  private readonly results: Int32Array;
  private readonly memories = new Map<ArrayBufferLike, number>();
  private rotateDue = false;
  private timer: NodeJS.Timeout | null = null;
  private closing: Promise<void> | null = null;
  private drained: (() => void) | null = null;
  private readonly exited: Promise<void>;
  private readonly rotating: boolean;
  private readonly toStdout: boolean;
  /** The file header every file begins with (the same for all: one snaplen, one framer). */
  private readonly header: Buffer;
  private stopped = false;
  private failed = false;
  /** Files completed by rotation so far (-a files:N counts them). */
  private filesFinished = 0;
  private seqNo = 0;
  /** Packets dropped for backpressure since the last loss marker. */
  private lostHere = 0;
  private openPending = false;
  /** Failed writes, logged at most once a second (a full disk fails every block). */
  private readonly failures: FailureLog;
  packetsWritten = 0;
  bytesWritten = 0;
  /** Of bytesWritten, what went to disk by direct I/O (the rest through the page cache). */
  directBytesWritten = 0;
  filesCompleted = 0;
  /** Settles when the first file has been created (or could not be: that is logged). */
  readonly ready: Promise<void>;
  private firstOpened: (() => void) | null = null;

  constructor(
    private readonly opts: FileSinkOptions,
    private readonly stats: PipelineStats,
    private readonly log: Logger,
  ) {
    this.failures = new FailureLog(log);
    this.toStdout = opts.path === '-';
    this.rotating = !this.toStdout && (opts.maxFileBytes > 0 || opts.rotateSeconds > 0);
    this.header = opts.framer.fileHeader({ snaplen: opts.snaplen });
    if (!this.toStdout) fs.mkdirSync(path.dirname(path.resolve(opts.path)), { recursive: true, mode: 0o700 });
    // One outcome slot per block that may be in flight, plus the "last done" word.
    this.results = new Int32Array(new SharedArrayBuffer(4 * (opts.maxQueuedBlocks + 2)));
    const init: WriterInit = {
      annotations: opts.framer.carriesAnnotations,
      // Direct I/O where the filesystem allows it; MESHCAP_NO_DIRECT_IO=1 turns it off (diagnostics).
      direct: !this.toStdout && !process.env.MESHCAP_NO_DIRECT_IO,
      ringFiles: opts.ringFiles,
      results: this.results,
    };
    this.worker = startWriterThread();
    this.worker.ref();
    this.send({ op: 'init', init });
    this.worker.on('message', (r: WriterReply) => this.onReply(r));
    this.exited = new Promise((resolve) =>
      this.worker.once('exit', (code) => {
        // Before close() asked it to, the thread is gone: the same as a crash.
        if (!this.closing && !this.failed) this.onThreadError(new Error(`exited with code ${code}`));
        resolve();
      }),
    );
    this.worker.on('error', (err) => this.onThreadError(err));
    this.ready = new Promise((resolve) => (this.firstOpened = resolve));
    this.openNext();
    if (this.rotating && opts.rotateSeconds > 0) {
      this.timer = setInterval(() => {
        this.rotateDue = true;
        if (this.inflight.size === 0 && this.file && this.file.packets > 0) this.rotateNow();
      }, opts.rotateSeconds * 1000);
      this.timer.unref();
    }
  }

  /** The path being written now (NAME.part), for logs and tests. */
  get currentPath(): string | null {
    return this.file ? this.file.part : null;
  }

  /**
   * The next block's records should start where the file's next byte sits within its page: then
   * the thread can write the block's whole pages by direct I/O. A guess when a rotation or a drop
   * intervenes (that block then goes through the page cache, nothing else changes).
   */
  nextBlockLead(): number {
    if (this.toStdout) return 0;
    const size = this.file && !this.openPending ? this.file.size : this.header.length;
    return size & (PAGE - 1);
  }

  write(block: Block, release: (b: Block) => void): void {
    this.reap();
    const down = this.stopped || this.failed || this.closing !== null;
    if (down || this.inflight.size >= this.opts.maxQueuedBlocks) {
      this.stats.drop(down ? 'sink_error' : 'sink_backpressure', block.count);
      if (!down) this.lostHere += block.count;
      release(block);
      return;
    }
    const len = block.recordBytes;
    // After a rotation the next file opens with its first block (as tcpdump -G does), so an idle
    // period leaves no empty files behind.
    if (this.openPending || !this.file) this.openNext();
    let f = this.file!;
    if (this.rotating && f.packets > 0 && (this.rotateDue || (this.opts.maxFileBytes > 0 && f.size + len > this.opts.maxFileBytes))) {
      this.rotateNow();
      if (this.stopped) {
        this.stats.drop('sink_error', block.count);
        release(block);
        return;
      }
      this.openNext();
      f = this.file!;
    }
    this.markLoss(f);
    const seq = ++this.seq;
    f.size += len;
    f.packets += block.count;
    this.inflight.set(seq, { block, release });
    const count = block.count;
    this.send({
      op: 'block',
      seq,
      mem: this.memoryId(block.buf.buffer),
      off: block.buf.byteOffset + block.start,
      len,
      packets: count,
      firstSec: block.tsSec[0]!,
      firstNsec: block.tsNsec[0]!,
      lastSec: block.tsSec[count - 1]!,
      lastNsec: block.tsNsec[count - 1]!,
    });
  }

  async close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closing = (async () => {
      if (this.timer) clearInterval(this.timer);
      if (!this.failed) {
        this.send({ op: 'finish', totalDrops: this.stats.totalDrops(), now: Date.now(), last: true });
        this.file = null;
        this.send({ op: 'exit' });
      }
      if (this.inflight.size > 0 && !this.failed) await new Promise<void>((resolve) => (this.drained = resolve));
      await this.exited;
      this.failures.flush();
    })();
    return this.closing;
  }

  private send(c: WriterCommand): void {
    this.worker.postMessage(c);
  }

  /** The thread's id for a block memory, sent to it the first time (shared, never copied). */
  private memoryId(buffer: ArrayBufferLike): number {
    let id = this.memories.get(buffer);
    if (id === undefined) {
      if (!(buffer instanceof SharedArrayBuffer)) throw new TypeError('FileSink: blocks must live in shared memory (BlockPool)');
      id = this.memories.size;
      this.memories.set(buffer, id);
      this.send({ op: 'memory', id, sab: buffer });
    }
    return id;
  }

  /**
   * Takes back every block the thread has finished with, in order, reading its published outcomes:
   * called for each block dispatched, so blocks return even while a long event-loop turn keeps the
   * thread's messages waiting.
   */
  private reap(): void {
    const r = this.results;
    const done = Atomics.load(r, 0);
    while (this.reaped <= done) {
      const seq = this.reaped++;
      const entry = this.inflight.get(seq);
      if (!entry) continue;
      this.inflight.delete(seq);
      const { block, release } = entry;
      if (r[1 + (seq % (r.length - 1))] === DONE_OK) {
        this.packetsWritten += block.count;
        this.bytesWritten += block.recordBytes;
      } else {
        // Logged when its message arrives, with the error.
        this.stats.drop('sink_error', block.count);
      }
      release(block);
    }
  }

  private onReply(r: WriterReply): void {
    switch (r.op) {
      case 'done': {
        if (r.ok) this.directBytesWritten += r.direct;
        else {
          this.failures.add(r);
          // The blocks sent after this one land that much earlier than predicted.
          if (this.file && this.file.part === r.part) this.file.size -= r.undone;
        }
        this.reap();
        if (this.inflight.size === 0) this.onIdle();
        return;
      }
      case 'log':
        this.log[r.level](r.obj, r.msg);
        return;
      case 'opened':
        this.firstOpened?.();
        this.firstOpened = null;
        return;
      case 'completed':
        this.filesCompleted++;
        return;
      case 'exited':
        return;
    }
  }

  /** Nothing in flight: a -G rotation that came due meanwhile, or close() waiting. */
  private onIdle(): void {
    if (this.rotateDue && !this.closing && this.file && this.file.packets > 0) this.rotateNow();
    const drained = this.drained;
    this.drained = null;
    drained?.();
  }

  /** The thread died (a bug, or out of memory): nothing more can be written; say so, count it. */
  private onThreadError(err: Error): void {
    this.failed = true;
    this.log.error({ err: err.message }, 'capture writer thread failed; packets are dropped from now on');
    for (const { block, release } of this.inflight.values()) {
      this.stats.drop('sink_error', block.count);
      release(block);
    }
    this.inflight.clear();
    this.drained?.();
    this.firstOpened?.();
  }

  /**
   * Blocks dropped because the disk could not keep up leave a mark where they are missing: an
   * interface statistics block with the running drop count and a comment (pcapng only; the
   * metrics count them in every format).
   */
  private markLoss(f: OpenFile): void {
    if (this.lostHere === 0 || !this.opts.framer.carriesAnnotations) return;
    const comment = `meshcap: ${this.lostHere} packets dropped here: the disk could not keep up (sink_backpressure)`;
    this.lostHere = 0;
    this.send({ op: 'marker', comment, totalDrops: this.stats.totalDrops(), now: Date.now() });
    f.size += isbLength(comment);
  }

  /** Completes the open file; the next one opens when the next block arrives. */
  private rotateNow(): void {
    this.rotateDue = false;
    this.send({ op: 'finish', totalDrops: this.stats.totalDrops(), now: Date.now(), last: false });
    this.file = null;
    this.filesFinished++;
    if (this.opts.maxFiles && this.filesFinished >= this.opts.maxFiles) {
      this.stopped = true;
      this.opts.onAutostop?.(`files:${this.opts.maxFiles}`);
      return;
    }
    this.openPending = true;
  }

  private openNext(): void {
    this.openPending = false;
    const final = this.nextName();
    const part = this.toStdout ? '-' : `${final}.part`;
    this.send({ op: 'open', part, final, header: this.header, openedAt: Date.now(), dropsAtOpen: this.stats.totalDrops() });
    this.file = { part, size: this.header.length, packets: 0 };
  }

  private nextName(): string {
    if (!this.rotating) return this.opts.path;
    this.seqNo++;
    const ext = path.extname(this.opts.path);
    const stem = ext ? this.opts.path.slice(0, -ext.length) : this.opts.path;
    const d = new Date();
    const p2 = (n: number): string => String(n).padStart(2, '0');
    const stamp = `${d.getFullYear()}${p2(d.getMonth() + 1)}${p2(d.getDate())}${p2(d.getHours())}${p2(d.getMinutes())}${p2(d.getSeconds())}`;
    return `${stem}_${String(this.seqNo).padStart(5, '0')}_${stamp}${ext}`;
  }
}

/**
 * The first failed write is logged at once; those that follow within a second are summed into one
 * line at the end of it (blocks, packets, the last error), so a full disk gives a line a second and
 * the lines still add up to the packets counted as `sink_error`.
 */
class FailureLog {
  private blocks = 0;
  private packets = 0;
  private last: Extract<WriterReply, { op: 'done'; ok: false }> | null = null;
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly log: Logger) {}

  add(r: Extract<WriterReply, { op: 'done'; ok: false }>): void {
    if (this.timer === null) {
      this.write(r, 1, r.packets);
      this.timer = setTimeout(() => this.flush(), 1000);
      this.timer.unref();
      return;
    }
    this.blocks++;
    this.packets += r.packets;
    this.last = r;
  }

  /** Logs what was summed so far. */
  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.last) this.write(this.last, this.blocks, this.packets);
    this.last = null;
    this.blocks = 0;
    this.packets = 0;
  }

  private write(r: Extract<WriterReply, { op: 'done'; ok: false }>, blocks: number, packets: number): void {
    this.log.error({ err: r.err, code: r.code, file: r.part, blocks, packets }, 'capture write failed; packets dropped');
  }
}

/** Length of a loss marker ISB with this comment (its other options are fixed-size). */
function isbLength(comment: string): number {
  return interfaceStatistics({ startSec: 0, startNsec: 0, endSec: 0, endNsec: 0, received: 0, dropped: 0, comment }).length;
}
