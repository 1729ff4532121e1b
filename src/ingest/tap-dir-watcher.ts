/**
 * The file door for a running Envoy: `--watch DIR` follows the files Envoy's `file_per_tap` sink
 * writes, as it writes them.
 *
 * Envoy names each file `<path_prefix>_<trace_id>` + an extension by format, opens it at the
 * first trace of a connection and appends every later trace (streamed segments) of that
 * connection to it (source/extensions/common/tap/tap_config_base.cc). Its std::ofstream is not
 * flushed per trace, so a file grows in buffer-sized steps and a message may be cut anywhere
 * until the next flush or the connection's close.
 *
 *   .pb_length_delimited  varint32 length + message, repeated (PROTO_BINARY_LENGTH_DELIMITED;
 *                         the format to use with streaming): read as it grows.
 *   .json                 pretty JSON TraceWrappers back to back (JSON_BODY_AS_BYTES/_STRING):
 *                         read as it grows, split incrementally.
 *   .pb                   one binary TraceWrapper (PROTO_BINARY, buffered traces): decoded once the
 *                         file has stopped changing for `settleMs` (Envoy writes it at close).
 *   .pb_text              text TraceWrappers (PROTO_TEXT): decoded in steps, each once the file
 *                         has stopped changing for `settleMs`.
 *
 * Each file keeps its read offset and a bounded carry of an incomplete message (at most
 * `maxMessageBytes`); a message larger than that is reported and the file abandoned when the
 * framing can't be recovered (length-delimited) or skipped (JSON). Each file is its own Envoy node
 * namespace, as in tap-file.ts; a file that shrinks or is replaced (an Envoy restart reusing a
 * trace id truncates it) starts a new namespace and reports what was left incomplete.
 *
 * Change notification uses fs.watch where available plus a periodic full rescan, so files are
 * picked up even where inotify is unavailable or events are lost (network filesystems, overflow).
 * Files are opened only to read and closed right after, so thousands of connections' files cost
 * no descriptors. Files that disappear are forgotten.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { ConcatJsonSplitter } from './json-stream.js';
import type { StreamIdentity, TapEventHandler } from './tap-event.js';
import { parseTextTraces } from './textproto.js';
import { TraceDecoder, splitLengthDelimited } from './trace-decoder.js';
import { jsonTraceToBinary } from './trace-json.js';

export const FILE_SOURCE = 'file';

export type WatchedFormat = 'pb_length_delimited' | 'json' | 'pb' | 'pb_text';

export interface TapDirWatcherOptions {
  dir: string;
  /** Largest message (and largest JSON object) accepted. */
  maxMessageBytes: number;
  /** Full rescan period (default 1000 ms). */
  pollIntervalMs?: number;
  /** Use fs.watch for prompt notification (default true). */
  useFsWatch?: boolean;
  /** Bytes read from one file in one go (default 1 MiB). */
  readChunkBytes?: number;
  /** .pb / .pb_text: how long a file must stay unchanged before it is decoded (default 2000 ms). */
  settleMs?: number;
  /** Files already in the directory at start: read them from the beginning (default) or skip what they hold. */
  existing?: 'read' | 'skip';
}

export interface DirWatcherCounters {
  scans: number;
  filesSeen: number;
  bytesRead: number;
  messages: number;
  rejected: number;
}

/** The watched format of an Envoy file_per_tap output, by its extension; null for anything else. */
export function watchedFormat(name: string): WatchedFormat | null {
  if (name.startsWith('.')) return null;
  if (name.endsWith('.pb_length_delimited')) return 'pb_length_delimited';
  if (name.endsWith('.json')) return 'json';
  if (name.endsWith('.pb_text')) return 'pb_text';
  if (name.endsWith('.pb')) return 'pb';
  return null;
}

interface Tracked {
  name: string;
  file: string;
  format: WatchedFormat;
  dev: number;
  ino: number;
  /** Bytes of the file consumed so far. */
  offset: number;
  /** Size and time at which the size last changed (our clock). */
  size: number;
  changedAt: number;
  stream: StreamIdentity;
  generation: number;
  /** Length-delimited: the incomplete message at the end of what was read (a copy). */
  carry: Buffer | null;
  splitter: ConcatJsonSplitter | null;
  /** Framing lost: nothing more is read from this file (until it is replaced). */
  failed: boolean;
  /** The last bytes consumed (a copy), re-read before each read to notice an in-place rewrite. */
  tail: Buffer;
}

/** Bytes re-read before the offset to notice a file rewritten in place (same inode, larger). */
const TAIL_CHECK = 64;
const EMPTY = Buffer.alloc(0);

export class TapDirWatcher {
  readonly dir: string;
  readonly counters: DirWatcherCounters = { scans: 0, filesSeen: 0, bytesRead: 0, messages: 0, rejected: 0 };
  private readonly decoder: TraceDecoder;
  private readonly files = new Map<string, Tracked>();
  private readonly pollMs: number;
  private readonly chunk: number;
  private readonly settleMs: number;
  private watcher: fs.FSWatcher | null = null;
  private pollTimer: NodeJS.Timeout | null = null;
  private soonTimer: NodeJS.Timeout | null = null;
  private scanning: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  /** stop() was called: no new fs.watch, no timers; one last scan runs. */
  private closing = false;
  private firstScan = true;
  private dirMissingLogged = false;

  constructor(
    private readonly opts: TapDirWatcherOptions,
    private readonly handler: TapEventHandler,
    private readonly log: Logger,
  ) {
    if (!(opts.maxMessageBytes > 0)) throw new Error('--watch: maxMessageBytes must be > 0');
    this.dir = path.resolve(opts.dir);
    this.pollMs = opts.pollIntervalMs ?? 1000;
    this.chunk = opts.readChunkBytes ?? 1024 * 1024;
    this.settleMs = opts.settleMs ?? 2000;
    this.decoder = new TraceDecoder(handler);
  }

  /** Starts watching; the first scan has completed when this resolves. */
  async start(): Promise<void> {
    this.startFsWatch();
    await this.scan();
    this.pollTimer = setInterval(() => this.kick(), this.pollMs);
    this.pollTimer.unref();
  }

  async stop(): Promise<void> {
    if (this.closing) {
      if (this.scanning) await this.scanning;
      return;
    }
    this.closing = true;
    if (this.pollTimer) clearInterval(this.pollTimer);
    if (this.soonTimer) clearTimeout(this.soonTimer);
    this.pollTimer = this.soonTimer = null;
    this.watcher?.close();
    this.watcher = null;
    // Files outlive their writer: read what Envoy appended since the last scan before letting go.
    try {
      await this.scan();
    } catch (err) {
      this.log.error({ dir: this.dir, err: (err as Error).message }, 'final tap directory scan failed');
    }
    this.stopped = true;
    if (this.scanning) await this.scanning;
  }

  /** Scans now (tests, and after fs.watch events); resolves when the directory is caught up. */
  async scan(): Promise<void> {
    if (this.scanning) {
      this.again = true;
      return this.scanning;
    }
    this.scanning = (async () => {
      try {
        do {
          this.again = false;
          await this.scanOnce();
        } while (this.again && !this.stopped);
      } finally {
        this.scanning = null;
      }
    })();
    return this.scanning;
  }

  private kick(): void {
    if (this.stopped || this.closing) return;
    void this.scan().catch((err) => this.log.error({ dir: this.dir, err: (err as Error).message }, 'tap directory scan failed'));
  }

  private startFsWatch(): void {
    if (this.opts.useFsWatch === false || this.watcher || this.stopped || this.closing) return;
    try {
      this.watcher = fs.watch(this.dir, { persistent: false }, () => {
        // Coalesce bursts of events into one scan shortly after.
        if (this.soonTimer || this.stopped) return;
        this.soonTimer = setTimeout(() => {
          this.soonTimer = null;
          this.kick();
        }, 20);
      });
      this.watcher.on('error', () => {
        this.watcher?.close();
        this.watcher = null; // polling carries on; re-armed by a later scan
      });
    } catch {
      this.watcher = null;
    }
  }

  private async scanOnce(): Promise<void> {
    this.counters.scans++;
    let names: string[];
    try {
      names = await fs.promises.readdir(this.dir);
    } catch (err) {
      if (!this.dirMissingLogged) {
        this.dirMissingLogged = true;
        this.log.warn({ dir: this.dir, err: (err as Error).message }, 'cannot read the watched tap directory; will keep trying');
      }
      return;
    }
    if (this.dirMissingLogged) {
      this.dirMissingLogged = false;
      this.log.info({ dir: this.dir }, 'watched tap directory is readable again');
    }
    this.startFsWatch();
    const present = new Set<string>();
    const now = Date.now();
    for (const name of names) {
      if (this.stopped) return;
      const format = watchedFormat(name);
      if (!format) continue;
      present.add(name);
      const file = path.join(this.dir, name);
      let st: fs.Stats;
      try {
        st = await fs.promises.stat(file);
      } catch {
        continue; // removed in between
      }
      if (!st.isFile()) continue;
      let t = this.files.get(name);
      if (!t) {
        t = this.track(name, file, format, st, now);
      } else if (st.ino !== t.ino || st.dev !== t.dev || st.size < t.offset) {
        this.replaced(t, st, now);
      }
      if (st.size !== t.size) {
        t.size = st.size;
        t.changedAt = now;
      }
      if (t.failed || t.size <= t.offset) continue;
      await this.consume(t, now);
    }
    for (const [name, t] of this.files) {
      if (!present.has(name)) this.forget(t);
    }
    this.firstScan = false;
  }

  private track(name: string, file: string, format: WatchedFormat, st: fs.Stats, now: number): Tracked {
    const skip = this.firstScan && this.opts.existing === 'skip';
    const t: Tracked = {
      name,
      file,
      format,
      dev: st.dev,
      ino: st.ino,
      offset: skip ? st.size : 0,
      size: st.size,
      // Settling counts from the file's last modification (a file found complete needs none).
      changedAt: Math.min(now, st.mtimeMs),
      stream: { nodeId: `file:${file}`, tapId: name, source: FILE_SOURCE },
      generation: 0,
      carry: null,
      splitter: null,
      failed: false,
      tail: EMPTY,
    };
    this.files.set(name, t);
    this.counters.filesSeen++;
    this.log.debug({ file, format, skipped_bytes: skip ? st.size : 0 }, 'following tap file');
    return t;
  }

  /** The file was truncated or replaced: report what was incomplete, start a new namespace. */
  private replaced(t: Tracked, st: fs.Stats, now: number): void {
    this.flushIncomplete(t, 'the file was truncated or replaced');
    t.generation++;
    t.stream = { nodeId: `file:${t.file}#${t.generation}`, tapId: t.name, source: FILE_SOURCE };
    t.dev = st.dev;
    t.ino = st.ino;
    t.offset = 0;
    t.size = -1;
    t.changedAt = now;
    t.failed = false;
    t.tail = EMPTY;
    this.log.info({ file: t.file, node: t.stream.nodeId }, 'tap file was replaced or truncated: reading it again as a new Envoy namespace');
  }

  private forget(t: Tracked): void {
    this.flushIncomplete(t, 'the file was removed');
    this.files.delete(t.name);
  }

  private flushIncomplete(t: Tracked, why: string): void {
    if (t.carry && t.carry.length > 0) {
      this.reject(t, 'malformed_protobuf', `${t.file}: ${why} with ${t.carry.length} bytes of an incomplete length-delimited message`);
    }
    t.carry = null;
    // end() reports an object still open ("stream ended inside a JSON object").
    t.splitter?.end();
    t.splitter = null;
  }

  private async consume(t: Tracked, now: number): Promise<void> {
    if (t.format === 'pb' || t.format === 'pb_text') {
      if (now - t.changedAt < this.settleMs) return; // still being written: come back later
      const len = t.size - t.offset;
      if (len > this.opts.maxMessageBytes) {
        this.reject(t, 'message_too_large', `${t.file}: ${len} bytes to decode exceed the ${this.opts.maxMessageBytes}-byte limit; file skipped`);
        t.offset = t.size;
        return;
      }
      const data = await this.readNext(t, len, now);
      if (!data) return;
      this.decodeWhole(t, data);
      return;
    }
    while (!this.stopped && t.offset < t.size && !t.failed) {
      const data = await this.readNext(t, Math.min(this.chunk, t.size - t.offset), now);
      if (!data || data.length === 0) return;
      if (t.format === 'json') this.pushJson(t, data);
      else this.pushLengthDelimited(t, data);
    }
  }

  /**
   * The next `len` bytes after the offset, advancing it. The bytes before the offset are read
   * again and compared with what was consumed: a file rewritten in place from the start (Envoy
   * restarted and reused the name; std::ofstream truncates) is read again from 0 as a new
   * namespace instead of being spliced onto the old content.
   */
  private async readNext(t: Tracked, len: number, now: number): Promise<Buffer | null> {
    const back = t.tail.length;
    const got = await this.read(t, t.offset - back, len + back);
    if (!got) return null;
    if (back > 0 && (got.length < back || !got.subarray(0, back).equals(t.tail))) {
      const st = await fs.promises.stat(t.file).catch(() => null);
      if (!st) return null;
      this.replaced(t, st, now);
      t.size = st.size;
      return this.readNext(t, Math.min(len, st.size), now);
    }
    const data = got.subarray(back);
    t.offset += data.length;
    // `got` starts with the previous tail, so it always holds min(TAIL_CHECK, offset) bytes.
    t.tail = Buffer.from(got.subarray(got.length - Math.min(TAIL_CHECK, got.length)));
    return data;
  }

  /** Reads [pos, pos+len) into a fresh buffer (the JSON splitter keeps views of it). */
  private async read(t: Tracked, pos: number, len: number): Promise<Buffer | null> {
    let fh: fs.promises.FileHandle | null = null;
    try {
      fh = await fs.promises.open(t.file, 'r');
      const st = await fh.stat();
      if (st.ino !== t.ino || st.dev !== t.dev) return null; // replaced meanwhile: next scan sees it
      const buf = Buffer.allocUnsafe(len);
      let got = 0;
      while (got < len) {
        const { bytesRead } = await fh.read(buf, got, len - got, pos + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      this.counters.bytesRead += got;
      return got === len ? buf : buf.subarray(0, got);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT') this.reject(t, 'io_error', `${t.file}: ${(err as Error).message}`);
      return null;
    } finally {
      await fh?.close().catch(() => {});
    }
  }

  private pushLengthDelimited(t: Tracked, data: Buffer): void {
    const buf = t.carry ? Buffer.concat([t.carry, data]) : data;
    t.carry = null;
    let consumed: number;
    try {
      consumed = splitLengthDelimited(buf, (msg) => this.one(t, msg), this.opts.maxMessageBytes);
    } catch (err) {
      // A length beyond the limit: the framing can't be trusted past it.
      this.reject(t, 'message_too_large', `${t.file}: ${(err as Error).message}; not reading this file further`);
      t.failed = true;
      return;
    }
    if (consumed < buf.length) t.carry = Buffer.from(buf.subarray(consumed)); // copy: don't pin the read buffer
  }

  private pushJson(t: Tracked, data: Buffer): void {
    if (!t.splitter) {
      t.splitter = new ConcatJsonSplitter({
        maxObjectBytes: this.opts.maxMessageBytes,
        onObject: (text) => {
          let bin: Buffer;
          try {
            bin = jsonTraceToBinary(JSON.parse(text));
          } catch (err) {
            this.reject(t, 'malformed_json', `${t.file}: ${(err as Error).message}`);
            return;
          }
          this.one(t, bin);
        },
        onError: (reason, detail) => this.reject(t, reason === 'object_too_large' ? 'message_too_large' : 'malformed_json', `${t.file}: ${detail}`),
      });
    }
    t.splitter.push(data);
  }

  private decodeWhole(t: Tracked, data: Buffer): void {
    if (t.format === 'pb') {
      this.one(t, data);
      return;
    }
    let traces: Buffer[];
    try {
      traces = parseTextTraces(data.toString('utf8'));
    } catch (err) {
      this.reject(t, 'malformed_text', `${t.file}: ${(err as Error).message}`);
      return;
    }
    for (const msg of traces) this.one(t, msg);
  }

  private one(t: Tracked, msg: Buffer): void {
    this.handler.onIngestMessage(FILE_SOURCE, msg.length);
    if (this.decoder.decodeTraceWrapper(msg, t.stream)) this.counters.messages++;
    else this.counters.rejected++;
  }

  private reject(t: Tracked, reason: Parameters<TapEventHandler['onIngestError']>[1], detail: string): void {
    this.counters.rejected++;
    this.handler.onIngestError(t.stream, reason, detail);
  }
}
