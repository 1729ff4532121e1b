/**
 * The broker sink: forwards captures to packet brokers (Arkime, PCAP-over-IP consumers, socat) or
 * to `meshcap collect`, over mutual TLS only, without losing packets. See docs/broker.md for the
 * operator's view; in short:
 *
 *  - `write()` frames the block's records in the stream format (classic pcap µs by default) into a
 *    buffer of its own and returns the pipeline's block at once: the hot path never waits here.
 *  - Each lane (one for failover over the broker list, one per broker in spread mode) keeps a
 *    bounded memory queue backed by an on-disk spool (spool.ts). When the broker is down or slow,
 *    the oldest queued batches go to the spool; when both are full, the NEWEST packets are dropped,
 *    counted (`broker_spool_full`), logged and, in pcapng, marked on the next packet that gets
 *    through (epb_dropcount plus a comment).
 *  - Every record gets a sequence number; a lane sends in sequence order: records to resend after a
 *    broken connection, then the spool, then the memory queue.
 *  - Delivery: with `meshcap collect` (ALPN meshcap-capture/1) the collector acknowledges what it
 *    has written; unacknowledged records are resent after a reconnect and the collector skips any
 *    it already has: exactly once. With a plain broker (no acknowledgements) the last
 *    `replayWindow` bytes sent are resent after a break: at least once, duplicates bounded by that
 *    window. A graceful close (close_notify answered by the broker) confirms everything sent.
 *  - TLS 1.2 minimum (1.3 preferred by negotiation), client certificate always presented, broker
 *    verified by DNS/IP SAN or a pinned SPIFFE ID. There is no plaintext path.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { spiffeIdOf, SpiffeMatcher, spiffePatternError } from '../control/spiffe.js';
import type { PipelineStats } from '../control/stats.js';
import { TlsFiles } from '../control/tls-files.js';
import { framerFor, type CaptureFormat } from '../format/index.js';
import { reframeBlock, reframedSize } from '../format/reframe.js';
import type { RecordFramer } from '../format/record-framer.js';
import type { Block } from '../packet/block.js';
import { copyBytes } from '../packet/copy-bytes.js';
import type { BlockSink } from './sink.js';
import { Spool, type SpoolBatch, type SpoolFormat, type SpoolMeta } from './spool.js';

// ---------------------------------------------------------------------------------------------
// Wire protocol meshcap-capture/1 (shared with `meshcap collect`)
// ---------------------------------------------------------------------------------------------

/** ALPN protocol id of the acknowledged capture stream. */
export const CAPTURE_ALPN = 'meshcap-capture/1';

/**
 * Frames: u32 big-endian length of what follows (type byte + body), u8 type, body.
 *  HELLO   (sidecar → collector) JSON CaptureHello
 *  WELCOME (collector → sidecar) JSON { next: number | null }: records below `next` of this stream
 *          are written already (null: stream unknown)
 *  DATA    (sidecar → collector) u32 firstSeq high, u32 firstSeq low, u32 count, then the records
 *  ACK     (collector → sidecar) u32 next high, u32 next low: every record below is written
 *  ERROR   (collector → sidecar) JSON { reason, message }, then the collector closes
 */
export const enum FrameType {
  Hello = 1,
  Welcome = 2,
  Data = 3,
  Ack = 4,
  Error = 5,
}

export const DATA_HEAD = 4 + 1 + 12;
/** Largest frame accepted (a batch is at most one pipeline block, re-framed). */
export const MAX_FRAME = 32 * 1024 * 1024;

export interface CaptureHello {
  v: 1;
  /** 32 hex digits, stable across restarts of the sidecar (kept in its spool). */
  stream: string;
  /** The sidecar instance (host/pod name), for file names. */
  instance: string;
  format: SpoolFormat;
  /** The file header (pcap global header, or pcapng SHB + IDB), base64. */
  header: string;
  /** Lowest sequence number the sidecar still holds, and the next it will assign. */
  first: number;
  next: number;
}

export function encodeFrame(type: FrameType, body: Buffer | string | object): Buffer {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
  const f = Buffer.allocUnsafe(5 + b.length);
  f.writeUInt32BE(1 + b.length, 0);
  f[4] = type;
  b.copy(f, 5);
  return f;
}

export function dataFrameHead(firstSeq: number, count: number, payloadLen: number): Buffer {
  const h = Buffer.allocUnsafe(DATA_HEAD);
  h.writeUInt32BE(1 + 12 + payloadLen, 0);
  h[4] = FrameType.Data;
  h.writeUInt32BE(Math.floor(firstSeq / 4294967296), 5);
  h.writeUInt32BE(firstSeq % 4294967296, 9);
  h.writeUInt32BE(count, 13);
  return h;
}

export function ackFrame(next: number): Buffer {
  const f = Buffer.allocUnsafe(13);
  f.writeUInt32BE(9, 0);
  f[4] = FrameType.Ack;
  f.writeUInt32BE(Math.floor(next / 4294967296), 5);
  f.writeUInt32BE(next % 4294967296, 9);
  return f;
}

export function readU64(b: Buffer, off: number): number {
  return b.readUInt32BE(off) * 4294967296 + b.readUInt32BE(off + 4);
}

/** Splits a byte stream into frames. */
export class FrameReader {
  private chunks: Buffer[] = [];
  private have = 0;

  constructor(private readonly maxFrame = MAX_FRAME) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.have += chunk.length;
  }

  get buffered(): number {
    return this.have;
  }

  /** The next whole frame, or null. Throws on a frame larger than the limit. */
  next(): { type: number; body: Buffer } | null {
    if (this.have < 5) return null;
    const head = this.peek(4);
    const len = head.readUInt32BE(0);
    if (len < 1 || len > this.maxFrame) throw new Error(`frame of ${len} bytes (limit ${this.maxFrame})`);
    if (this.have < 4 + len) return null;
    const all = this.take(4 + len);
    return { type: all[4]!, body: all.subarray(5) };
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!;
    return Buffer.concat(this.chunks).subarray(0, n);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length === n) {
      this.chunks.shift();
      this.have -= n;
      return first;
    }
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      this.have -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let o = 0;
    while (o < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - o);
      c.copy(out, o, 0, k);
      o += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Records in a stream format
// ---------------------------------------------------------------------------------------------

const EPB = 6;

/**
 * The offset just past the record at `off` (pcap record or pcapng EPB, little-endian), or -1 when
 * the buffer ends inside it, or -2 when it is not a valid record.
 */
export function recordEnd(buf: Buffer, off: number, format: SpoolFormat): number {
  if (format === 'pcapng') {
    if (off + 12 > buf.length) return -1;
    const type = buf.readUInt32LE(off);
    const total = buf.readUInt32LE(off + 4);
    if (type !== EPB || total < 32 || total % 4 !== 0) return -2;
    if (off + total > buf.length) return -1;
    if (buf.readUInt32LE(off + total - 4) !== total) return -2;
    if (buf.readUInt32LE(off + 8) !== 0 || 28 + buf.readUInt32LE(off + 20) > total - 4) return -2;
    return off + total;
  }
  if (off + 16 > buf.length) return -1;
  const incl = buf.readUInt32LE(off + 8);
  if (incl > 262144 || buf.readUInt32LE(off + 12) < incl) return -2;
  if (off + 16 + incl > buf.length) return -1;
  return off + 16 + incl;
}

/** Counts whole records in `buf`; -1 when it is not a whole number of valid records. */
export function countRecords(buf: Buffer, format: SpoolFormat): number {
  let n = 0;
  let off = 0;
  while (off < buf.length) {
    const end = recordEnd(buf, off, format);
    if (end < 0) return -1;
    off = end;
    n++;
  }
  return n;
}

/** Byte offset of record number `n` (0-based) in `buf`. */
export function recordOffset(buf: Buffer, format: SpoolFormat, n: number): number {
  let off = 0;
  for (let i = 0; i < n; i++) {
    const end = recordEnd(buf, off, format);
    if (end < 0) throw new Error(`record ${i} of the batch is not whole`);
    off = end;
  }
  return off;
}

/** Validates a stream file header for `format`; returns the reason it is not one, or null. */
export function fileHeaderError(header: Buffer, format: SpoolFormat): string | null {
  if (format === 'pcapng') {
    if (header.length < 28 || header.readUInt32LE(0) !== 0x0a0d0d0a || header.readUInt32LE(8) !== 0x1a2b3c4d) return 'not a little-endian pcapng section header';
    const shbLen = header.readUInt32LE(4);
    if (shbLen % 4 || shbLen > header.length - 20) return 'section header length';
    if (header.readUInt32LE(shbLen) !== 1) return 'no interface description block after the section header';
    const idbLen = header.readUInt32LE(shbLen + 4);
    if (shbLen + idbLen !== header.length) return 'header is not exactly one SHB and one IDB';
    return null;
  }
  if (header.length !== 24) return 'pcap header is not 24 bytes';
  const magic = header.readUInt32LE(0);
  if (magic !== (format === 'pcap-ns' ? 0xa1b23c4d : 0xa1b2c3d4)) return `pcap magic 0x${magic.toString(16)} does not match ${format}`;
  return null;
}

/**
 * Re-frames records from one stream format into another (a spool written with another
 * --broker-format). Slow path: parses each record.
 */
export function convertRecords(data: Buffer, from: SpoolFormat, to: RecordFramer): { data: Buffer; count: number } {
  interface R {
    off: number;
    cap: number;
    orig: number;
    sec: number;
    nsec: number;
    dir: number;
    comment: Buffer | null;
    drop: number;
  }
  const recs: R[] = [];
  let off = 0;
  while (off < data.length) {
    const end = recordEnd(data, off, from);
    if (end < 0) throw new Error('convertRecords: not a whole number of records');
    if (from === 'pcapng') {
      const ts = (BigInt(data.readUInt32LE(off + 12)) << 32n) | BigInt(data.readUInt32LE(off + 16));
      const cap = data.readUInt32LE(off + 20);
      const r: R = { off: off + 28, cap, orig: data.readUInt32LE(off + 24), sec: Number(ts / 1_000_000_000n), nsec: Number(ts % 1_000_000_000n), dir: 0, comment: null, drop: 0 };
      let o = off + 28 + ((cap + 3) & ~3);
      while (o + 4 <= end - 4) {
        const code = data.readUInt16LE(o);
        const len = data.readUInt16LE(o + 2);
        if (code === 0) break;
        if (code === 1) r.comment = Buffer.from(data.subarray(o + 4, o + 4 + len));
        else if (code === 2 && len === 4) r.dir = data.readUInt32LE(o + 4) & 3;
        else if (code === 4 && len === 8) r.drop = data.readUInt32LE(o + 4);
        o += 4 + ((len + 3) & ~3);
      }
      recs.push(r);
    } else {
      const frac = data.readUInt32LE(off + 4);
      recs.push({ off: off + 16, cap: data.readUInt32LE(off + 8), orig: data.readUInt32LE(off + 12), sec: data.readUInt32LE(off), nsec: from === 'pcap-ns' ? frac : frac * 1000, dir: 0, comment: null, drop: 0 });
    }
    off = end;
  }
  const ann = to.carriesAnnotations;
  let size = 0;
  for (const r of recs) size += to.recordSize(r.cap, ann && r.comment ? r.comment.length : 0, ann && r.drop > 0);
  const out = Buffer.alloc(size);
  let o = 0;
  for (const r of recs) {
    const frameOff = o + to.head;
    data.copy(out, frameOff, r.off, r.off + r.cap);
    o = to.finish(out, frameOff, r.cap, r.orig, r.sec, r.nsec, r.dir, ann ? r.comment : null, ann ? r.drop : 0);
  }
  return { data: out, count: recs.length };
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

export interface BrokerEndpoint {
  host: string;
  port: number;
  /** host:port as given (IPv6 in brackets), the `broker` label of metrics. */
  label: string;
}

/** Parses `tls://HOST:PORT` (IPv6 as `tls://[::1]:PORT`). Anything else, plaintext above all, is refused. */
export function parseBrokerUrl(text: string): BrokerEndpoint {
  const m = /^tls:\/\/(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text.trim());
  if (!m) {
    if (/^(tcp|pcap|http|plain)s?:\/\//i.test(text) && !/^tls:/i.test(text)) throw new Error(`broker "${text}": only tls:// is supported (captures hold plaintext; there is no unencrypted transport)`);
    throw new Error(`broker "${text}": expected tls://HOST:PORT`);
  }
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) throw new Error(`broker "${text}": port out of range`);
  if (m[1] && net.isIPv6(host) === false) throw new Error(`broker "${text}": bad IPv6 address`);
  return { host, port, label: m[1] ? `[${host}]:${port}` : `${host}:${port}` };
}

/** Parses a byte size: 1073741824, 512K, 64M, 1G, 2T (binary units; an optional trailing B or iB). */
export function parseByteSize(text: string | number, what = 'size'): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text) || text < 0) throw new Error(`${what}: expected a byte count, got ${text}`);
    return text;
  }
  const m = /^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$/i.exec(text);
  if (!m) throw new Error(`${what}: expected a size like 1073741824, 512M or 1G, got "${text}"`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n)) throw new Error(`${what}: "${text}" is too large`);
  return n;
}

/**
 * Bytes that can be accepted by the kernel and still not have reached the broker process: our
 * send buffer, the broker's receive buffer (assumed as large as ours may grow) and 1 MiB of the
 * broker's own buffers. Read from the Linux sysctls; 16 MiB when they cannot be read.
 */
export function defaultReplayWindow(): number {
  const max = (file: string): number | null => {
    try {
      const parts = fs.readFileSync(file, 'utf8').trim().split(/\s+/).map(Number);
      const v = parts[parts.length - 1]!;
      return Number.isFinite(v) && v > 0 ? v : null;
    } catch {
      return null;
    }
  };
  const w = max('/proc/sys/net/ipv4/tcp_wmem');
  const r = max('/proc/sys/net/ipv4/tcp_rmem');
  if (w === null || r === null) return 16 << 20;
  return Math.min(128 << 20, Math.max(4 << 20, w + r + (1 << 20)));
}

export interface BrokerSinkOptions {
  brokers: BrokerEndpoint[];
  /** failover: one stream to the first broker that answers, in order; spread: flows hashed over all. */
  mode: 'failover' | 'spread';
  format: CaptureFormat;
  snaplen: number;
  tls: TlsFiles;
  /** Pinned SPIFFE ID (or glob) of the broker's URI SAN; null: DNS/IP SAN check. */
  brokerSpiffeId: string | null;
  /** Spool directory (each lane uses a subdirectory); null: memory only. */
  spoolDir: string | null;
  /** Spool cap in bytes, shared by the lanes; 0: memory only. */
  spoolMaxBytes: number;
  /** Memory queue per sink in bytes (shared by the lanes). */
  queueBytes: number;
  /** Plain brokers: bytes resent after a broken connection ('auto': defaultReplayWindow()). */
  replayWindowBytes: number | 'auto';
  /** meshcap collect: unacknowledged bytes in flight at most. */
  ackWindowBytes?: number;
  /** Reconnect backoff: first delay and cap (ms); each failure doubles it, with jitter. */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  connectTimeoutMs?: number;
  /** TLS 1.3 plain brokers: wait this long for the session ticket that proves the broker accepted our certificate. */
  acceptWaitMs?: number;
  /** No progress for this long with data outstanding → the connection is presumed dead. */
  stallTimeoutMs?: number;
  /** Failover: after this long on a secondary broker, go back to the first (0: never). */
  failbackMs?: number;
  /** close(): how long to keep trying to deliver before spooling what is left. */
  closeTimeoutMs?: number;
  /** Instance name sent to meshcap collect (default: $HOSTNAME or os.hostname()). */
  instance?: string;
  /** Close the TlsFiles (stop polling) when the sink closes. */
  ownsTls?: boolean;
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

interface Batch {
  firstSeq: number;
  count: number;
  data: Buffer;
  fromSpool: boolean;
}

interface Sent {
  batch: Batch;
  seqEnd: number;
  /** Bytes written on the connection once this batch was. */
  endOffset: number;
  sentAt: number;
}

type ConnState = 'connecting' | 'open' | 'draining' | 'closed';

interface Connection {
  id: number;
  ep: BrokerEndpoint;
  epIndex: number;
  sock: tls.TLSSocket;
  mode: 'ack' | 'plain' | null;
  state: ConnState;
  openedAt: number;
  bytesOut: number;
  /** Plain: bytes whose write callback fired. */
  flushed: number;
  lastProgress: number;
  reader: FrameReader;
  timers: NodeJS.Timeout[];
  /** Set when the connection has been given up (error/close handled once). */
  done: boolean;
  /** Plain: our close_notify went out and the broker closed its side in answer. */
  confirmed: boolean;
  /** TLS 1.3: a session ticket arrived (the broker accepted our certificate). */
  sessionSeen: boolean;
  endWaiters: Array<(confirmed: boolean) => void>;
}

export interface EndpointCounters {
  connected: boolean;
  connections: number;
  disconnects: number;
  failures: Map<string, number>;
}

/** Sequence numbers reserved per meta.json write (an unclean stop skips what was left). */
const LEASE = 1 << 20;
let connIds = 0;

function isIp(host: string): boolean {
  return net.isIP(host) !== 0;
}

/** Failure reasons (the `reason` label of meshcap_broker_connect_failures_total). */
export function classifyTlsError(err: NodeJS.ErrnoException): string {
  const code = err.code ?? '';
  if (code === 'ECONNREFUSED') return 'refused';
  if (code === 'ETIMEDOUT' || code === 'ERR_MESHCAP_TIMEOUT') return 'timeout';
  if (['EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'EADDRNOTAVAIL'].includes(code)) return 'unreachable';
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID' || code === 'ERR_MESHCAP_BROKER_SPIFFE_ID') return 'broker_identity_mismatch';
  if (code === 'CERT_HAS_EXPIRED' || code === 'CERT_NOT_YET_VALID') return 'broker_cert_expired';
  if (/^(UNABLE_TO_|SELF_SIGNED|DEPTH_ZERO|CERT_|INVALID_CA|INVALID_PURPOSE|PATH_LENGTH)/.test(code)) return 'broker_cert_untrusted';
  if (/ALERT/.test(code) || / alert /.test(err.message)) return 'rejected_by_broker';
  if (code === 'ERR_MESHCAP_REFUSED') return 'rejected_by_broker';
  if (code === 'ERR_MESHCAP_PROTOCOL') return 'protocol';
  if (code.startsWith('ERR_SSL') || code.startsWith('ERR_TLS')) return 'tls_error';
  if (code === 'ECONNRESET' || code === 'EPIPE' || code === 'ERR_MESHCAP_CLOSED') return 'closed';
  return 'other';
}

function meshcapError(code: string, message: string): NodeJS.ErrnoException {
  const e = new Error(message) as NodeJS.ErrnoException;
  e.code = code;
  return e;
}

/** One ordered stream of records to one broker (or to the first live one of a failover list). */
export class Lane {
  readonly label: string;
  streamId: string;
  nextSeq = 0;
  /** Every record below this was delivered (acknowledged or presumed) or is gone. */
  ackedSeq = 0;
  private leaseEnd = 0;
  private mem: Batch[] = [];
  memBytes = 0;
  private retry: Batch[] = [];
  retryBytes = 0;
  private inflight: Sent[] = [];
  inflightBytes = 0;
  readonly spool: Spool | null;
  private conn: Connection | null = null;
  private pumping = false;
  private reading = false;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private failbackTimer: NodeJS.Timeout | null = null;
  private failStreak = 0;
  private epIndex = 0;
  /** Packets dropped since the last accepted one (annotated on the next, in pcapng). */
  pendingDrop = 0;
  private dropEpisode = { count: 0, since: 0, lastLog: 0 };
  private maxSentSeq = 0;
  private closing = false;
  private stopped = false;
  private readonly freeBufs: Buffer[] = [];
  private poolCap = 0;
  /** The memory queue's cap: --broker-queue (this lane's share) minus what may wait for the spool disk. */
  private readonly memMax: number;
  private readonly header: Buffer;
  readonly endpointCounters = new Map<string, EndpointCounters>();
  // Counters for metrics.
  acceptedPackets = 0;
  sentPackets = 0;
  sentBytes = 0;
  resentPackets = 0;
  deliveredPackets = 0;
  droppedPackets = 0;
  lostPackets = 0;

  constructor(
    private readonly sink: BrokerSink,
    readonly endpoints: BrokerEndpoint[],
    dirName: string | null,
    memMax: number,
    spoolMax: number,
  ) {
    const o = sink.opts;
    this.label = o.mode === 'spread' ? endpoints[0]!.label : endpoints.map((e) => e.label).join(',');
    for (const ep of endpoints) this.endpointCounters.set(ep.label, { connected: false, connections: 0, disconnects: 0, failures: new Map() });
    this.header = sink.framer.fileHeader({ snaplen: o.snaplen });
    // One memory budget (--broker-queue) for the batches queued in memory and those on their way
    // to the spool: a quarter of it may wait for the spool disk, the rest is the memory queue.
    const spooling = Boolean(o.spoolDir) && Boolean(dirName) && spoolMax > 0;
    const pendingMax = spooling ? Math.max(1 << 20, Math.floor(memMax / 4)) : 0;
    this.memMax = memMax - pendingMax;
    this.spool = spooling ? Spool.open(path.join(o.spoolDir!, dirName!), { maxBytes: spoolMax, maxPendingBytes: pendingMax, onCorrupt: (n) => this.corrupt(n) }, sink.log) : null;
    const meta = this.spool?.meta ?? null;
    this.streamId = meta?.streamId ?? randomBytes(16).toString('hex');
    this.nextSeq = meta ? (meta.clean ? meta.nextSeq : meta.leaseEnd) : 0;
    if (meta && !meta.clean) {
      sink.log.warn(
        { lane: this.label, stream: this.streamId, next_seq: this.nextSeq, reason: 'broker_unclean_restart' },
        'meshcap did not stop cleanly last time: packets it held in memory then are lost (spooled ones are not); sequence numbers jump past the last reserved range, so a collector reports a gap',
      );
    }
    if (this.spool) {
      this.nextSeq = Math.max(this.nextSeq, this.spool.endSeq);
      this.ackedSeq = this.spool.peekSeq() ?? this.nextSeq;
      if (this.spool.recovered.records > 0 || this.spool.records > 0) {
        sink.log.info(
          { lane: this.label, spool: this.spool.dir, records: this.spool.records, bytes: this.spool.bytes, torn_bytes: this.spool.recovered.tornBytes, stream: this.streamId },
          'broker spool holds packets from a previous run; they are sent first',
        );
      }
      this.leaseEnd = this.nextSeq + LEASE;
      this.saveMeta(false);
    } else {
      this.ackedSeq = this.nextSeq;
    }
  }

  private saveMeta(clean: boolean): void {
    if (!this.spool) return;
    const meta: SpoolMeta = { version: 1, streamId: this.streamId, nextSeq: this.nextSeq, leaseEnd: this.leaseEnd, clean, ackedSeq: this.ackedSeq, format: this.sink.format };
    try {
      this.spool.saveMeta(meta);
    } catch (err) {
      this.sink.log.error({ lane: this.label, err: (err as Error).message, reason: 'spool_meta_write_failed' }, 'cannot write spool meta.json');
    }
  }

  private corrupt(records: number): void {
    this.lostPackets += records;
    this.sink.stats.drop('sink_error', records);
  }

  get connected(): boolean {
    return this.conn !== null && (this.conn.state === 'open' || this.conn.state === 'draining');
  }

  get queuedBytes(): number {
    return this.memBytes + this.retryBytes;
  }

  /** Whether everything accepted so far was delivered. */
  get idle(): boolean {
    return this.mem.length === 0 && this.retry.length === 0 && this.inflight.length === 0 && !(this.spool?.batches ?? 0);
  }

  start(): void {
    this.connect();
  }

  // ----- accepting records --------------------------------------------------------------------

  acquireBuf(size: number): Buffer {
    if (size > this.poolCap) {
      // Pool buffers of the largest size seen (a block re-framed), so steady traffic reuses them.
      this.poolCap = Math.max(size, 64 * 1024);
      this.freeBufs.length = 0;
    }
    return this.freeBufs.pop() ?? Buffer.allocUnsafeSlow(this.poolCap);
  }

  private releaseBuf(b: Batch): void {
    if (b.fromSpool) return;
    const ab = b.data.buffer;
    if (ab.byteLength === this.poolCap && b.data.byteOffset === 0 && this.freeBufs.length < 16) {
      this.freeBufs.push(Buffer.from(ab, 0, this.poolCap));
    }
  }

  /**
   * Takes `count` records framed in `data` (a buffer from acquireBuf, trimmed). The caller has
   * already put `pendingDrop` into the first record (pcapng).
   */
  accept(data: Buffer, count: number): void {
    const size = data.length;
    const spool = this.spool;
    // Make room in memory by moving the oldest queued batches to the spool.
    while (this.memBytes + size > this.memMax && this.mem.length > 0 && spool && spool.canAccept(this.mem[0]!.data.length)) {
      const head = this.mem.shift()!;
      this.memBytes -= head.data.length;
      spool.append({ firstSeq: head.firstSeq, count: head.count, format: this.sink.format, data: head.data });
    }
    let toSpool = false;
    if (this.memBytes + size > this.memMax) {
      if (this.mem.length === 0 && spool && spool.canAccept(size)) {
        toSpool = true;
      } else {
        const refusal = spool ? spool.refusal(size) : 'full';
        const cause = refusal === 'slow' ? 'sink_backpressure' : refusal === 'error' ? 'sink_error' : 'broker_spool_full';
        this.drop(count, cause);
        this.releaseBuf({ firstSeq: 0, count, data, fromSpool: false });
        return;
      }
    }
    if (this.nextSeq + count >= this.leaseEnd && this.spool) {
      this.leaseEnd = this.nextSeq + count + LEASE;
      this.saveMeta(false);
    }
    const batch: Batch = { firstSeq: this.nextSeq, count, data, fromSpool: false };
    this.nextSeq += count;
    this.acceptedPackets += count;
    if (this.pendingDrop > 0) this.endDropEpisode();
    if (toSpool) {
      spool!.append({ firstSeq: batch.firstSeq, count, format: this.sink.format, data });
    } else {
      this.mem.push(batch);
      this.memBytes += size;
    }
    if (this.connected) this.pump();
  }

  private drop(count: number, cause: 'broker_spool_full' | 'sink_backpressure' | 'sink_error'): void {
    this.sink.stats.drop(cause, count);
    this.droppedPackets += count;
    this.pendingDrop += count;
    const now = Date.now();
    const ep = this.dropEpisode;
    if (ep.count === 0) {
      ep.since = now;
      ep.lastLog = now;
      this.sink.log.error(
        { lane: this.label, reason: cause, packets: count, queue_bytes: this.queuedBytes, spool_bytes: this.spool?.bytes ?? 0, spool_max: this.spool?.opts.maxBytes ?? 0, connected: this.connected },
        cause === 'broker_spool_full'
          ? 'broker unreachable or slow and its spool is full: dropping the newest packets (counted; marked in-band in pcapng)'
          : cause === 'sink_backpressure'
            ? 'broker spool disk cannot keep up: dropping the newest packets (counted)'
            : 'broker spool disk failing: dropping the newest packets (counted)',
      );
    } else if (now - ep.lastLog >= 10_000) {
      ep.lastLog = now;
      this.sink.log.error({ lane: this.label, reason: cause, packets: ep.count + count, since: new Date(ep.since).toISOString() }, 'broker sink still dropping packets');
    }
    ep.count += count;
  }

  private endDropEpisode(): void {
    const ep = this.dropEpisode;
    if (ep.count > 0) {
      this.sink.log.warn({ lane: this.label, packets: ep.count, duration_ms: Date.now() - ep.since, reason: 'broker_spool_full' }, 'broker sink accepting packets again after dropping some');
    }
    ep.count = 0;
    this.pendingDrop = 0;
  }

  // ----- connection management ----------------------------------------------------------------

  private connect(): void {
    if (this.stopped || this.conn) return;
    const ep = this.endpoints[this.epIndex]!;
    const o = this.sink.opts;
    const mat = o.tls.current;
    const spiffe = this.sink.brokerSpiffe;
    const sock = tls.connect({
      host: ep.host,
      port: ep.port,
      ...(isIp(ep.host) ? {} : { servername: ep.host }),
      cert: mat.cert,
      key: mat.key,
      ca: mat.ca,
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.3',
      ALPNProtocols: [CAPTURE_ALPN],
      rejectUnauthorized: true,
      ...(spiffe
        ? {
            checkServerIdentity: (_host: string, cert: tls.PeerCertificate): Error | undefined => {
              const why: { reason?: string } = {};
              const id = spiffeIdOf(cert, why);
              if (spiffe.allows(id)) return undefined;
              return meshcapError('ERR_MESHCAP_BROKER_SPIFFE_ID', `broker presented SPIFFE ID ${id ?? `(none: ${why.reason})`}, expected ${spiffe.patterns.join(' or ')}`);
            },
          }
        : {}),
    });
    const conn: Connection = {
      id: ++connIds,
      ep,
      epIndex: this.epIndex,
      sock,
      mode: null,
      state: 'connecting',
      openedAt: Date.now(),
      bytesOut: 0,
      flushed: 0,
      lastProgress: Date.now(),
      reader: new FrameReader(1 << 16),
      timers: [],
      done: false,
      confirmed: false,
      sessionSeen: false,
      endWaiters: [],
    };
    this.conn = conn;
    sock.setKeepAlive(true, 10_000);
    sock.setNoDelay(true);
    conn.timers.push(setTimeout(() => this.fail(conn, meshcapError('ERR_MESHCAP_TIMEOUT', `no TLS session within ${o.connectTimeoutMs ?? 5000} ms`)), o.connectTimeoutMs ?? 5000));
    sock.on('secureConnect', () => this.onSecure(conn, mat.generation));
    sock.on('data', (d: Buffer) => this.onData(conn, d));
    sock.on('session', () => {
      // Emitted from inside OpenSSL's read path: writing from here would corrupt the record
      // stream (the broker sees "bad record mac"). Continue outside it.
      conn.sessionSeen = true;
      if (conn.state === 'connecting' && conn.mode === 'plain') setImmediate(() => this.established(conn, null));
    });
    sock.on('error', (err: NodeJS.ErrnoException) => this.fail(conn, err));
    sock.on('end', () => {
      if (conn.state === 'draining' && conn.mode === 'plain') conn.confirmed = true;
      if (conn.state === 'connecting') this.fail(conn, meshcapError('ERR_MESHCAP_CLOSED', 'broker closed the connection during setup'));
    });
    sock.on('close', () => this.fail(conn, meshcapError('ERR_MESHCAP_CLOSED', 'connection closed')));
    sock.on('drain', () => this.pump());
  }

  private onSecure(conn: Connection, generation: number): void {
    if (conn.done) return;
    const sock = conn.sock;
    conn.mode = sock.alpnProtocol === CAPTURE_ALPN ? 'ack' : 'plain';
    this.sink.log.debug({ broker: conn.ep.label, protocol: sock.getProtocol(), alpn: sock.alpnProtocol || null, cert_generation: generation }, 'TLS handshake done');
    if (conn.mode === 'ack') {
      const hello: CaptureHello = {
        v: 1,
        stream: this.streamId,
        instance: this.sink.instance,
        format: this.sink.format,
        header: this.header.toString('base64'),
        first: this.ackedSeq,
        next: this.nextSeq,
      };
      sock.write(encodeFrame(FrameType.Hello, hello));
    } else if (sock.getProtocol() === 'TLSv1.2') {
      // In TLS 1.2 the broker's Finished comes after it checked our certificate: accepted.
      this.established(conn, null);
    } else if (conn.sessionSeen) {
      setImmediate(() => this.established(conn, null));
    } else {
      // TLS 1.3: the client's handshake ends before the server has checked our certificate. A
      // broker that refuses it answers with an alert; one that accepts sends session tickets.
      // Wait for either (or accept after acceptWaitMs: some servers send no tickets).
      conn.timers.push(
        setTimeout(() => {
          if (conn.state === 'connecting' && !conn.done) this.established(conn, null);
        }, this.sink.opts.acceptWaitMs ?? 1000),
      );
    }
  }

  private onData(conn: Connection, d: Buffer): void {
    if (conn.done) return;
    if (conn.mode !== 'ack') return; // plain brokers send nothing we use
    conn.reader.push(d);
    try {
      for (let f = conn.reader.next(); f; f = conn.reader.next()) {
        if (f.type === FrameType.Welcome && conn.state === 'connecting') {
          const w = JSON.parse(f.body.toString('utf8')) as { next: number | null };
          if (w.next !== null && (!Number.isSafeInteger(w.next) || w.next < 0)) throw new Error('bad WELCOME');
          this.established(conn, w.next);
        } else if (f.type === FrameType.Ack && conn.state !== 'connecting') {
          if (f.body.length !== 8) throw new Error('bad ACK');
          const next = readU64(f.body, 0);
          if (next > Math.max(this.maxSentSeq, this.ackedSeq)) throw new Error(`ACK ${next} beyond what was sent (${this.maxSentSeq})`);
          conn.lastProgress = Date.now();
          this.delivered(next);
          if (conn.state === 'draining' && this.inflight.length === 0) this.notifyDrained(conn);
          this.pump();
        } else if (f.type === FrameType.Error) {
          let msg = f.body.toString('utf8');
          try {
            const e = JSON.parse(msg) as { reason?: string; message?: string };
            msg = `${e.reason ?? 'error'}: ${e.message ?? ''}`;
          } catch {
            /* raw text */
          }
          this.fail(conn, meshcapError('ERR_MESHCAP_REFUSED', `collector refused the stream: ${msg}`));
          return;
        } else {
          throw new Error(`unexpected frame type ${f.type}`);
        }
      }
    } catch (err) {
      this.fail(conn, meshcapError('ERR_MESHCAP_PROTOCOL', `protocol error from collector: ${(err as Error).message}`));
    }
  }

  private established(conn: Connection, peerNext: number | null): void {
    if (conn.done || conn.state !== 'connecting') return;
    for (const t of conn.timers) clearTimeout(t);
    conn.timers = [];
    if (conn.mode === 'ack' && peerNext !== null) {
      if (peerNext > this.nextSeq) {
        this.fail(conn, meshcapError('ERR_MESHCAP_PROTOCOL', `collector claims ${peerNext} records of stream ${this.streamId}, only ${this.nextSeq} exist`));
        return;
      }
      if (peerNext < this.ackedSeq) {
        this.sink.log.warn(
          { broker: conn.ep.label, stream: this.streamId, collector_next: peerNext, acked: this.ackedSeq, reason: 'collector_behind' },
          'collector has fewer records of this stream than were acknowledged before (another collector, or its state was lost): those cannot be resent',
        );
      }
      this.delivered(peerNext);
    }
    conn.state = 'open';
    conn.lastProgress = Date.now();
    const c = this.endpointCounters.get(conn.ep.label)!;
    c.connected = true;
    c.connections++;
    const sock = conn.sock;
    const peer = sock.getPeerCertificate();
    this.sink.log.info(
      {
        broker: conn.ep.label,
        lane: this.label,
        protocol: sock.getProtocol(),
        cipher: sock.getCipher()?.name,
        delivery: conn.mode === 'ack' ? 'acknowledged (exactly once)' : 'plain (at least once)',
        broker_spiffe_id: spiffeIdOf(peer),
        broker_subject: peer?.subject?.CN,
        our_cert_serial: this.sink.opts.tls.current.info.serial,
        pending_records: this.nextSeq - this.ackedSeq,
        stream: this.streamId,
      },
      'connected to broker',
    );
    if (conn.mode === 'plain') {
      // Every connection is a capture of its own: it starts with a file header.
      conn.bytesOut += this.header.length;
      const end = conn.bytesOut;
      sock.write(this.header, (err) => {
        if (!err) conn.flushed = Math.max(conn.flushed, end);
      });
    }
    // Stall watchdog: outstanding data and no progress → the peer is gone (half-open).
    const stall = this.sink.opts.stallTimeoutMs ?? 30_000;
    const t = setInterval(() => {
      const outstanding = conn.mode === 'ack' ? this.inflight.length > 0 : sock.writableLength > 0 || conn.flushed < conn.bytesOut;
      if (!outstanding) conn.lastProgress = Date.now();
      else if (Date.now() - conn.lastProgress > stall) this.fail(conn, meshcapError('ETIMEDOUT', `no progress for ${stall} ms with data outstanding`));
    }, Math.min(1000, stall / 2));
    t.unref();
    conn.timers.push(t);
    if (conn.epIndex > 0 && (this.sink.opts.failbackMs ?? 60_000) > 0 && this.sink.opts.mode === 'failover') {
      this.failbackTimer = setTimeout(() => void this.failback(conn), this.sink.opts.failbackMs ?? 60_000);
      this.failbackTimer.unref();
    }
    this.pump();
  }

  /** Gives up a connection (once): counts, logs, requeues what it had not delivered, schedules a reconnect. */
  private fail(conn: Connection, err: NodeJS.ErrnoException): void {
    if (conn.done) return;
    conn.done = true;
    const wasOpen = conn.state === 'open' || conn.state === 'draining';
    const graceful = conn.state === 'draining' && (conn.mode === 'ack' ? this.inflight.length === 0 : conn.confirmed);
    conn.state = 'closed';
    for (const t of conn.timers) {
      clearTimeout(t);
      clearInterval(t);
    }
    if (this.failbackTimer) clearTimeout(this.failbackTimer);
    this.failbackTimer = null;
    conn.sock.destroy();
    const c = this.endpointCounters.get(conn.ep.label)!;
    if (conn.mode === 'plain' && graceful && this.inflight.length > 0) {
      // The broker read our close_notify, so it read everything sent before it (sends on one
      // connection go in sequence order, from the lowest undelivered record).
      this.delivered(this.inflight[this.inflight.length - 1]!.seqEnd);
    }
    const unconfirmed = this.requeueInflight();
    if (this.conn === conn) this.conn = null;
    for (const w of conn.endWaiters.splice(0)) w(graceful);
    if (wasOpen) {
      c.connected = false;
      if (graceful) {
        this.sink.log.info({ broker: conn.ep.label, lane: this.label, connected_ms: Date.now() - conn.openedAt }, 'broker connection closed gracefully; everything sent was confirmed');
      } else if (this.closing) {
        this.sink.log.warn({ broker: conn.ep.label, lane: this.label, reason: 'broker_unconfirmed_at_close', err: err.message, unconfirmed_records: unconfirmed }, 'broker connection closed at shutdown before the broker confirmed everything; the unconfirmed packets stay queued (spool)');
      } else {
        c.disconnects++;
        this.sink.log.warn(
          { broker: conn.ep.label, lane: this.label, reason: 'broker_disconnected', err: err.message, code: err.code, connected_ms: Date.now() - conn.openedAt, resend_records: unconfirmed },
          'broker connection lost; unconfirmed packets will be resent',
        );
      }
      // A connection that lived a while resets the backoff.
      if (Date.now() - conn.openedAt > 10_000) this.failStreak = 0;
    } else {
      const reason = classifyTlsError(err);
      c.failures.set(reason, (c.failures.get(reason) ?? 0) + 1);
      this.sink.log.warn({ broker: conn.ep.label, lane: this.label, reason, code: err.code, err: err.message, attempt: this.failStreak + 1 }, `cannot connect to broker: ${reason}`);
    }
    if (this.stopped || this.closing) return;
    if (graceful) {
      this.epIndex = 0;
      this.scheduleReconnect(0);
      return;
    }
    if (!wasOpen && this.epIndex + 1 < this.endpoints.length) {
      // Failover: the next broker of the list, now.
      this.epIndex++;
      this.scheduleReconnect(0);
      return;
    }
    // Start again from the first broker of the list.
    this.epIndex = 0;
    const o = this.sink.opts;
    const min = o.backoffMinMs ?? 250;
    const max = o.backoffMaxMs ?? 30_000;
    const base = Math.min(max, min * 2 ** Math.min(this.failStreak, 30));
    this.failStreak++;
    // "Equal jitter": half fixed, half random, so many sidecars do not reconnect in lockstep.
    this.scheduleReconnect(base / 2 + Math.random() * (base / 2));
  }

  private scheduleReconnect(ms: number): void {
    if (this.reconnectTimer || this.stopped) return;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.connect();
    }, ms);
    this.reconnectTimer.unref();
  }

  /** After a break: what was sent and not confirmed goes back in front of the queue. */
  private requeueInflight(): number {
    let records = 0;
    const back: Batch[] = [];
    for (const s of this.inflight) {
      records += s.seqEnd - Math.max(s.batch.firstSeq, this.ackedSeq);
      if (!s.batch.fromSpool) back.push(s.batch);
    }
    this.inflight = [];
    this.inflightBytes = 0;
    if (back.length) {
      this.retry = [...this.retry, ...back].sort((a, b) => a.firstSeq - b.firstSeq);
      this.retryBytes = this.retry.reduce((n, b) => n + b.data.length, 0);
    }
    this.spool?.rewind();
    return records;
  }

  /** Records below `seqEnd` are delivered: forget them everywhere. */
  private delivered(seqEnd: number): void {
    if (seqEnd <= this.ackedSeq) return;
    const before = this.ackedSeq;
    this.ackedSeq = seqEnd;
    let n = 0;
    while (this.inflight.length > 0 && this.inflight[0]!.seqEnd <= seqEnd) {
      const s = this.inflight.shift()!;
      this.inflightBytes -= s.batch.data.length;
      this.releaseBuf(s.batch);
    }
    const trim = (q: Batch[]): number => {
      let bytes = 0;
      while (q.length > 0 && q[0]!.firstSeq + q[0]!.count <= seqEnd) {
        const b = q.shift()!;
        bytes += b.data.length;
        this.releaseBuf(b);
      }
      return bytes;
    };
    this.retryBytes -= trim(this.retry);
    this.memBytes -= trim(this.mem);
    this.spool?.ack(seqEnd);
    n = seqEnd - before;
    this.deliveredPackets += n;
  }

  // ----- sending ------------------------------------------------------------------------------

  /** Sends queued batches in sequence order while the connection can take them. */
  pump(): void {
    // Synchronous on purpose: 'drain' may be emitted from process.nextTick, before any promise
    // callback could clear an async "pumping" flag, and a wake-up must never be lost.
    if (this.pumping || this.reading) return;
    const conn = this.conn;
    if (!conn || conn.state !== 'open' || conn.done) return;
    this.pumping = true;
    try {
      this.pumpLoop(conn);
    } finally {
      this.pumping = false;
    }
  }

  private pumpLoop(conn: Connection): void {
    const window = conn.mode === 'ack' ? (this.sink.opts.ackWindowBytes ?? 16 << 20) : Infinity;
    while (this.conn === conn && conn.state === 'open' && !conn.done) {
      if (this.inflightBytes >= window) return; // resumed by an ACK
      if (conn.sock.writableNeedDrain) return; // resumed by 'drain'
      const r = this.retry[0]?.firstSeq ?? Infinity;
      const s = this.spool?.peekSeq() ?? Infinity;
      const m = this.mem[0]?.firstSeq ?? Infinity;
      if (r === Infinity && s === Infinity && m === Infinity) return;
      if (r <= s && r <= m) {
        const batch = this.retry.shift()!;
        this.retryBytes -= batch.data.length;
        this.send(conn, batch);
      } else if (m < s) {
        const batch = this.mem.shift()!;
        this.memBytes -= batch.data.length;
        this.send(conn, batch);
      } else {
        // The spool is next: read it (asynchronously), then carry on.
        this.reading = true;
        this.spool!.read().then(
          (b) => {
            this.reading = false;
            // A broken connection rewound the spool: this batch is read again for the next one.
            if (b && this.conn === conn && conn.state === 'open' && !conn.done) this.sendSpooled(conn, b);
            this.pump();
          },
          (err: Error) => {
            this.reading = false;
            this.sink.log.error({ lane: this.label, err: err.message }, 'spool read failed');
            setTimeout(() => this.pump(), 1000).unref();
          },
        );
        return;
      }
    }
  }

  private sendSpooled(conn: Connection, b: SpoolBatch): void {
    const batch: Batch = { firstSeq: b.firstSeq, count: b.count, data: b.data, fromSpool: true };
    if (b.format !== this.sink.format) {
      try {
        batch.data = convertRecords(b.data, b.format, this.sink.framer).data;
      } catch (err) {
        this.sink.log.error({ lane: this.label, err: (err as Error).message, records: b.count, reason: 'spool_corrupt' }, 'spooled batch cannot be converted to the stream format; skipping it');
        this.corrupt(b.count);
        this.delivered(b.firstSeq + b.count);
        return;
      }
    }
    this.send(conn, batch);
  }

  private send(conn: Connection, batch: Batch): void {
    const end = batch.firstSeq + batch.count;
    if (end <= this.ackedSeq) {
      this.releaseBuf(batch);
      return;
    }
    let data = batch.data;
    let first = batch.firstSeq;
    if (first < this.ackedSeq) {
      // The peer has the head of this batch already: send from the first record it lacks.
      data = data.subarray(recordOffset(data, this.sink.format, this.ackedSeq - first));
      first = this.ackedSeq;
    }
    const count = end - first;
    const sock = conn.sock;
    if (conn.mode === 'ack') {
      sock.cork();
      sock.write(dataFrameHead(first, count, data.length));
      conn.bytesOut += DATA_HEAD;
    }
    conn.bytesOut += data.length;
    const endOffset = conn.bytesOut;
    const plain = conn.mode === 'plain';
    sock.write(data, (err) => {
      if (err || !plain) return;
      conn.flushed = Math.max(conn.flushed, endOffset);
      conn.lastProgress = Date.now();
      this.presume(conn);
    });
    if (conn.mode === 'ack') sock.uncork();
    this.inflight.push({ batch, seqEnd: end, endOffset, sentAt: Date.now() });
    this.inflightBytes += batch.data.length;
    const resent = Math.max(0, Math.min(end, this.maxSentSeq) - first);
    this.resentPackets += resent;
    this.sentPackets += count - resent;
    this.sentBytes += data.length;
    this.maxSentSeq = Math.max(this.maxSentSeq, end);
  }

  /** Plain brokers: what left our kernel `replayWindow` bytes ago is presumed delivered. */
  private presume(conn: Connection): void {
    if (this.conn !== conn || conn.done) return;
    const limit = conn.flushed - this.sink.replayWindow;
    let seq = this.ackedSeq;
    for (const s of this.inflight) {
      if (s.endOffset > limit) break;
      seq = s.seqEnd;
    }
    if (seq > this.ackedSeq) this.delivered(seq);
  }

  private notifyDrained(conn: Connection): void {
    for (const w of conn.endWaiters.splice(0)) w(true);
  }

  // ----- graceful stop ------------------------------------------------------------------------

  /**
   * Ends the current connection gracefully: ack mode waits for every acknowledgement, plain mode
   * sends close_notify and waits for the broker to close its side (which confirms delivery).
   * Resolves true when everything sent was confirmed.
   */
  private endGracefully(conn: Connection, timeoutMs: number): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      let settled = false;
      const finish = (ok: boolean): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(ok);
      };
      const timer = setTimeout(() => finish(false), Math.max(0, timeoutMs));
      if (conn.done) return finish(false);
      conn.state = 'draining';
      if (conn.mode === 'ack') {
        const end = (): void => {
          conn.sock.end();
          // Collector side closes after our close; 'close' runs fail() with graceful = true.
          conn.endWaiters.push(finish);
          if (conn.done) finish(this.inflight.length === 0);
        };
        if (this.inflight.length === 0) end();
        else conn.endWaiters.push(() => end());
      } else {
        conn.endWaiters.push(finish);
        conn.sock.end();
      }
    });
  }

  private async failback(conn: Connection): Promise<void> {
    if (this.conn !== conn || conn.state !== 'open') return;
    this.sink.log.info({ broker: conn.ep.label, lane: this.label, primary: this.endpoints[0]!.label }, 'failing back to the first broker');
    // Stop sending new data, let the current connection confirm, then reconnect from the top.
    const ok = await this.endGracefully(conn, 10_000);
    if (!ok && !conn.done) this.fail(conn, meshcapError('ERR_MESHCAP_CLOSED', 'failback: graceful close timed out'));
  }

  /** Delivers what it can within the deadline, then spools the rest. */
  async close(deadline: number): Promise<void> {
    this.closing = true;
    // Keep sending while connected (or connecting, with something to send), then close
    // gracefully so that the broker confirms what it got.
    while (Date.now() < deadline) {
      const conn = this.conn;
      if (!conn) break; // not connected: do not wait for the backoff timer
      if (conn.state === 'connecting' && this.idle) break;
      if (conn.state === 'open' && this.retry.length === 0 && this.mem.length === 0 && !this.spool?.hasUnread) {
        await this.endGracefully(conn, Math.max(100, deadline - Date.now()));
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    this.stopped = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (this.conn) this.fail(this.conn, meshcapError('ERR_MESHCAP_CLOSED', 'sink closing'));
    // What is left in memory goes to the spool, in sequence order.
    const left = this.retry.concat(this.mem).sort((a, b) => a.firstSeq - b.firstSeq);
    this.retry = [];
    this.mem = [];
    this.retryBytes = 0;
    this.memBytes = 0;
    let lost = 0;
    if (this.spool) await this.spool.flush();
    for (const b of left) {
      if (b.firstSeq + b.count <= this.ackedSeq) continue;
      if (!this.spool || !this.spool.appendSync({ firstSeq: b.firstSeq, count: b.count, format: this.sink.format, data: b.data })) lost += b.count;
    }
    if (this.spool) lost += this.spool.memoryOnlyRecords;
    if (lost > 0) {
      this.sink.stats.drop('broker_spool_full', lost);
      this.droppedPackets += lost;
      this.sink.log.error({ lane: this.label, packets: lost, reason: 'broker_spool_full' }, 'broker sink closing: packets neither delivered nor spooled are lost');
    }
    if (this.spool) {
      this.saveMeta(true);
      await this.spool.close();
      if (this.spool.records > 0) this.sink.log.info({ lane: this.label, spool: this.spool.dir, records: this.spool.records, bytes: this.spool.bytes }, 'undelivered packets kept in the broker spool for the next start');
    }
  }
}

export class BrokerSink implements BlockSink {
  readonly name = 'broker';
  readonly framer: RecordFramer;
  readonly format: SpoolFormat;
  readonly lanes: Lane[];
  readonly replayWindow: number;
  readonly brokerSpiffe: SpiffeMatcher | null;
  readonly instance: string;
  private closed = false;
  private closing: Promise<void> | null = null;
  private laneOf: Uint16Array = new Uint16Array(0);

  constructor(
    readonly opts: BrokerSinkOptions,
    readonly stats: PipelineStats,
    readonly log: Logger,
  ) {
    if (opts.brokers.length === 0) throw new Error('broker sink: no broker');
    if (opts.brokers.length > 1024) throw new Error('broker sink: too many brokers');
    this.framer = framerFor(opts.format);
    this.format = opts.format;
    this.replayWindow = opts.replayWindowBytes === 'auto' ? defaultReplayWindow() : opts.replayWindowBytes;
    this.instance = opts.instance ?? process.env.HOSTNAME ?? os.hostname();
    if (opts.brokerSpiffeId) {
      const err = spiffePatternError(opts.brokerSpiffeId);
      if (err) throw new Error(`broker SPIFFE ID "${opts.brokerSpiffeId}": ${err}`);
    }
    this.brokerSpiffe = opts.brokerSpiffeId ? new SpiffeMatcher([opts.brokerSpiffeId]) : null;
    const groups = opts.mode === 'spread' ? opts.brokers.map((b) => [b]) : [opts.brokers];
    const n = groups.length;
    const spoolMax = opts.spoolDir ? Math.floor(opts.spoolMaxBytes / n) : 0;
    const memMax = Math.max(1 << 20, Math.floor(opts.queueBytes / n));
    const dirs = groups.map((eps) => (opts.mode === 'spread' ? `spread-${eps[0]!.label.replace(/[^A-Za-z0-9.-]/g, '_')}` : 'failover'));
    this.lanes = groups.map((eps, i) => new Lane(this, eps, dirs[i]!, memMax, spoolMax));
    if (opts.spoolDir) this.warnOrphanSpools(opts.spoolDir, dirs);
  }

  /** Spool directories of lanes that no longer exist (another --broker-mode or broker list). */
  private warnOrphanSpools(dir: string, used: string[]): void {
    try {
      for (const name of fs.readdirSync(dir)) {
        if (used.includes(name)) continue;
        const sub = path.join(dir, name);
        if (!fs.statSync(sub).isDirectory()) continue;
        const segs = fs.readdirSync(sub).filter((n) => n.endsWith('.spool'));
        if (segs.length > 0) {
          this.log.warn({ spool: sub, segments: segs.length, reason: 'spool_orphaned' }, 'a broker spool of another broker list or mode holds undelivered packets; it is not sent (restore the old --broker/--broker-mode to deliver it)');
        }
      }
    } catch {
      /* nothing to report */
    }
  }

  start(): void {
    this.opts.tls.start();
    for (const l of this.lanes) l.start();
  }

  get packetsWritten(): number {
    let n = 0;
    for (const l of this.lanes) n += l.sentPackets;
    return n;
  }

  get bytesWritten(): number {
    let n = 0;
    for (const l of this.lanes) n += l.sentBytes;
    return n;
  }

  write(block: Block, release: (b: Block) => void): void {
    try {
      if (this.closed) {
        this.stats.drop('sink_error', block.count);
        return;
      }
      if (this.lanes.length === 1) {
        this.frameFor(this.lanes[0]!, block, null, 0);
        return;
      }
      if (this.laneOf.length < block.count) this.laneOf = new Uint16Array(block.maxFrames);
      const n = this.lanes.length;
      const counts = new Uint32Array(n);
      for (let i = 0; i < block.count; i++) {
        // Fibonacci hashing of the flow id: every packet of a flow goes to the same broker.
        const l = Math.floor((Math.imul(block.flowId[i]!, 0x9e3779b1) >>> 0) / 4294967296 * n);
        this.laneOf[i] = l;
        counts[l]!++;
      }
      for (let l = 0; l < n; l++) if (counts[l]! > 0) this.frameFor(this.lanes[l]!, block, this.laneOf, l);
    } catch (err) {
      this.stats.drop('sink_error', block.count);
      this.log.error({ err: (err as Error).message, reason: 'sink_error' }, 'broker sink failed to take a block');
    } finally {
      release(block);
    }
  }

  /** Frames the block's records for one lane (all, or those with laneOf[i] === lane) and queues them. */
  private frameFor(lane: Lane, block: Block, laneOf: Uint16Array | null, l: number): void {
    const fr = this.framer;
    const drop = lane.pendingDrop;
    if (laneOf === null && drop === 0 && block.framer.name === fr.name) {
      // Same format, nothing to add: one copy of the block's records.
      const len = block.recordBytes;
      const buf = lane.acquireBuf(len);
      copyBytes(buf, 0, block.records());
      lane.accept(buf.subarray(0, len), block.count);
      return;
    }
    // The lane's own losses are reported on the first record that gets through (pcapng only).
    const note = drop > 0 && fr.carriesAnnotations ? { text: Buffer.from(`meshcap: ${drop} packet${drop === 1 ? '' : 's'} dropped before this one by the broker sink (queue and spool full)`), drops: drop } : null;
    const keep = laneOf ? (i: number): boolean => laneOf[i] === l : undefined;
    const { bytes, count } = reframedSize(block, fr, keep, note);
    const buf = lane.acquireBuf(bytes);
    const o = reframeBlock(block, fr, buf, keep, note);
    lane.accept(buf.subarray(0, o), count);
  }

  /** Delivers what it can within closeTimeoutMs, spools the rest, closes. */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closed = true;
    const deadline = Date.now() + (this.opts.closeTimeoutMs ?? 2500);
    this.closing = (async () => {
      await Promise.all(this.lanes.map((l) => l.close(deadline)));
      if (this.opts.ownsTls !== false) this.opts.tls.stop();
    })();
    return this.closing;
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring for `meshcap serve`
// ---------------------------------------------------------------------------------------------

/** The raw values of the serve flags (as config.ts hands them over). */
export interface BrokerFlagValues {
  broker?: string[];
  'broker-mode'?: string;
  'broker-format'?: string;
  'broker-spiffe-id'?: string;
  'tls-cert'?: string;
  'tls-key'?: string;
  'tls-ca'?: string;
  'spool-dir'?: string;
  'spool-max'?: string | number;
  'broker-queue'?: string | number;
  'broker-replay-window'?: string | number;
}

export interface BrokerConfig {
  brokers: BrokerEndpoint[];
  mode: 'failover' | 'spread';
  format: 'pcap' | 'pcapng' | 'pcap-ns';
  brokerSpiffeId: string | null;
  tlsCert: string;
  tlsKey: string;
  tlsCa: string;
  spoolDir: string | null;
  spoolMaxBytes: number;
  queueBytes: number;
  replayWindowBytes: number | 'auto';
}

/**
 * Validates the broker flags; null when no --broker is given. Throws Error with a message naming
 * the flag (config.ts turns it into a ConfigError).
 */
export function resolveBrokerConfig(v: BrokerFlagValues, cwd: string): BrokerConfig | null {
  const list = v.broker ?? [];
  if (list.length === 0) {
    if (v['broker-spiffe-id'] !== undefined) throw new Error('"broker-spiffe-id" needs at least one --broker');
    return null;
  }
  const brokers = list.map((b) => {
    try {
      return parseBrokerUrl(b);
    } catch (err) {
      throw new Error(`"broker": ${(err as Error).message}`);
    }
  });
  const seen = new Set<string>();
  for (const b of brokers) {
    if (seen.has(b.label)) throw new Error(`"broker": ${b.label} is given twice`);
    seen.add(b.label);
  }
  const mode = v['broker-mode'] ?? 'failover';
  if (mode !== 'failover' && mode !== 'spread') throw new Error(`"broker-mode" must be failover or spread, got "${mode}"`);
  const format = v['broker-format'] ?? 'pcap';
  if (format !== 'pcap' && format !== 'pcapng' && format !== 'pcap-ns') throw new Error(`"broker-format" must be pcap, pcapng or pcap-ns, got "${format}"`);
  const need = (k: 'tls-cert' | 'tls-key' | 'tls-ca'): string => {
    const p = v[k];
    if (!p) throw new Error(`"${k}" is required with --broker (mutual TLS is mandatory)`);
    return path.resolve(cwd, p);
  };
  const spiffe = v['broker-spiffe-id'] ?? null;
  if (spiffe !== null) {
    const err = spiffePatternError(spiffe);
    if (err) throw new Error(`"broker-spiffe-id": ${err}`);
  }
  const size = (k: 'spool-max' | 'broker-queue', def: number): number => {
    const raw = v[k];
    if (raw === undefined) return def;
    try {
      return parseByteSize(raw, `"${k}"`);
    } catch (err) {
      throw new Error((err as Error).message);
    }
  };
  const spoolMaxBytes = size('spool-max', 1024 ** 3);
  const queueBytes = size('broker-queue', 64 << 20);
  if (queueBytes < 1 << 20) throw new Error('"broker-queue" must be at least 1M');
  const rw = v['broker-replay-window'];
  const replayWindowBytes = rw === undefined || rw === 'auto' ? 'auto' : parseByteSize(rw, '"broker-replay-window"');
  const spoolDir = spoolMaxBytes > 0 ? path.resolve(cwd, v['spool-dir'] ?? 'spool') : null;
  return { brokers, mode, format, brokerSpiffeId: spiffe, tlsCert: need('tls-cert'), tlsKey: need('tls-key'), tlsCa: need('tls-ca'), spoolDir, spoolMaxBytes, queueBytes, replayWindowBytes };
}

/**
 * Builds the broker sink from a BrokerConfig (loads the certificates: throws TlsFilesError when they
 * are unusable, and SpoolLockedError when another process uses the spool). Call `start()` after
 * `pipeline.addSink(sink)`.
 */
export function createBrokerSink(cfg: BrokerConfig, snaplen: number, stats: PipelineStats, log: Logger, extra: Partial<BrokerSinkOptions> = {}): BrokerSink {
  const tlsFiles = new TlsFiles({ cert: cfg.tlsCert, key: cfg.tlsKey, ca: cfg.tlsCa }, log, { role: 'broker client' });
  return new BrokerSink(
    {
      brokers: cfg.brokers,
      mode: cfg.mode,
      format: cfg.format,
      snaplen,
      tls: tlsFiles,
      brokerSpiffeId: cfg.brokerSpiffeId,
      spoolDir: cfg.spoolDir,
      spoolMaxBytes: cfg.spoolMaxBytes,
      queueBytes: cfg.queueBytes,
      replayWindowBytes: cfg.replayWindowBytes,
      ownsTls: true,
      ...extra,
    },
    stats,
    log,
  );
}
