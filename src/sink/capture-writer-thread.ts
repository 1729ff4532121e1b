/**
 * The capture writer thread: owns the file sink's files and does all of their blocking work (open,
 * write, statistics blocks, close, rename, ring trimming) off the ingest thread.
 *
 * Why a thread: the ingest thread's event-loop turns last milliseconds under load; a write whose
 * completion waits for the next turn leaves the disk idle, and a rename or an unlink of a large
 * ring file blocks ingest outright. Here the commands (FileSink, src/sink/file-sink.ts) arrive in
 * order over the port and run one after another with synchronous calls; blocks are written straight
 * from the pipeline's shared memory (no copy: the thread gets the SharedArrayBuffer once, then
 * offsets). Each block's outcome is published in shared memory at once, so the ingest thread takes
 * written blocks back whenever it dispatches the next one, even in the middle of a long event-loop
 * turn; a `done` message follows (errors, and waking an idle ingest thread).
 */
import fs from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { interfaceStatistics } from '../format/pcapng.js';
import { CaptureFile } from './capture-file.js';

export interface WriterInit {
  /** pcapng: statistics blocks (ISB) for loss markers and at the end of each file. */
  annotations: boolean;
  /** Use direct I/O where the filesystem allows it. */
  direct: boolean;
  /** -W: keep at most this many completed files (0 = all). */
  ringFiles: number;
  /**
   * Block results the ingest thread reads without waiting for a message: [0] the last block
   * sequence number done, [1 + seq % (length - 1)] its outcome (DONE_OK or DONE_FAILED).
   */
  results: Int32Array;
}

export const DONE_OK = 1;
export const DONE_FAILED = 2;

/** Main → thread, in order; `init` first. */
export type WriterCommand =
  | { op: 'init'; init: WriterInit }
  | { op: 'memory'; id: number; sab: SharedArrayBuffer }
  | { op: 'open'; part: string; final: string; header: Uint8Array; openedAt: number; dropsAtOpen: number }
  | { op: 'block'; seq: number; mem: number; off: number; len: number; packets: number; firstSec: number; firstNsec: number; lastSec: number; lastNsec: number }
  | { op: 'marker'; comment: string; totalDrops: number; now: number }
  | { op: 'finish'; totalDrops: number; now: number; last: boolean }
  | { op: 'exit' };

/** Thread → main. */
export type WriterReply =
  /** `direct`: bytes of the block that went to disk by direct I/O. */
  | { op: 'done'; seq: number; ok: true; direct: number }
  /** `undone`: bytes of the block that are not in the file `part` (all of them). */
  | { op: 'done'; seq: number; ok: false; part: string | null; undone: number; packets: number; err: string; code?: string }
  | { op: 'log'; level: 'info' | 'warn' | 'error'; msg: string; obj: Record<string, unknown> }
  | { op: 'opened'; part: string; ok: boolean }
  | { op: 'completed'; final: string; packets: number; bytes: number }
  | { op: 'exited' };

interface Open {
  file: CaptureFile;
  part: string;
  final: string;
  openedAt: number;
  dropsAtOpen: number;
  packets: number;
  firstSec: number;
  firstNsec: number;
  lastSec: number;
  lastNsec: number;
}

class CaptureWriter {
  private readonly memories: SharedArrayBuffer[] = [];
  private open: Open | null = null;
  /** The part name of a file that could not be opened: its blocks fail until the next open. */
  private failed: string | null = null;
  private readonly completed: string[] = [];
  /** Ring files being deleted. */
  private unlinking = 0;
  private unlinked: (() => void) | null = null;

  constructor(
    private readonly init: WriterInit,
    private readonly reply: (r: WriterReply) => void,
  ) {}

  handle(c: WriterCommand): void {
    switch (c.op) {
      case 'init':
        return;
      case 'memory':
        this.memories[c.id] = c.sab;
        return;
      case 'open':
        return this.openFile(c);
      case 'block':
        return this.block(c);
      case 'marker':
        return this.marker(c);
      case 'finish':
        return this.finish(c);
      case 'exit':
        // Once the last deletions are done: the thread then ends (its port closes).
        this.whenUnlinked(() => this.reply({ op: 'exited' }));
        return;
    }
  }

  private log(level: 'info' | 'warn' | 'error', obj: Record<string, unknown>, msg: string): void {
    this.reply({ op: 'log', level, obj, msg });
  }

  private openFile(c: Extract<WriterCommand, { op: 'open' }>): void {
    this.failed = null;
    let file: CaptureFile | null = null;
    try {
      file = c.part === '-' ? CaptureFile.stream(1, '-') : CaptureFile.create(c.part, this.init.direct);
      file.append(c.header);
      this.open = { file, part: c.part, final: c.final, openedAt: c.openedAt, dropsAtOpen: c.dropsAtOpen, packets: 0, firstSec: 0, firstNsec: 0, lastSec: 0, lastNsec: 0 };
      this.log('info', { file: c.part, direct_io: file.direct }, 'capture file opened');
      this.reply({ op: 'opened', part: c.part, ok: true });
    } catch (err) {
      try {
        file?.close();
      } catch {
        /* the open error is the one to report */
      }
      this.open = null;
      this.failed = c.part;
      this.log('error', { err: (err as Error).message, file: c.final }, 'cannot open capture file');
      this.reply({ op: 'opened', part: c.part, ok: false });
    }
  }

  /** Publishes a block's outcome (before the message, which may wait for the ingest thread's loop). */
  private result(seq: number, outcome: number): void {
    const r = this.init.results;
    r[1 + (seq % (r.length - 1))] = outcome;
    Atomics.store(r, 0, seq);
  }

  private block(c: Extract<WriterCommand, { op: 'block' }>): void {
    const f = this.open;
    if (!f) {
      this.result(c.seq, DONE_FAILED);
      this.reply({ op: 'done', seq: c.seq, ok: false, part: this.failed, undone: c.len, packets: c.packets, err: `no open capture file${this.failed ? ` (${this.failed} could not be opened)` : ''}` });
      return;
    }
    const before = f.file.size;
    const directBefore = f.file.directBytes;
    try {
      f.file.append(new Uint8Array(this.memories[c.mem]!, c.off, c.len));
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      // Cut any partial record so the file stays readable.
      try {
        f.file.truncate(before);
      } catch {
        /* the file may be gone; the next write reports it */
      }
      this.result(c.seq, DONE_FAILED);
      this.reply({ op: 'done', seq: c.seq, ok: false, part: f.part, undone: c.len, packets: c.packets, err: e.message, ...(e.code ? { code: e.code } : {}) });
      return;
    }
    if (f.packets === 0) {
      f.firstSec = c.firstSec;
      f.firstNsec = c.firstNsec;
    }
    f.packets += c.packets;
    f.lastSec = c.lastSec;
    f.lastNsec = c.lastNsec;
    this.result(c.seq, DONE_OK);
    this.reply({ op: 'done', seq: c.seq, ok: true, direct: f.file.directBytes - directBefore });
  }

  /** An ISB where blocks are missing (pcapng): the running totals and why. */
  private marker(c: Extract<WriterCommand, { op: 'marker' }>): void {
    const f = this.open;
    if (!f || !this.init.annotations) return;
    try {
      f.file.append(this.statistics(f, c.totalDrops, c.now, false, c.comment));
    } catch (err) {
      this.log('error', { err: (err as Error).message, file: f.part }, 'cannot write a loss marker');
    }
  }

  /** Writes the closing ISB, closes and renames the file, trims the ring. */
  private finish(c: Extract<WriterCommand, { op: 'finish' }>): void {
    const f = this.open;
    if (!f) return;
    this.open = null;
    if (this.init.annotations) {
      const before = f.file.size;
      try {
        f.file.append(this.statistics(f, c.totalDrops, c.now, true));
      } catch (err) {
        // The file is whole without its closing statistics (a full disk): complete it anyway.
        this.log('warn', { err: (err as Error).message, file: f.part }, 'cannot write the closing statistics block');
        try {
          f.file.truncate(before);
        } catch {
          /* reported by the rename or the next open */
        }
      }
    }
    try {
      f.file.close();
      if (f.part === '-') return;
      fs.renameSync(f.part, f.final);
      if (this.init.ringFiles > 0) this.completed.push(f.final);
      this.log('info', { file: f.final, packets: f.packets, bytes: f.file.size, direct_bytes: f.file.directBytes }, 'capture file completed');
      this.reply({ op: 'completed', final: f.final, packets: f.packets, bytes: f.file.size });
      this.trimRing(c.last);
    } catch (err) {
      this.log('error', { err: (err as Error).message, file: f.part }, 'cannot complete capture file');
    }
  }

  private statistics(f: Open, totalDrops: number, now: number, closing: boolean, comment?: string): Buffer {
    return interfaceStatistics({
      startSec: f.packets ? f.firstSec : Math.floor(f.openedAt / 1000),
      startNsec: f.packets ? f.firstNsec : 0,
      endSec: closing && f.packets ? f.lastSec : Math.floor(now / 1000),
      endNsec: closing && f.packets ? f.lastNsec : (now % 1000) * 1e6,
      received: f.packets,
      dropped: totalDrops - f.dropsAtOpen,
      ...(comment ? { comment } : {}),
    });
  }

  /**
   * -W: delete the oldest completed files beyond the ring size (a file about to open counts).
   * Asynchronously, on libuv's pool: freeing a large file's extents takes ~100 ms on ext4 mounted
   * with `discard`, long enough for the write queue to overflow if this thread waited.
   */
  private trimRing(last: boolean): void {
    const keep = this.init.ringFiles;
    if (!keep) return;
    while (this.completed.length > (last ? keep : keep - 1)) {
      const old = this.completed.shift()!;
      this.unlinking++;
      fs.unlink(old, (err) => {
        if (err) this.log('warn', { err: err.message, file: old }, 'cannot remove old ring file');
        if (--this.unlinking === 0) this.unlinked?.();
      });
    }
  }

  /** Runs `then` once no deletion is pending (the last file of a run is trimmed before exit). */
  private whenUnlinked(then: () => void): void {
    if (this.unlinking === 0) then();
    else this.unlinked = then;
  }
}

if (parentPort) {
  // Started ahead of its sink (prestartCaptureWriter), the thread learns its settings from `init`.
  const port = parentPort;
  let writer: CaptureWriter | null = null;
  port.on('message', (c: WriterCommand) => {
    if (c.op === 'init') {
      writer = new CaptureWriter(c.init, (r) => {
        port.postMessage(r);
        if (r.op === 'exited') port.close();
      });
    }
    writer?.handle(c);
  });
}
