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
 * a SIGKILL the open .part file is readable up to the last block written. Writes are sequential and
 * asynchronous; a disk that cannot keep up makes the queue grow to its bound, after which blocks are
 * dropped and counted, never waited for. A failed write (disk full) is undone (the file is
 * truncated back to its last whole record), logged and counted, and the sink carries on.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { PipelineStats } from '../control/stats.js';
import { interfaceStatistics } from '../format/pcapng.js';
import type { RecordFramer } from '../format/record-framer.js';
import type { Block } from '../packet/block.js';
import type { BlockSink } from './sink.js';

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

interface OpenFile {
  fd: number;
  part: string;
  final: string;
  size: number;
  openedAt: number;
  packets: number;
  dropsAtOpen: number;
  firstSec: number;
  firstNsec: number;
  lastSec: number;
  lastNsec: number;
}

export class FileSink implements BlockSink {
  readonly name = 'file';
  private file: OpenFile | null = null;
  private readonly queue: Block[] = [];
  private release: ((b: Block) => void) | null = null;
  private writing = false;
  private rotateDue = false;
  private seqNo = 0;
  private readonly completed: string[] = [];
  private timer: NodeJS.Timeout | null = null;
  private closing: Promise<void> | null = null;
  private idle: (() => void) | null = null;
  private readonly rotating: boolean;
  private readonly toStdout: boolean;
  private stopped = false;
  /** Blocks handed to writev and not yet back. */
  private inflight = 0;
  /** Packets dropped for backpressure since the last loss marker. */
  private lostHere = 0;
  private openPending = false;
  packetsWritten = 0;
  bytesWritten = 0;
  filesCompleted = 0;

  constructor(
    private readonly opts: FileSinkOptions,
    private readonly stats: PipelineStats,
    private readonly log: Logger,
  ) {
    this.toStdout = opts.path === '-';
    this.rotating = !this.toStdout && (opts.maxFileBytes > 0 || opts.rotateSeconds > 0);
    if (!this.toStdout) fs.mkdirSync(path.dirname(path.resolve(opts.path)), { recursive: true, mode: 0o700 });
    this.openNext();
    if (this.rotating && opts.rotateSeconds > 0) {
      this.timer = setInterval(() => {
        this.rotateDue = true;
        if (!this.writing && this.queue.length === 0 && this.file && this.file.packets > 0) this.rotateNow();
      }, opts.rotateSeconds * 1000);
      this.timer.unref();
    }
  }

  /** The path being written now (NAME.part), for logs and tests. */
  get currentPath(): string | null {
    return this.file ? this.file.part : null;
  }

  write(block: Block, release: (b: Block) => void): void {
    this.release = release;
    if (this.stopped || this.queue.length + this.inflight >= this.opts.maxQueuedBlocks) {
      this.stats.drop(this.stopped ? 'sink_error' : 'sink_backpressure', block.count);
      if (!this.stopped) this.lostHere += block.count;
      release(block);
      return;
    }
    this.queue.push(block);
    if (!this.writing) this.pump();
  }

  async close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closing = (async () => {
      if (this.timer) clearInterval(this.timer);
      if (this.writing || this.queue.length > 0) await new Promise<void>((resolve) => (this.idle = resolve));
      this.finishFile(true);
    })();
    return this.closing;
  }

  /**
   * Writes every queued block that belongs in the current file with one writev: under load an
   * event-loop turn can last tens of milliseconds, and one block per turn would starve the disk.
   */
  private pump(): void {
    if (this.queue.length === 0) {
      this.writing = false;
      const idle = this.idle;
      this.idle = null;
      idle?.();
      return;
    }
    this.writing = true;
    // After a rotation the next file opens with its first block (as tcpdump -G does), so an idle
    // period leaves no empty files behind.
    if (!this.file && this.openPending) this.openNext();
    const f = this.file;
    const first = this.queue[0]!;
    if (f && this.rotating && f.packets > 0 && (this.rotateDue || (this.opts.maxFileBytes > 0 && f.size + first.used > this.opts.maxFileBytes))) {
      this.rotateNow();
      if (!this.stopped) this.openNext();
    }
    const target = this.file;
    if (!target) {
      const block = this.queue.shift()!;
      this.stats.drop('sink_error', block.count);
      this.release?.(block);
      setImmediate(() => this.pump());
      return;
    }
    this.markLoss(target);
    // The batch: blocks in order, as long as they fit the size limit of this file.
    const batch: Block[] = [];
    let bytes = 0;
    while (this.queue.length > 0) {
      const next = this.queue[0]!;
      if (batch.length > 0 && this.rotating && this.opts.maxFileBytes > 0 && target.size + bytes + next.used > this.opts.maxFileBytes) break;
      batch.push(this.queue.shift()!);
      bytes += next.used;
    }
    this.inflight = batch.length;
    const views = batch.map((b) => b.buf.subarray(0, b.used));
    fs.writev(target.fd, views, (err, written) => {
      this.inflight = 0;
      if (err || written !== bytes) {
        this.writeFailed(target, batch, err ?? new Error(`short write: ${written} of ${bytes} bytes`));
      } else {
        target.size += written;
        this.bytesWritten += written;
        for (const block of batch) {
          target.packets += block.count;
          this.packetsWritten += block.count;
          if (target.packets === block.count) {
            target.firstSec = block.tsSec[0]!;
            target.firstNsec = block.tsNsec[0]!;
          }
          target.lastSec = block.tsSec[block.count - 1]!;
          target.lastNsec = block.tsNsec[block.count - 1]!;
        }
      }
      for (const block of batch) this.release?.(block);
      this.pump();
    });
  }

  /**
   * Blocks dropped because the disk could not keep up leave a mark where they are missing: an
   * interface statistics block with the running drop count and a comment (pcapng only; the
   * metrics count them in every format).
   */
  private markLoss(f: OpenFile): void {
    if (this.lostHere === 0 || !this.opts.framer.carriesAnnotations) return;
    const lost = this.lostHere;
    this.lostHere = 0;
    const now = Date.now();
    const isb = interfaceStatistics({
      startSec: f.packets ? f.firstSec : Math.floor(f.openedAt / 1000),
      startNsec: f.packets ? f.firstNsec : 0,
      endSec: Math.floor(now / 1000),
      endNsec: (now % 1000) * 1e6,
      received: f.packets,
      dropped: this.stats.totalDrops() - f.dropsAtOpen,
      comment: `meshcap: ${lost} packets dropped here: the disk could not keep up (sink_backpressure)`,
    });
    try {
      fs.writeSync(f.fd, isb);
      f.size += isb.length;
    } catch (err) {
      this.log.error({ err: (err as Error).message, file: f.part }, 'cannot write a loss marker');
    }
  }

  private writeFailed(f: OpenFile, blocks: Block[], err: NodeJS.ErrnoException): void {
    const packets = blocks.reduce((n, b) => n + b.count, 0);
    this.stats.drop('sink_error', packets);
    this.log.error({ err: err.message, code: err.code, file: f.part, packets }, 'capture write failed; packets dropped');
    // Cut any partial record so the file stays readable.
    try {
      if (!this.toStdout) fs.ftruncateSync(f.fd, f.size);
    } catch {
      /* the file may be gone; the next write reports it */
    }
  }

  /** Completes the open file; the next one opens when the next block arrives. */
  private rotateNow(): void {
    this.rotateDue = false;
    this.finishFile(false);
    if (this.opts.maxFiles && this.filesCompleted >= this.opts.maxFiles) {
      this.stopped = true;
      this.opts.onAutostop?.(`files:${this.opts.maxFiles}`);
      return;
    }
    this.openPending = true;
  }

  private openNext(): void {
    this.openPending = false;
    const final = this.nextName();
    try {
      const part = this.toStdout ? '-' : `${final}.part`;
      const fd = this.toStdout ? 1 : fs.openSync(part, 'w', 0o600);
      const header = this.opts.framer.fileHeader({ snaplen: this.opts.snaplen });
      fs.writeSync(fd, header);
      this.file = {
        fd,
        part,
        final,
        size: header.length,
        openedAt: Date.now(),
        packets: 0,
        dropsAtOpen: this.stats.totalDrops(),
        firstSec: 0,
        firstNsec: 0,
        lastSec: 0,
        lastNsec: 0,
      };
      this.log.info({ file: part }, 'capture file opened');
    } catch (err) {
      this.file = null;
      this.log.error({ err: (err as Error).message, file: final }, 'cannot open capture file');
    }
  }

  /** Writes the ISB, closes and renames the open file; `last` at shutdown (no file follows). */
  private finishFile(last: boolean): void {
    const f = this.file;
    if (!f) return;
    this.file = null;
    try {
      if (this.opts.framer.carriesAnnotations) {
        const now = Date.now();
        const isb = interfaceStatistics({
          startSec: f.packets ? f.firstSec : Math.floor(f.openedAt / 1000),
          startNsec: f.packets ? f.firstNsec : 0,
          endSec: f.packets ? f.lastSec : Math.floor(now / 1000),
          endNsec: f.packets ? f.lastNsec : 0,
          received: f.packets,
          dropped: this.stats.totalDrops() - f.dropsAtOpen,
        });
        fs.writeSync(f.fd, isb);
      }
      if (this.toStdout) return;
      fs.closeSync(f.fd);
      fs.renameSync(f.part, f.final);
      this.filesCompleted++;
      this.completed.push(f.final);
      this.log.info({ file: f.final, packets: f.packets, bytes: f.size }, 'capture file completed');
      this.trimRing(last);
    } catch (err) {
      this.log.error({ err: (err as Error).message, file: f.part }, 'cannot complete capture file');
    }
  }

  /** -W: delete the oldest completed files beyond the ring size (a file about to open counts). */
  private trimRing(last: boolean): void {
    const keep = this.opts.ringFiles;
    if (!keep) return;
    while (this.completed.length > (last ? keep : keep - 1)) {
      const old = this.completed.shift()!;
      try {
        fs.unlinkSync(old);
      } catch (err) {
        this.log.warn({ err: (err as Error).message, file: old }, 'cannot remove old ring file');
      }
    }
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
