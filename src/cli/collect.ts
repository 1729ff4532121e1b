/**
 * `meshcap collect`: the far side of `meshcap serve --broker`, for those without a packet broker.
 *
 * Listens over mutual TLS (TLS 1.2 minimum), accepts capture streams from many sidecars, admits a
 * client only when the SPIFFE ID in its certificate's URI SAN matches an `--allow` glob (others are
 * refused, logged and counted; the rest keep being served), and writes one rotating capture per
 * sidecar stream:
 *
 *   DIR/<SPIFFE ID as a path component>/<instance>_<stream>_NNNNN_YYYYmmddHHMMSS.pcap[ng]
 *
 * (e.g. DIR/cluster.local+ns+shop+sa+web/web-7d9f-x2k_3f2a1c0b9e8d_00001_20260101120000.pcap),
 * written as NAME.part and renamed when complete, mode 0600, like `meshcap serve -w`.
 *
 * Sidecars that negotiate ALPN meshcap-capture/1 get acknowledgements: every DATA frame is
 * written (and, with --fsync, synced), then the stream's state (records written, file, size) is
 * saved atomically, then ACKed. On reconnect the sidecar is told how many records of its stream
 * are written and resends from there; records it sends twice are skipped. After a crash (even
 * SIGKILL) the state says exactly which bytes of the open .part file were acknowledged: the file is
 * cut back to that size and completed at the next start, so nothing is written twice.
 * Clients without ALPN may send a plain pcap/pcapng stream (PCAP-over-TLS); it is written as a
 * capture of its own, without acknowledgements.
 *
 * SIGTERM/SIGINT: stop accepting, write and acknowledge what was received, close every
 * connection with close_notify, complete the files, exit 0.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Server, TLSSocket } from 'node:tls';
import tls from 'node:tls';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import client from 'prom-client';
import { ConfigError, parseFlags, usage } from '../flags.js';
import { registerCollectMetrics } from '../control/broker-metrics.js';
import { ControlServer, splitHostPort } from '../control/http-server.js';
import { createLogger } from '../control/logger.js';
import { safeComponent, SpiffeMatcher, spiffeIdOf, spiffeToPathComponent } from '../control/spiffe.js';
import { TlsFiles, TlsFilesError } from '../control/tls-files.js';
import {
  ackFrame,
  CAPTURE_ALPN,
  countRecords,
  encodeFrame,
  fileHeaderError,
  FrameReader,
  FrameType,
  MAX_FRAME,
  readU64,
  recordOffset,
  type CaptureHello,
} from '../sink/broker-sink.js';
import type { SpoolFormat } from '../sink/spool.js';

function fsWrite(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
const fsFdatasync = promisify(fs.fdatasync);

export const COLLECT_OPTIONS = [
  { name: 'listen', kind: 'string' as const, help: 'HOST:PORT to accept sidecar streams on (mutual TLS)' },
  { name: 'tls-cert', kind: 'string' as const, help: "the collector's certificate (PEM; reloaded when it changes)" },
  { name: 'tls-key', kind: 'string' as const, help: 'its private key (PEM)' },
  { name: 'tls-ca', kind: 'string' as const, help: 'CA bundle that sidecar certificates must chain to (PEM)' },
  { name: 'write', short: 'w', kind: 'string' as const, help: 'directory for the captures (one subdirectory per SPIFFE ID)' },
  { name: 'allow', kind: 'list' as const, help: "SPIFFE ID glob allowed to send (repeatable): * within a segment, ** across; e.g. 'spiffe://cluster.local/ns/*/sa/meshcap'" },
  { name: 'file-size', short: 'C', kind: 'int' as const, min: 0, max: 1_000_000, help: 'rotate a stream’s file at this many MB (10^6 bytes); 0 = off' },
  { name: 'rotate-seconds', short: 'G', kind: 'int' as const, min: 0, max: 31_536_000, help: 'rotate every this many seconds; 0 = off' },
  { name: 'ring', short: 'W', kind: 'int' as const, min: 0, max: 1_000_000, help: 'keep at most this many completed files per stream; 0 = all' },
  { name: 'fsync', kind: 'bool' as const, help: 'sync each write to disk before acknowledging it (survives power loss, slower)' },
  { name: 'max-connections', kind: 'int' as const, min: 1, max: 1_000_000, help: 'concurrent sidecar connections at most (default 1024)' },
  { name: 'metrics-listen', kind: 'string' as const, help: "host:port for /metrics, /healthz, /readyz, or 'off' (default off)" },
  { name: 'log-level', kind: 'string' as const, choices: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], help: 'log level (default info)' },
];

export const COLLECT_USAGE = `Usage: meshcap collect --listen HOST:PORT --tls-cert FILE --tls-key FILE --tls-ca FILE -w DIR --allow SPIFFE_GLOB [options]

Receives capture streams from meshcap sidecars (meshcap serve --broker tls://HOST:PORT) over
mutual TLS and writes one rotating capture per sidecar. Delivery is acknowledged: every packet
lands exactly once, across restarts of either side.

${usage(COLLECT_OPTIONS)}
`;

export interface CollectorOptions {
  host: string;
  port: number;
  tls: TlsFiles;
  dir: string;
  allow: SpiffeMatcher;
  maxFileBytes: number;
  rotateSeconds: number;
  ringFiles: number;
  fsync: boolean;
  maxConnections: number;
  /** Stop waiting for pending writes on close after this long (ms). */
  closeTimeoutMs?: number;
}

interface OpenFile {
  fd: number;
  part: string;
  final: string;
  size: number;
  openedAt: number;
  packets: number;
}

interface StreamStateFile {
  v: 1;
  stream: string;
  spiffe: string;
  instance: string;
  format: SpoolFormat;
  header: string;
  next: number | null;
  fileSeq: number;
  /** Open .part file (base name) and the bytes of it that are acknowledged. */
  part: string | null;
  size: number;
  completed: string[];
}

type Op = { kind: 'data'; firstSeq: number; count: number; records: Buffer; conn: Conn | null } | { kind: 'rotate' } | { kind: 'barrier'; done: () => void };

const STATE_DIR = '.meshcap-collect';
const MAX_PENDING = 64 << 20;
/**
 * Acknowledge at least every this many written bytes: a quarter of the sidecar's default window of
 * unacknowledged bytes (16 MiB), so it keeps sending while earlier data is written.
 */
const ACK_EVERY_BYTES = 4 << 20;

function stamp(d: Date): string {
  const p2 = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}${p2(d.getMonth() + 1)}${p2(d.getDate())}${p2(d.getHours())}${p2(d.getMinutes())}${p2(d.getSeconds())}`;
}

/** One sidecar stream: its files, its acknowledged position, its connection. */
class CaptureStream {
  next: number | null = null;
  fileSeq = 0;
  file: OpenFile | null = null;
  completed: string[] = [];
  conn: Conn | null = null;
  header: Buffer;
  format: SpoolFormat;
  instance: string;
  private readonly ops: Op[] = [];
  private running = false;
  pendingBytes = 0;
  lastWriteAt = 0;
  /** Header and format of a reconnected sidecar, taken at the next rotation. */
  private pendingHeader: { format: SpoolFormat; header: Buffer } | null = null;

  constructor(
    private readonly c: Collector,
    readonly key: string,
    readonly spiffe: string,
    readonly dir: string,
    readonly streamId: string,
    hello: { instance: string; format: SpoolFormat; header: Buffer },
    /** Raw (unacknowledged) streams keep no state file. */
    readonly persistent: boolean,
  ) {
    this.instance = hello.instance;
    this.format = hello.format;
    this.header = hello.header;
  }

  get statePath(): string {
    return path.join(this.dir, STATE_DIR, `${this.streamId}.json`);
  }

  /** Loads the saved state of this stream (after recovery at startup, `part` is always null). */
  loadState(): void {
    if (!this.persistent) return;
    try {
      const s = JSON.parse(fs.readFileSync(this.statePath, 'utf8')) as StreamStateFile;
      this.next = s.next;
      this.fileSeq = s.fileSeq;
      this.completed = s.completed ?? [];
    } catch {
      /* a new stream */
    }
  }

  saveState(): void {
    if (!this.persistent) return;
    const s: StreamStateFile = {
      v: 1,
      stream: this.streamId,
      spiffe: this.spiffe,
      instance: this.instance,
      format: this.format,
      header: this.header.toString('base64'),
      next: this.next,
      fileSeq: this.fileSeq,
      part: this.file ? path.basename(this.file.part) : null,
      size: this.file ? this.file.size : 0,
      completed: this.completed,
    };
    const tmp = `${this.statePath}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(s), { mode: 0o600 });
    fs.renameSync(tmp, this.statePath);
  }

  /** A (re)connecting sidecar: new header/format may differ (a new file then). */
  rehello(hello: { instance: string; format: SpoolFormat; header: Buffer }): void {
    if (!hello.header.equals(this.header) || hello.format !== this.format) {
      this.enqueue({ kind: 'rotate' });
    }
    this.instance = hello.instance;
    this.pendingHeader = hello;
  }

  enqueue(op: Op): void {
    if (op.kind === 'data') this.pendingBytes += op.records.length;
    this.ops.push(op);
    if (!this.running) void this.run();
  }

  /** Resolves when every queued operation is done. */
  barrier(): Promise<void> {
    return new Promise((resolve) => this.enqueue({ kind: 'barrier', done: resolve }));
  }

  private async run(): Promise<void> {
    this.running = true;
    try {
      while (this.ops.length > 0) {
        const op = this.ops.shift()!;
        if (op.kind === 'barrier') {
          op.done();
          continue;
        }
        if (op.kind === 'rotate') {
          this.finishFile();
          if (this.pendingHeader) {
            this.header = this.pendingHeader.header;
            this.format = this.pendingHeader.format;
            this.pendingHeader = null;
          }
          this.saveState();
          continue;
        }
        // Write this DATA frame and any others already queued, then save the state and ACK once —
        // or sooner, every ACK_EVERY_BYTES: while frames keep arriving the queue may never run
        // empty, and a sidecar whose window is full of unacknowledged bytes would stall.
        let acked: Conn | null = null;
        let cur: Op | undefined = op;
        let written = 0;
        while (cur && cur.kind === 'data') {
          await this.writeData(cur);
          this.pendingBytes -= cur.records.length;
          written += cur.records.length;
          if (cur.conn) acked = cur.conn;
          cur = this.ops[0]?.kind === 'data' && written < ACK_EVERY_BYTES ? this.ops.shift() : undefined;
        }
        if (cur) this.ops.unshift(cur);
        if (this.c.opts.fsync && this.file) await fsFdatasync(this.file.fd);
        this.saveState();
        // Acknowledge on the connection that sent the data, unless a newer one replaced it (that
        // one learns the position from its WELCOME).
        if (acked && acked === this.conn && this.next !== null) acked.sendAck(this.next);
        this.c.resumeReading(this);
      }
    } catch (err) {
      this.c.log.error({ spiffe_id: this.spiffe, stream: this.streamId, err: (err as Error).message, reason: 'collect_write_failed' }, 'cannot write capture; closing the connection (the sidecar resends what was not acknowledged)');
      this.c.counters.writeErrors++;
      // Undo a partial write: the file goes back to its acknowledged size.
      if (this.file) {
        try {
          fs.ftruncateSync(this.file.fd, this.file.size);
        } catch {
          /* nothing more to do */
        }
      }
      for (const o of this.ops.splice(0)) if (o.kind === 'barrier') o.done();
      this.pendingBytes = 0;
      this.conn?.destroy('write_failed');
    } finally {
      this.running = false;
    }
  }

  private async writeData(op: Extract<Op, { kind: 'data' }>): Promise<void> {
    const end = op.firstSeq + op.count;
    const counters = this.c.counters;
    if (this.next !== null && end <= this.next) {
      counters.duplicates += op.count;
      return;
    }
    let data = op.records;
    let skip = 0;
    if (this.next !== null && op.firstSeq < this.next) {
      skip = this.next - op.firstSeq;
      data = data.subarray(recordOffset(data, this.format, skip));
      counters.duplicates += skip;
    } else if (this.next !== null && op.firstSeq > this.next) {
      const gap = op.firstSeq - this.next;
      counters.gaps += gap;
      this.c.log.warn(
        { spiffe_id: this.spiffe, stream: this.streamId, instance: this.instance, expected: this.next, got: op.firstSeq, records: gap, reason: 'collect_sequence_gap' },
        'sequence gap in a sidecar stream: records dropped by the sidecar (spool full, counted there), or lost when it stopped uncleanly (then the count is an upper bound)',
      );
    }
    const packets = op.count - skip;
    if (this.file && this.file.packets > 0) {
      const max = this.c.opts.maxFileBytes;
      const age = this.c.opts.rotateSeconds;
      if ((max > 0 && this.file.size + data.length > max) || (age > 0 && Date.now() - this.file.openedAt >= age * 1000)) this.finishFile();
    }
    if (!this.file) this.openFile();
    const f = this.file!;
    let off = 0;
    while (off < data.length) {
      const n = await fsWrite(f.fd, data, off, data.length - off, f.size + off);
      if (n <= 0) throw new Error('short write');
      off += n;
    }
    f.size += data.length;
    f.packets += packets;
    this.next = end;
    this.lastWriteAt = Date.now();
    counters.packets += packets;
    counters.bytes += data.length;
  }

  private openFile(): void {
    this.fileSeq++;
    const ext = this.format === 'pcapng' ? 'pcapng' : 'pcap';
    const base = `${safeComponent(this.instance, 64)}_${this.streamId.slice(0, 12)}_${String(this.fileSeq).padStart(5, '0')}_${stamp(new Date())}.${ext}`;
    const final = path.join(this.dir, base);
    const part = `${final}.part`;
    const fd = fs.openSync(part, 'w', 0o600);
    fs.writeSync(fd, this.header, 0, this.header.length, 0);
    this.file = { fd, part, final, size: this.header.length, openedAt: Date.now(), packets: 0 };
    // The state must name the new file before any record goes into it (crash recovery).
    this.saveState();
    this.c.log.info({ spiffe_id: this.spiffe, stream: this.streamId, file: part }, 'capture file opened');
  }

  /** Completes the open file (.part → final name), applies the ring. */
  finishFile(): void {
    const f = this.file;
    if (!f) return;
    this.file = null;
    try {
      fs.closeSync(f.fd);
      if (f.packets === 0) {
        fs.rmSync(f.part, { force: true });
        return;
      }
      fs.renameSync(f.part, f.final);
      this.c.counters.filesCompleted++;
      this.completed.push(path.basename(f.final));
      this.c.log.info({ spiffe_id: this.spiffe, stream: this.streamId, file: f.final, packets: f.packets, bytes: f.size }, 'capture file completed');
      const keep = this.c.opts.ringFiles;
      while (keep > 0 && this.completed.length > keep) this.c.removeLater(path.join(this.dir, this.completed.shift()!));
      if (this.completed.length > 10_000) this.completed = this.completed.slice(-10_000);
    } catch (err) {
      this.c.log.error({ file: f.part, err: (err as Error).message }, 'cannot complete capture file');
    }
  }

  /** -G with no traffic: rotate an idle stream's file on time. */
  rotateIfDue(): void {
    const age = this.c.opts.rotateSeconds;
    if (age > 0 && this.file && this.file.packets > 0 && !this.running && this.ops.length === 0 && Date.now() - this.file.openedAt >= age * 1000) {
      this.enqueue({ kind: 'rotate' });
    }
  }
}

/** One accepted TLS connection. */
class Conn {
  stream: CaptureStream | null = null;
  private readonly reader = new FrameReader(MAX_FRAME + 64);
  private closed = false;
  private raw: { buf: Buffer[]; have: number; format: SpoolFormat | null } | null = null;
  private rawSeq = 0;
  /** Format announced in this connection's HELLO (the stream adopts it at its next file). */
  private format: SpoolFormat | null = null;
  paused = false;

  constructor(
    private readonly c: Collector,
    readonly sock: TLSSocket,
    readonly spiffe: string,
    readonly spiffeDir: string,
    readonly remote: string,
  ) {
    const acked = sock.alpnProtocol === CAPTURE_ALPN;
    if (!acked) this.raw = { buf: [], have: 0, format: null };
    sock.on('data', (d: Buffer) => (acked ? this.onFrames(d) : this.onRaw(d)));
    sock.on('error', (err) => this.c.log.debug({ spiffe_id: spiffe, remote, err: err.message }, 'sidecar connection error'));
    sock.on('close', () => this.onClose());
  }

  sendAck(next: number): void {
    if (!this.closed) this.sock.write(ackFrame(next));
  }

  destroy(why: string): void {
    if (this.closed) return;
    this.c.log.warn({ spiffe_id: this.spiffe, remote: this.remote, reason: why }, 'closing sidecar connection');
    this.sock.destroy();
  }

  private protocolError(msg: string): void {
    this.c.counters.protocolErrors++;
    this.c.log.warn({ spiffe_id: this.spiffe, remote: this.remote, err: msg, reason: 'collect_protocol_error' }, 'protocol error from sidecar; closing the connection');
    if (!this.closed) this.sock.end(encodeFrame(FrameType.Error, { reason: 'protocol', message: msg }));
    setTimeout(() => this.sock.destroy(), 1000).unref();
    this.closed = true;
  }

  private onFrames(d: Buffer): void {
    if (this.closed) return;
    this.reader.push(d);
    try {
      for (let f = this.reader.next(); f; f = this.reader.next()) {
        if (this.closed) return;
        if (!this.stream) {
          if (f.type !== FrameType.Hello) throw new Error('first frame is not HELLO');
          this.hello(JSON.parse(f.body.toString('utf8')) as CaptureHello);
          continue;
        }
        if (f.type !== FrameType.Data || f.body.length < 12) throw new Error(`unexpected frame type ${f.type}`);
        const firstSeq = readU64(f.body, 0);
        const count = f.body.readUInt32BE(8);
        const records = f.body.subarray(12);
        const n = countRecords(records, this.format!);
        if (n !== count) throw new Error(`DATA frame says ${count} records, holds ${n < 0 ? 'a malformed batch' : n}`);
        if (!Number.isSafeInteger(firstSeq + count)) throw new Error('sequence number out of range');
        this.stream.enqueue({ kind: 'data', firstSeq, count, records, conn: this });
        if (this.stream.pendingBytes > MAX_PENDING && !this.paused) {
          this.paused = true;
          this.sock.pause();
        }
      }
    } catch (err) {
      this.protocolError((err as Error).message);
    }
  }

  private hello(h: CaptureHello): void {
    if (!h || h.v !== 1 || typeof h.stream !== 'string' || !/^[0-9a-f]{32}$/.test(h.stream)) throw new Error('bad HELLO: stream');
    if (typeof h.instance !== 'string' || h.instance.length > 256) throw new Error('bad HELLO: instance');
    if (h.format !== 'pcap' && h.format !== 'pcap-ns' && h.format !== 'pcapng') throw new Error('bad HELLO: format');
    const header = Buffer.from(String(h.header), 'base64');
    const err = fileHeaderError(header, h.format);
    if (err) throw new Error(`bad HELLO: header: ${err}`);
    const stream = this.c.streamFor(this.spiffe, this.spiffeDir, h.stream, { instance: h.instance, format: h.format, header });
    if (stream.conn && stream.conn !== this) {
      // The sidecar reconnected before we noticed its old connection died.
      stream.conn.stream = null;
      stream.conn.destroy('superseded');
    }
    stream.conn = this;
    this.stream = stream;
    this.format = h.format;
    this.c.log.info({ spiffe_id: this.spiffe, remote: this.remote, stream: h.stream, instance: h.instance, format: h.format, next: stream.next }, 'sidecar stream attached');
    // Answer once every write queued for this stream (by an older connection) is done.
    void stream.barrier().then(() => {
      if (!this.closed && this.stream === stream) this.sock.write(encodeFrame(FrameType.Welcome, { next: stream.next }));
    });
  }

  /** A plain pcap/pcapng stream (no ALPN): written as it comes, no acknowledgements. */
  private onRaw(d: Buffer): void {
    const r = this.raw!;
    r.buf.push(d);
    r.have += d.length;
    let buf = Buffer.concat(r.buf);
    let off = 0;
    if (!r.format) {
      if (buf.length < 28) return;
      const magic = buf.readUInt32LE(0);
      let hlen: number;
      let format: SpoolFormat;
      if (magic === 0xa1b2c3d4 || magic === 0xa1b23c4d) {
        format = magic === 0xa1b2c3d4 ? 'pcap' : 'pcap-ns';
        hlen = 24;
      } else if (magic === 0x0a0d0d0a && buf.readUInt32LE(8) === 0x1a2b3c4d) {
        format = 'pcapng';
        const shb = buf.readUInt32LE(4);
        if (buf.length < shb + 8) return;
        hlen = shb + buf.readUInt32LE(shb + 4);
        if (buf.length < hlen) return;
      } else {
        this.protocolError('not a little-endian pcap or pcapng stream (and no ALPN meshcap-capture/1)');
        return;
      }
      r.format = format;
      const header = Buffer.from(buf.subarray(0, hlen));
      this.stream = this.c.streamFor(this.spiffe, this.spiffeDir, randomBytes(16).toString('hex'), { instance: `raw-${this.remote}`, format, header }, false);
      this.stream.conn = this;
      this.stream.next = 0;
      off = hlen;
    }
    const format = r.format;
    let count = 0;
    const start = off;
    while (off < buf.length) {
      let end: number;
      if (format === 'pcapng') {
        if (off + 12 > buf.length) break;
        const total = buf.readUInt32LE(off + 4);
        if (total < 12 || total % 4) return this.protocolError('bad pcapng block length');
        end = off + total <= buf.length ? off + total : -1;
      } else {
        if (off + 16 > buf.length) break;
        end = off + 16 + buf.readUInt32LE(off + 8);
        if (buf.readUInt32LE(off + 8) > 262144 * 4) return this.protocolError('pcap record too large');
        if (end > buf.length) end = -1;
      }
      if (end < 0) break;
      off = end;
      count++;
    }
    if (count > 0) {
      const s = this.stream!;
      const firstSeq = this.rawSeq;
      this.rawSeq += count;
      // pcapng blocks other than EPBs count as records here: harmless (no acks, no dedup).
      s.enqueue({ kind: 'data', firstSeq, count, records: Buffer.from(buf.subarray(start, off)), conn: null });
    }
    buf = buf.subarray(off);
    r.buf = buf.length ? [Buffer.from(buf)] : [];
    r.have = buf.length;
  }

  private onClose(): void {
    this.closed = true;
    this.c.connectionClosed(this);
    const s = this.stream;
    if (s && s.conn === this) {
      s.conn = null;
      if (!s.persistent) {
        // A raw stream ends with its connection: complete its file.
        void s.barrier().then(() => {
          s.finishFile();
          this.c.dropStream(s);
        });
      }
    }
  }
}

export interface CollectCounters {
  connections: number;
  active: number;
  rejected: Map<string, number>;
  packets: number;
  bytes: number;
  duplicates: number;
  gaps: number;
  filesCompleted: number;
  protocolErrors: number;
  writeErrors: number;
}

export class Collector {
  private server: Server | null = null;
  private readonly streams = new Map<string, CaptureStream>();
  private readonly conns = new Set<Conn>();
  private sweep: NodeJS.Timeout | null = null;
  readonly counters: CollectCounters = {
    connections: 0,
    active: 0,
    rejected: new Map(),
    packets: 0,
    bytes: 0,
    duplicates: 0,
    gaps: 0,
    filesCompleted: 0,
    protocolErrors: 0,
    writeErrors: 0,
  };
  address = '';
  private closing: Promise<void> | null = null;
  /** Ring files being deleted. */
  private readonly removing = new Set<Promise<void>>();

  constructor(
    readonly opts: CollectorOptions,
    readonly log: Logger,
  ) {}

  /**
   * Deletes an old ring file without waiting: freeing a large file's extents takes ~100 ms on ext4
   * mounted with `discard`, time the event loop owes to the streams being received.
   */
  removeLater(file: string): void {
    const p: Promise<void> = fs.promises
      .rm(file, { force: true })
      .catch((err: Error) => this.log.warn({ file, err: err.message }, 'cannot remove old ring file'))
      .finally(() => this.removing.delete(p));
    this.removing.add(p);
  }

  get streamCount(): number {
    return this.streams.size;
  }

  async start(): Promise<void> {
    fs.mkdirSync(this.opts.dir, { recursive: true, mode: 0o700 });
    this.recover();
    const m = this.opts.tls.current;
    const server = tls.createServer({
      cert: m.cert,
      key: m.key,
      ca: m.ca,
      requestCert: true,
      // The chain is verified by OpenSSL all the same; the verdict is enforced in
      // onConnection, so that a refused sidecar is told why (an ERROR frame) and the refusal
      // is logged with its reason (Node would only report "socket hang up").
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
      ALPNProtocols: [CAPTURE_ALPN],
    });
    this.server = server;
    this.opts.tls.on('reload', (mat: { cert: Buffer; key: Buffer; ca: Buffer }) => {
      server.setSecureContext({ cert: mat.cert, key: mat.key, ca: mat.ca, minVersion: 'TLSv1.2' });
    });
    this.opts.tls.start();
    server.on('tlsClientError', (err: NodeJS.ErrnoException, sock: TLSSocket) => {
      const reason = classifyClientError(err);
      const raw = (sock as unknown as { _parent?: { remoteAddress?: string; remotePort?: number } })._parent;
      const remote = sock.remoteAddress ? `${sock.remoteAddress}:${sock.remotePort}` : raw?.remoteAddress ? `${raw.remoteAddress}:${raw.remotePort}` : 'unknown';
      this.reject(reason, { remote, err: err.message, code: err.code });
    });
    server.on('secureConnection', (sock: TLSSocket) => this.onConnection(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.opts.port, this.opts.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.log.error({ err: err.message }, 'collector server error'));
    const a = server.address();
    this.address = typeof a === 'object' && a ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : '';
    this.sweep = setInterval(() => {
      for (const s of this.streams.values()) s.rotateIfDue();
    }, 1000);
    this.sweep.unref();
  }

  private reject(reason: string, fields: Record<string, unknown>): void {
    this.counters.rejected.set(reason, (this.counters.rejected.get(reason) ?? 0) + 1);
    this.log.warn({ ...fields, reason: `collect_rejected_${reason}` }, `sidecar refused: ${reason}`);
  }

  private onConnection(sock: TLSSocket): void {
    const remote = `${sock.remoteAddress}:${sock.remotePort}`;
    const peer = sock.getPeerCertificate();
    const why: { reason?: string } = {};
    const id = spiffeIdOf(peer, why);
    // An unverified certificate's SPIFFE ID is only a claim: logged as such.
    const fields = { remote, [sock.authorized ? 'spiffe_id' : 'claimed_spiffe_id']: id, subject: peer?.subject?.CN, serial: peer?.serialNumber, protocol: sock.getProtocol(), alpn: sock.alpnProtocol || null };
    const refuse = (reason: string, message: string): void => {
      this.reject(reason, { ...fields, detail: message });
      if (sock.alpnProtocol === CAPTURE_ALPN) sock.end(encodeFrame(FrameType.Error, { reason, message }));
      else sock.end();
      setTimeout(() => sock.destroy(), 1000).unref();
    };
    if (!sock.authorized) {
      const code = String(sock.authorizationError ?? 'unknown');
      const reason = !peer || !peer.raw ? 'no_client_cert' : classifyClientError(Object.assign(new Error(code), { code }) as NodeJS.ErrnoException);
      return refuse(reason, `client certificate refused: ${code}`);
    }
    if (this.closing) return refuse('shutting_down', 'collector is shutting down');
    if (id === null) return refuse('no_spiffe_id', `client certificate has no usable SPIFFE ID (${why.reason})`);
    if (!this.opts.allow.allows(id)) return refuse('not_allowed', `SPIFFE ID ${id} is not on the allowlist`);
    if (this.conns.size >= this.opts.maxConnections) return refuse('too_many_connections', `more than ${this.opts.maxConnections} connections`);
    const dir = spiffeToPathComponent(id)!;
    fs.mkdirSync(path.join(this.opts.dir, dir, STATE_DIR), { recursive: true, mode: 0o700 });
    this.counters.connections++;
    const conn = new Conn(this, sock, id, dir, remote);
    this.conns.add(conn);
    this.counters.active = this.conns.size;
    this.log.info({ ...fields, allowed_by: this.opts.allow.match(id) }, 'sidecar connected');
  }

  connectionClosed(conn: Conn): void {
    this.conns.delete(conn);
    this.counters.active = this.conns.size;
  }

  streamFor(spiffe: string, spiffeDir: string, streamId: string, hello: { instance: string; format: SpoolFormat; header: Buffer }, persistent = true): CaptureStream {
    const key = `${spiffeDir}/${streamId}`;
    let s = this.streams.get(key);
    if (s) {
      s.rehello(hello);
      return s;
    }
    s = new CaptureStream(this, key, spiffe, path.join(this.opts.dir, spiffeDir), streamId, hello, persistent);
    s.loadState();
    this.streams.set(key, s);
    return s;
  }

  dropStream(s: CaptureStream): void {
    if (this.streams.get(s.key) === s) this.streams.delete(s.key);
  }

  resumeReading(s: CaptureStream): void {
    const c = s.conn;
    if (c && c.paused && s.pendingBytes < MAX_PENDING / 2) {
      c.paused = false;
      c.sock.resume();
    }
  }

  /**
   * Crash recovery: every stream state naming an open .part file gets that file cut back to its
   * acknowledged size and completed; .part files no state names (opened just before a crash,
   * holding a header only) are removed.
   */
  private recover(): void {
    for (const sub of fs.readdirSync(this.opts.dir)) {
      const dir = path.join(this.opts.dir, sub);
      const stateDir = path.join(dir, STATE_DIR);
      if (!fs.existsSync(stateDir)) continue;
      const named = new Set<string>();
      for (const name of fs.readdirSync(stateDir)) {
        if (!name.endsWith('.json')) continue;
        const file = path.join(stateDir, name);
        let s: StreamStateFile;
        try {
          s = JSON.parse(fs.readFileSync(file, 'utf8')) as StreamStateFile;
        } catch {
          continue;
        }
        if (!s.part) continue;
        const part = path.join(dir, path.basename(s.part));
        named.add(path.basename(s.part));
        const final = part.replace(/\.part$/, '');
        try {
          if (fs.existsSync(part)) {
            const size = fs.statSync(part).size;
            if (size > s.size) fs.truncateSync(part, s.size);
            const headerLen = Buffer.from(s.header, 'base64').length;
            if (s.size <= headerLen) fs.rmSync(part);
            else {
              fs.renameSync(part, final);
              s.completed = [...(s.completed ?? []), path.basename(final)];
            }
            this.log.warn({ file: part, kept_bytes: s.size, cut_bytes: Math.max(0, size - s.size), reason: 'collect_recovered' }, 'completed a capture file left open by a previous run (cut back to what was acknowledged)');
          }
          s.part = null;
          s.size = 0;
          fs.writeFileSync(`${file}.tmp`, JSON.stringify(s), { mode: 0o600 });
          fs.renameSync(`${file}.tmp`, file);
        } catch (err) {
          this.log.error({ file: part, err: (err as Error).message }, 'cannot recover capture file');
        }
      }
      for (const name of fs.readdirSync(dir)) {
        if (name.endsWith('.part') && !named.has(name)) {
          // Opened before a crash, before its state named it: holds at most a header.
          const p = path.join(dir, name);
          this.log.warn({ file: p, reason: 'collect_recovered' }, 'removing a capture file that holds no acknowledged packets');
          fs.rmSync(p, { force: true });
        }
      }
    }
  }

  /** Stops accepting, writes and acknowledges what was received, closes connections, completes files. */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closing = (async () => {
      if (this.sweep) clearInterval(this.sweep);
      this.opts.tls.stop();
      const server = this.server;
      const closed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
      for (const c of this.conns) c.sock.pause();
      const deadline = new Promise<void>((r) => setTimeout(r, this.opts.closeTimeoutMs ?? 3000).unref());
      await Promise.race([Promise.all([...this.streams.values()].map((s) => s.barrier())), deadline]);
      for (const c of this.conns) c.sock.end();
      for (const s of this.streams.values()) {
        s.finishFile();
        s.saveState();
      }
      await Promise.all(this.removing);
      const conns = [...this.conns];
      setTimeout(() => conns.forEach((c) => c.sock.destroy()), 500).unref();
      await Promise.race([closed, new Promise((r) => setTimeout(r, 600))]);
    })();
    return this.closing;
  }
}

function classifyClientError(err: NodeJS.ErrnoException): string {
  const m = `${err.code ?? ''} ${err.message}`;
  if (/CERTIFICATE_EXPIRED|certificate has expired|CERT_HAS_EXPIRED|CERT_NOT_YET_VALID/i.test(m)) return 'client_cert_expired';
  if (/unknown ca|UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY|SELF_SIGNED|DEPTH_ZERO|CERT_SIGNATURE_FAILURE|CERT_UNTRUSTED|CERT_REJECTED|INVALID_CA|INVALID_PURPOSE|certificate verify failed|CERTIFICATE_VERIFY_FAILED/i.test(m)) return 'client_cert_untrusted';
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|no certificate|CERTIFICATE_REQUIRED/i.test(m)) return 'no_client_cert';
  if (/version|UNSUPPORTED_PROTOCOL/i.test(m)) return 'tls_version';
  if (/ECONNRESET|socket hang up/i.test(m)) return 'reset';
  return 'tls_handshake';
}

/** `meshcap collect ARGS`: returns the exit code. */
export async function collect(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(COLLECT_USAGE);
    return 0;
  }
  const f = parseFlags(argv, COLLECT_OPTIONS);
  const need = (k: string): string => {
    const v = f[k];
    if (typeof v !== 'string' || v === '') throw new ConfigError(`collect: --${k} is required\n\n${COLLECT_USAGE}`);
    return v;
  };
  const listen = need('listen');
  let host: string;
  let port: number;
  try {
    ({ host, port } = splitHostPort(listen, 'listen'));
  } catch (err) {
    throw new ConfigError(`collect: ${(err as Error).message}`);
  }
  const allowList = (f.allow as string[] | undefined) ?? [];
  if (allowList.length === 0) throw new ConfigError("collect: at least one --allow SPIFFE_GLOB is required (--allow 'spiffe://TRUST_DOMAIN/**' admits every sidecar the CA vouches for)");
  let allow: SpiffeMatcher;
  try {
    allow = new SpiffeMatcher(allowList);
  } catch (err) {
    throw new ConfigError(`collect: --allow: ${(err as Error).message}`);
  }
  const int = (k: string, def: number): number => {
    const v = f[k];
    if (v === undefined) return def;
    const spec = COLLECT_OPTIONS.find((o) => o.name === k)!;
    const n = Number(v);
    if (!/^\d+$/.test(String(v)) || (spec.min !== undefined && n < spec.min) || (spec.max !== undefined && n > spec.max)) throw new ConfigError(`collect: --${k} must be an integer between ${spec.min} and ${spec.max}, got "${v}"`);
    return n;
  };
  const logLevel = (f['log-level'] as string | undefined) ?? 'info';
  if (!COLLECT_OPTIONS.find((o) => o.name === 'log-level')!.choices!.includes(logLevel)) throw new ConfigError(`collect: --log-level: unknown level "${logLevel}"`);
  const log = createLogger(logLevel);
  let tlsFiles: TlsFiles;
  try {
    tlsFiles = new TlsFiles({ cert: need('tls-cert'), key: need('tls-key'), ca: need('tls-ca') }, log, { role: 'collector' });
  } catch (err) {
    if (err instanceof TlsFilesError) throw new ConfigError(`collect: ${err.message}`);
    throw err;
  }
  const collector = new Collector(
    {
      host,
      port,
      tls: tlsFiles,
      dir: path.resolve(need('write')),
      allow,
      maxFileBytes: int('file-size', 0) * 1_000_000,
      rotateSeconds: int('rotate-seconds', 0),
      ringFiles: int('ring', 0),
      fsync: f.fsync === true,
      maxConnections: int('max-connections', 1024),
    },
    log,
  );
  const metricsListen = f['metrics-listen'] as string | undefined;
  let control: ControlServer | null = null;
  if (metricsListen && metricsListen !== 'off') {
    const registry = new client.Registry();
    client.collectDefaultMetrics({ register: registry, prefix: 'meshcap_' });
    registerCollectMetrics(registry, collector);
    control = new ControlServer(registry);
    await control.listen(metricsListen);
  }
  await collector.start();
  if (control) control.ready = true;
  log.info({ listen: collector.address, dir: collector.opts.dir, allow: allowList, metrics: control ? `http://${control.address}/metrics` : 'off' }, `meshcap collecting on ${collector.address}`);
  return await new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (why: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'shutting down: writing what was received');
      const t = setTimeout(() => {
        log.error('shutdown took longer than 5 s');
        log.flush();
        resolve(1);
      }, 5000);
      t.unref();
      void (async () => {
        await collector.close();
        if (control) await control.close();
        clearTimeout(t);
        log.info({ packets: collector.counters.packets, duplicates_skipped: collector.counters.duplicates, files: collector.counters.filesCompleted }, 'meshcap collect stopped');
        log.flush();
        resolve(0);
      })();
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}
