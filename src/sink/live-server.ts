/**
 * The live endpoint: packets as they are made, streamed to authenticated viewers (Wireshark
 * through `meshcap extcap`, WebSocket clients, PCAP-over-IP tools on loopback).
 *
 * One TLS port (--live-listen) speaks two protocols, told apart by the first bytes the client
 * sends after the TLS handshake (docs/live.md):
 *
 *  - raw:       the client sends one request line
 *                 `MESHCAP-LIVE/1 token=<pct-encoded> filter=<pct-encoded> client=<pct-encoded>\n`
 *               (every parameter optional, values percent-encoded, unknown keys ignored, at most
 *               4096 bytes, within 10 s). Accepted: the server answers with a pcapng stream (SHB,
 *               IDB, then EPBs) and nothing else, until either side closes (a client that
 *               shuts down its sending side ends the session too). Refused: one line
 *               `MESHCAP-LIVE/1 <status> <reason> <message>\n` and the connection closes; no
 *               packet is sent. Status is 400 (bad request or filter), 401 (credentials missing),
 *               403 (credentials wrong), 503 (too many viewers).
 *  - WebSocket: `GET /live?filter=<url-encoded>&client=<name>` upgraded with `ws`; the token in
 *               `Authorization: Bearer <token>` (or, for browsers, the subprotocols
 *               `meshcap-live, bearer.<token>`). Each binary message holds whole pcapng blocks:
 *               the first SHB+IDB, then the EPBs of one pipeline block. Refusals are plain HTTP
 *               responses (400/401/403/404/426/503) before the upgrade.
 *
 * Authentication: bearer tokens (--live-token-file: one per line, `#` comments; SHA-256 digests
 * compared with crypto.timingSafeEqual, the file re-read when it changes) and/or client
 * certificates (--live-ca). With both configured, --live-auth all (default) requires both, any
 * requires one; a wrong token or a client certificate that does not verify is refused either way.
 * There is no cleartext or unauthenticated mode on this port. --live-insecure-loopback adds a
 * separate cleartext PCAP-over-IP listener (classic pcap, µs, Ethernet; no request, no filter) that
 * binds to loopback only, for Arkime, NetworkMiner or `wireshark -k -i TCP@127.0.0.1:57012`.
 *
 * Viewers never slow capture down: write() re-frames (per filter) and hands the bytes to each
 * viewer's socket synchronously and releases the block at once. A viewer whose socket has more
 * than --live-viewer-buffer bytes queued is disconnected (reason "slow", counted and audited).
 *
 * Mid-stream: a flow already open when a viewer joins starts mid-stream for it; its first packet
 * to that viewer carries a comment saying so (HTTP/2 header compression state is unknown). New flows
 * carry their handshake.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { IncomingMessage } from 'node:http';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import { Auditor, type EndReason, type RefusalReason, type ViewerIdentity, type ViewerProtocol } from '../control/audit.js';
import { TlsFiles, type TlsMaterial } from '../control/tls-files.js';
import { pcapFramer } from '../format/pcap.js';
import { pcapngFramer } from '../format/pcapng.js';
import type { RecordFramer } from '../format/record-framer.js';
import { appendComment, reframeBlock, reframedSize } from '../format/reframe.js';
import type { Block } from '../packet/block.js';
import { copyBytes } from '../packet/copy-bytes.js';
import {
  FilterError,
  metaFromFlowInfo,
  metaFromFrame,
  parseIntroComment,
  parseLiveFilter,
  type FlowMeta,
  type LiveFilter,
  type LiveFlowInfo,
} from './live-filter.js';
import type { BlockSink } from './sink.js';

export const LIVE_PROTOCOL = 'MESHCAP-LIVE/1';
export const LIVE_WS_PATH = '/live';
export const LIVE_WS_SUBPROTOCOL = 'meshcap-live';
export const DEFAULT_VIEWER_BUFFER_BYTES = 8 * 1024 * 1024;
export const DEFAULT_MAX_VIEWERS = 16;
/** The comment on a viewer's first packet of a flow that was already open when it joined. */
export const JOINED_MID_STREAM =
  'meshcap: viewer joined mid-stream; the connection start is not in this capture; HTTP/2 header compression (HPACK) state unknown, headers may not decode';

const MAX_REQUEST_LINE = 4096;
const MAX_HTTP_HEAD = 8192;
const MIN_TOKEN_LENGTH = 16;

export interface LiveServerOptions {
  /** --live-listen HOST:PORT: the TLS endpoint (raw + WebSocket). */
  listen?: string | null;
  /** --live-cert / --live-key: PEM files of the server certificate (chain) and key. */
  certFile?: string | null;
  keyFile?: string | null;
  /** --live-ca: PEM CA bundle that client certificates must chain to. */
  caFile?: string | null;
  /** --live-token-file: bearer tokens, one per line. */
  tokenFile?: string | null;
  /** --live-auth: with both a token file and a CA, require both (all) or either (any). */
  authMode?: 'all' | 'any';
  /** --live-insecure-loopback [HOST:]PORT: cleartext PCAP-over-IP on loopback. */
  insecureLoopback?: string | null;
  /** --live-viewer-buffer (bytes): queued bytes beyond which a viewer is cut off as slow. */
  viewerBufferBytes?: number;
  /** --live-max-viewers. */
  maxViewers?: number;
  /** How long a client may take to send its request (ms). */
  requestTimeoutMs?: number;
  /** Snaplen written in stream headers. */
  snaplen: number;
  /** Flow metadata by flow id (FlowTable.flowInfo), for host/port/node/flow filters. */
  flowInfo?: (id: number) => LiveFlowInfo | undefined;
  /** How often flows no longer open are forgotten (ms). */
  pruneIntervalMs?: number;
}

/** The serve flags, as config.ts would hold them. */
export interface LiveConfig {
  listen: string | null;
  cert: string | null;
  key: string | null;
  ca: string | null;
  tokenFile: string | null;
  authMode: 'all' | 'any';
  insecureLoopback: string | null;
  viewerBufferMiB: number;
  maxViewers: number;
}

/** What is wrong with a live configuration (a sentence naming the flags), or null. */
export function liveConfigProblem(c: LiveConfig): string | null {
  if (c.listen) {
    if (!parseHostPort(c.listen)) return `"live-listen": expected HOST:PORT (e.g. 0.0.0.0:9465 or [::1]:9465), got "${c.listen}"`;
    if (!c.cert || !c.key) return '"live-listen" needs "live-cert" and "live-key" (PEM files): the live endpoint only speaks TLS';
    if (!c.tokenFile && !c.ca) return '"live-listen" needs "live-token-file" and/or "live-ca": viewers must authenticate';
  } else {
    for (const [flag, v] of [['live-cert', c.cert], ['live-key', c.key], ['live-ca', c.ca], ['live-token-file', c.tokenFile]] as const) {
      if (v) return `"${flag}" is set but "live-listen" is not`;
    }
  }
  if (c.insecureLoopback) {
    const hp = parseHostPort(c.insecureLoopback.includes(':') ? c.insecureLoopback : `127.0.0.1:${c.insecureLoopback}`);
    if (!hp) return `"live-insecure-loopback": expected PORT or HOST:PORT, got "${c.insecureLoopback}"`;
    if (!isLoopback(hp.host)) return `"live-insecure-loopback": cleartext is only served on loopback (127.0.0.1 or ::1), got "${hp.host}"`;
  }
  if (!Number.isInteger(c.viewerBufferMiB) || c.viewerBufferMiB < 1 || c.viewerBufferMiB > 1024) return '"live-viewer-buffer" must be 1-1024 (MiB)';
  if (!Number.isInteger(c.maxViewers) || c.maxViewers < 1 || c.maxViewers > 1024) return '"live-max-viewers" must be 1-1024';
  if (c.authMode !== 'all' && c.authMode !== 'any') return '"live-auth" must be all or any';
  return null;
}

/** Parses HOST:PORT or [V6]:PORT. */
export function parseHostPort(text: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  if (!m) return null;
  const port = Number(m[3]);
  if (port > 65535) return null;
  return { host: m[1] ?? m[2]!, port };
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || (net.isIPv4(host) && host.startsWith('127.'));
}

/** Counters read by live-metrics.ts at scrape time. */
export class LiveCounters {
  readonly connected = new Map<ViewerProtocol, number>();
  readonly disconnected = new Map<EndReason, number>();
  readonly refused = new Map<RefusalReason, number>();
  sentBytes = 0;
  sentPackets = 0;
}

const bump = <K>(m: Map<K, number>, k: K): void => {
  m.set(k, (m.get(k) ?? 0) + 1);
};

interface FlowEntry {
  /** Number of the block in which the flow was first seen. */
  firstSeq: number;
  lastSeen: number;
  meta: FlowMeta | null;
  /** Node and trace id from the flow's first packet comment, until meta is built. */
  intro: { nodeId: string; traceId: string } | null;
}

interface ViewerConn {
  /** Bytes queued and not yet written to the network. */
  buffered(): number;
  send(buf: Buffer): void;
  /** Graceful close (flushes what is queued). */
  end(): void;
  destroy(): void;
}

class Viewer {
  ended = false;
  bytes = 0;
  packets = 0;
  readonly startedAt = performance.now();
  /** Flows open before the join that this viewer has been told about. */
  readonly notified = new Set<number>();
  /** Filter decision per flow. */
  readonly match = new Map<number, boolean>();

  constructor(
    readonly id: number,
    readonly conn: ViewerConn,
    readonly identity: ViewerIdentity,
    readonly filter: LiveFilter | null,
    readonly framer: RecordFramer,
    /** Blocks numbered below this were dispatched before the viewer joined. */
    readonly joinSeq: number,
  ) {}
}

type AuthResult = { ok: true } | { ok: false; status: 401 | 403; reason: RefusalReason; message: string };

interface ParsedRequest {
  token: string | null;
  filter: string | null;
  client: string | null;
}

/** Bearer tokens from a file, kept as SHA-256 digests; re-read when the file changes. */
class TokenStore {
  private digests: Buffer[] = [];
  private mtimeMs = -1;
  private size = -1;

  constructor(
    readonly file: string,
    private readonly log: Logger,
  ) {}

  /** Loads the file; throws an Error naming the flag and the problem. */
  load(): void {
    let text: string;
    let st: fs.Stats;
    try {
      st = fs.statSync(this.file);
      text = fs.readFileSync(this.file, 'utf8');
    } catch (err) {
      throw new Error(`live: cannot read --live-token-file ${this.file}: ${(err as Error).message}`);
    }
    const digests: Buffer[] = [];
    text.split(/\r?\n/).forEach((raw, i) => {
      const line = raw.trim();
      if (line === '' || line.startsWith('#')) return;
      if (/\s/.test(line)) throw new Error(`live: --live-token-file ${this.file} line ${i + 1}: a token must not contain spaces`);
      if (line.length < MIN_TOKEN_LENGTH) throw new Error(`live: --live-token-file ${this.file} line ${i + 1}: token shorter than ${MIN_TOKEN_LENGTH} characters`);
      digests.push(sha256(line));
    });
    if (digests.length === 0) throw new Error(`live: --live-token-file ${this.file} holds no token (one per line, # for comments)`);
    if ((st.mode & 0o077) !== 0) this.log.warn({ file: this.file, mode: (st.mode & 0o777).toString(8) }, 'live token file is readable by group or others; chmod 600 it');
    this.digests = digests;
    this.mtimeMs = st.mtimeMs;
    this.size = st.size;
  }

  /** Re-reads the file if it changed since the last load; keeps the old tokens if it is broken. */
  refresh(): void {
    try {
      const st = fs.statSync(this.file);
      if (st.mtimeMs === this.mtimeMs && st.size === this.size) return;
      this.load();
      this.log.info({ file: this.file, tokens: this.digests.length }, 'live token file reloaded');
    } catch (err) {
      this.log.warn({ file: this.file }, `live token file not reloaded, keeping the previous tokens: ${(err as Error).message}`);
      this.mtimeMs = -2;
    }
  }

  /** Constant-time check against every token (no early exit). */
  check(token: string): boolean {
    const d = sha256(token);
    let ok = false;
    for (const t of this.digests) if (crypto.timingSafeEqual(d, t)) ok = true;
    return ok;
  }
}

const sha256 = (text: string): Buffer => crypto.createHash('sha256').update(text, 'utf8').digest();
export const tokenId = (token: string): string => `sha256:${sha256(token).toString('hex').slice(0, 12)}`;

export class LiveServer implements BlockSink {
  readonly name = 'live';
  readonly counters = new LiveCounters();
  /** SinkCounters (metrics.ts): totals over all viewers. */
  get packetsWritten(): number {
    return this.counters.sentPackets;
  }
  get bytesWritten(): number {
    return this.counters.sentBytes;
  }

  private readonly auditor: Auditor;
  private readonly viewers = new Set<Viewer>();
  private readonly flows = new Map<number, FlowEntry>();
  private entries: FlowEntry[] = [];
  private sel = new Uint8Array(0);
  private blockSeq = 0;
  private sessionSeq = 0;
  private tlsServer: tls.Server | null = null;
  private tlsFiles: TlsFiles | null = null;
  private plainServer: net.Server | null = null;
  private wss: WebSocketServer | null = null;
  private tokens: TokenStore | null = null;
  private caConfigured = false;
  private pruneTimer: NodeJS.Timeout | null = null;
  private closing: Promise<void> | null = null;
  private readonly bufferLimit: number;
  private readonly maxViewers: number;
  private readonly authMode: 'all' | 'any';

  constructor(
    private readonly opts: LiveServerOptions,
    private readonly log: Logger,
  ) {
    this.auditor = new Auditor(log);
    this.bufferLimit = opts.viewerBufferBytes ?? DEFAULT_VIEWER_BUFFER_BYTES;
    this.maxViewers = opts.maxViewers ?? DEFAULT_MAX_VIEWERS;
    this.authMode = opts.authMode ?? 'all';
    for (const r of ['client_closed', 'slow', 'shutdown', 'error'] as EndReason[]) this.counters.disconnected.set(r, 0);
  }

  /** Reads certificates and tokens, then listens. Rejects with a message naming the flag. */
  async start(): Promise<void> {
    const o = this.opts;
    if (o.listen) {
      const hp = parseHostPort(o.listen);
      if (!hp) throw new Error(`live: --live-listen expects HOST:PORT, got "${o.listen}"`);
      if (!o.certFile || !o.keyFile) throw new Error('live: --live-listen needs --live-cert and --live-key');
      if (!o.tokenFile && !o.caFile) throw new Error('live: --live-listen needs --live-token-file and/or --live-ca: viewers must authenticate');
      // Reloaded when the files change (cert-manager and Istio rotate them): open sessions keep
      // theirs, the next viewer gets the new certificate.
      try {
        this.tlsFiles = new TlsFiles({ cert: o.certFile, key: o.keyFile, ca: o.caFile ?? null }, this.log, { role: 'live endpoint' });
      } catch (err) {
        throw new Error(`live: --live-cert/--live-key/--live-ca: ${(err as Error).message}`);
      }
      const m = this.tlsFiles.current;
      if (o.tokenFile) {
        this.tokens = new TokenStore(o.tokenFile, this.log);
        this.tokens.load();
      }
      this.caConfigured = m.ca !== undefined;
      const options = (mat: TlsMaterial): tls.SecureContextOptions & tls.TlsOptions => ({
        cert: mat.cert,
        key: mat.key,
        ...(mat.ca ? { ca: mat.ca, requestCert: true } : {}),
        // Verified below, so that a refused certificate is audited and answered in words.
        rejectUnauthorized: false,
        minVersion: 'TLSv1.2',
      });
      const server = tls.createServer(options(m));
      this.tlsServer = server;
      this.tlsFiles.on('reload', (mat: TlsMaterial) => server.setSecureContext(options(mat)));
      this.tlsFiles.start();
      this.wss = new WebSocketServer({
        noServer: true,
        perMessageDeflate: false,
        maxPayload: 64 * 1024,
        handleProtocols: (protocols) => (protocols.has(LIVE_WS_SUBPROTOCOL) ? LIVE_WS_SUBPROTOCOL : false),
      });
      // Viewers plus room for connections still authenticating (each bounded in size and time).
      this.tlsServer.maxConnections = this.maxViewers + 64;
      this.tlsServer.on('secureConnection', (s) => this.onSecureConnection(s));
      this.tlsServer.on('tlsClientError', (err, s) => this.onTlsClientError(err, s));
      await listen(this.tlsServer, hp.host, hp.port, '--live-listen');
      const a = this.tlsServer.address() as net.AddressInfo;
      this.log.info({ live_listen: `${a.address}:${a.port}`, auth: this.authDescription() }, `live endpoint on tls://${fmtAddr(a)} and wss://${fmtAddr(a)}${LIVE_WS_PATH}`);
    }
    if (o.insecureLoopback) {
      const spec = o.insecureLoopback.includes(':') ? o.insecureLoopback : `127.0.0.1:${o.insecureLoopback}`;
      const hp = parseHostPort(spec);
      if (!hp) throw new Error(`live: --live-insecure-loopback expects PORT or HOST:PORT, got "${o.insecureLoopback}"`);
      if (!isLoopback(hp.host)) throw new Error(`live: --live-insecure-loopback only binds to loopback (127.0.0.1, ::1), got "${hp.host}"`);
      const host = hp.host === 'localhost' ? '127.0.0.1' : hp.host;
      this.plainServer = net.createServer((s) => this.onPlainConnection(s));
      await listen(this.plainServer, host, hp.port, '--live-insecure-loopback');
      const a = this.plainServer.address() as net.AddressInfo;
      this.log.warn({ live_insecure_loopback: `${a.address}:${a.port}` }, `UNAUTHENTICATED cleartext PCAP-over-IP on ${fmtAddr(a)} (loopback only)`);
    }
    const every = o.pruneIntervalMs ?? 30_000;
    this.pruneTimer = setInterval(() => this.prune(Date.now(), every), every);
    this.pruneTimer.unref();
  }

  /** Bound addresses (after start). */
  get addresses(): { tls: net.AddressInfo | null; insecure: net.AddressInfo | null } {
    return {
      tls: (this.tlsServer?.address() as net.AddressInfo | null) ?? null,
      insecure: (this.plainServer?.address() as net.AddressInfo | null) ?? null,
    };
  }

  get viewerCount(): number {
    return this.viewers.size;
  }

  /** Viewers connected now, by protocol (gauge). */
  viewersByProtocol(): Map<ViewerProtocol, number> {
    const m = new Map<ViewerProtocol, number>([
      ['tls', 0],
      ['wss', 0],
      ['pcap-over-ip', 0],
    ]);
    for (const v of this.viewers) bump(m, v.identity.protocol);
    return m;
  }

  /** Bytes queued to viewers now (gauge). */
  bufferedBytes(): number {
    let n = 0;
    for (const v of this.viewers) n += v.conn.buffered();
    return n;
  }

  // ---------------------------------------------------------------------------------------------
  // Data path

  write(block: Block, release: (block: Block) => void): void {
    try {
      if (!this.closing) this.deliver(block);
    } catch (err) {
      this.log.error({ err }, 'live: failed to deliver a block to viewers');
    } finally {
      release(block);
    }
  }

  private deliver(block: Block): void {
    const seq = ++this.blockSeq;
    const now = Date.now();
    const n = block.count;
    if (this.entries.length < n) this.entries = new Array<FlowEntry>(n);
    let lastId = -1;
    let entry: FlowEntry | undefined;
    for (let i = 0; i < n; i++) {
      const id = block.flowId[i]!;
      if (id !== lastId) {
        entry = this.flows.get(id);
        if (!entry) {
          entry = { firstSeq: seq, lastSeen: now, meta: null, intro: null };
          this.flows.set(id, entry);
        } else entry.lastSeen = now;
        lastId = id;
      }
      if (entry!.firstSeq === seq && entry!.intro === null && block.commentOf(i) !== null) entry!.intro = parseIntroComment(block.commentOf(i)!);
      this.entries[i] = entry!;
    }
    if (this.viewers.size === 0) return;
    if (this.sel.length < n) this.sel = new Uint8Array(n);
    const shared = new Map<RecordFramer, Buffer>();
    for (const v of this.viewers) {
      if (!v.ended) this.feed(v, block, shared);
    }
  }

  private feed(v: Viewer, block: Block, shared: Map<RecordFramer, Buffer>): void {
    const n = block.count;
    const sel = this.sel;
    const annotate = v.framer.carriesAnnotations;
    let kept = 0;
    let joins = 0;
    for (let i = 0; i < n; i++) {
      const id = block.flowId[i]!;
      const e = this.entries[i]!;
      if (v.filter) {
        let m = v.match.get(id);
        if (m === undefined) {
          m = v.filter.matches(this.metaOf(id, e, block, i));
          v.match.set(id, m);
        }
        if (!m) {
          sel[i] = 0;
          continue;
        }
      }
      let mark = 1;
      if (e.firstSeq < v.joinSeq && !v.notified.has(id)) {
        v.notified.add(id);
        if (annotate) mark = 2;
      }
      sel[i] = mark;
      kept++;
      if (mark === 2) joins++;
    }
    if (kept === 0) return;
    let out: Buffer;
    if (kept === n && joins === 0 && block.framer === v.framer) {
      // The block is already in this format: one copy, shared by every such viewer.
      out = shared.get(v.framer) ?? copyOut(block);
      shared.set(v.framer, out);
    } else if (kept === n && joins === 0 && shared.has(v.framer)) {
      out = shared.get(v.framer)!;
    } else {
      out = this.reframe(v.framer, block, sel, joins);
      if (kept === n && joins === 0) shared.set(v.framer, out);
    }
    this.push(v, out, kept);
  }

  /** Re-frames the selected frames (sel[i] 1, or 2 for "joined mid-stream") into an exact-size buffer. */
  private reframe(framer: RecordFramer, block: Block, sel: Uint8Array, joins: number): Buffer {
    const saved: Array<[number, Buffer | null]> = [];
    if (joins > 0) {
      // Swapped in for the duration of this synchronous call only: other sinks never see it.
      for (let i = 0; i < block.count; i++) {
        if (sel[i] !== 2) continue;
        const prev = block.commentOf(i);
        saved.push([i, prev]);
        block.setComment(i, appendComment(prev, JOIN_BUF));
      }
    }
    try {
      const keep = (i: number): boolean => sel[i] !== 0;
      const size = reframedSize(block, framer, keep).bytes;
      const out = Buffer.allocUnsafe(size);
      const written = reframeBlock(block, framer, out, keep);
      return written === size ? out : out.subarray(0, written);
    } finally {
      for (const [i, c] of saved) block.setComment(i, c);
    }
  }

  private metaOf(id: number, e: FlowEntry, block: Block, i: number): FlowMeta {
    if (e.meta) return e.meta;
    const info = this.opts.flowInfo?.(id);
    e.meta = info
      ? metaFromFlowInfo(info)
      : (metaFromFrame(block.buf, block.frameOff[i]!, block.capLen[i]!, e.intro) ?? {
          nodeId: e.intro?.nodeId ?? null,
          traceId: e.intro?.traceId ?? null,
          addrs: [],
          ports: [],
        });
    e.intro = null;
    return e.meta;
  }

  private push(v: Viewer, out: Buffer, packets: number): void {
    const queued = v.conn.buffered();
    if (queued > 0 && queued + out.length > this.bufferLimit) {
      this.cut(v, 'slow', `viewer fell behind: ${queued} bytes queued, limit ${this.bufferLimit}`);
      return;
    }
    v.conn.send(out);
    v.bytes += out.length;
    v.packets += packets;
    this.counters.sentBytes += out.length;
    this.counters.sentPackets += packets;
  }

  /** Forgets flows that are closed (not in the flow table) and were not seen for two intervals. */
  private prune(now: number, every: number): void {
    const cutoff = now - 2 * every;
    const lookup = this.opts.flowInfo;
    const staleWithoutTable = now - 15 * 60_000;
    for (const [id, e] of this.flows) {
      if (e.lastSeen >= cutoff) continue;
      if (lookup ? lookup(id) !== undefined : e.lastSeen >= staleWithoutTable) continue;
      this.flows.delete(id);
      for (const v of this.viewers) {
        v.match.delete(id);
        v.notified.delete(id);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Sessions

  private addViewer(conn: ViewerConn, identity: ViewerIdentity, filter: LiveFilter | null, framer: RecordFramer): Viewer {
    const v = new Viewer(++this.sessionSeq, conn, identity, filter, framer, this.blockSeq + 1);
    this.viewers.add(v);
    bump(this.counters.connected, identity.protocol);
    this.auditor.started(v.id, identity, filter?.text);
    const header = framer.fileHeader({
      snaplen: this.opts.snaplen,
      ifName: 'meshcap',
      ifDescription: `meshcap live: plaintext from the Envoy TLS boundary (synthetic TCP/IP)${filter ? `; filter ${filter.text}` : ''}`,
      application: 'meshcap live',
    });
    conn.send(header);
    v.bytes += header.length;
    this.counters.sentBytes += header.length;
    return v;
  }

  private endViewer(v: Viewer, reason: EndReason, detail?: string): void {
    if (v.ended) return;
    v.ended = true;
    this.viewers.delete(v);
    bump(this.counters.disconnected, reason);
    const unsent = v.conn.buffered();
    this.auditor.ended(v.id, v.identity, v.filter?.text, {
      bytes: v.bytes,
      bytesUnsent: unsent,
      packets: v.packets,
      durationMs: performance.now() - v.startedAt,
      reason,
      ...(detail ? { detail } : {}),
    });
    if (reason === 'slow') this.log.warn({ session: v.id, remote: v.identity.remote, limit: this.bufferLimit }, 'live viewer disconnected: too slow');
  }

  private cut(v: Viewer, reason: EndReason, detail: string): void {
    this.endViewer(v, reason, detail);
    v.conn.destroy();
  }

  private refuse(identity: ViewerIdentity, filter: string | undefined, reason: RefusalReason, detail: string): void {
    bump(this.counters.refused, reason);
    this.auditor.refused(identity, filter, reason, detail);
  }

  private authDescription(): string {
    const parts = [this.tokens ? 'token' : '', this.caConfigured ? 'client certificate' : ''].filter(Boolean);
    return parts.length > 1 ? `${parts.join(this.authMode === 'all' ? ' and ' : ' or ')}` : parts[0]!;
  }

  /** Checks credentials and fills identity.auth / token_id. */
  private authenticate(socket: tls.TLSSocket, token: string | null, identity: ViewerIdentity): AuthResult {
    let certOk = false;
    if (this.caConfigured) {
      const peer = socket.getPeerCertificate();
      const presented = !!peer && Object.keys(peer).length > 0;
      if (presented && !socket.authorized) {
        return { ok: false, status: 403, reason: 'bad_client_cert', message: `client certificate not accepted: ${String(socket.authorizationError ?? 'not verified')}` };
      }
      certOk = presented && socket.authorized;
    }
    let tokenOk = false;
    if (this.tokens && token !== null) {
      this.tokens.refresh();
      identity.token_id = tokenId(token);
      if (!this.tokens.check(token)) return { ok: false, status: 403, reason: 'bad_token', message: 'token not accepted' };
      tokenOk = true;
    }
    identity.auth = certOk && tokenOk ? 'token+cert' : certOk ? 'cert' : tokenOk ? 'token' : 'none';
    if (this.authMode === 'all' || !this.tokens || !this.caConfigured) {
      if (this.caConfigured && !certOk) return { ok: false, status: 401, reason: 'no_client_cert', message: 'a client certificate is required' };
      if (this.tokens && !tokenOk) return { ok: false, status: 401, reason: 'no_token', message: 'a bearer token is required' };
      return { ok: true };
    }
    if (certOk || tokenOk) return { ok: true };
    return { ok: false, status: 401, reason: 'no_credentials', message: 'a bearer token or a client certificate is required' };
  }

  private onTlsClientError(err: Error, socket: tls.TLSSocket): void {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    socket.destroy();
    // A connection dropped before or during the handshake (port scans, TCP health probes) is
    // counted; a real TLS failure (protocol, cipher, certificate) is also audited.
    bump(this.counters.refused, 'tls_handshake');
    if (!code.startsWith('ERR_SSL') && !/ssl|tls|alert|certificate/i.test(err.message)) return;
    const identity: ViewerIdentity = { remote: remoteOf(socket), protocol: 'tls', auth: 'none' };
    this.auditor.refused(identity, undefined, 'tls_handshake', `${code ? `${code}: ` : ''}${err.message.split('\n')[0]}`);
  }

  private onSecureConnection(socket: tls.TLSSocket): void {
    socket.on('error', (err) => this.log.debug({ err: err.message, remote: remoteOf(socket) }, 'live connection error'));
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    const identity: ViewerIdentity = { remote: remoteOf(socket), protocol: 'tls', auth: 'none' };
    if (this.caConfigured) {
      const peer = socket.getPeerCertificate();
      if (peer && Object.keys(peer).length > 0) {
        identity.cert_subject = dn(peer.subject as unknown as Record<string, string | string[]>);
        identity.cert_issuer = dn(peer.issuer as unknown as Record<string, string | string[]>);
        identity.cert_fingerprint256 = peer.fingerprint256;
      }
    }
    let buf: Buffer = Buffer.alloc(0);
    let done = false;
    const stop = (): void => {
      done = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.pause();
    };
    const timer = setTimeout(() => {
      if (done) return;
      stop();
      this.refuse(identity, undefined, 'request_timeout', 'no request received in time');
      endSoon(socket, `${LIVE_PROTOCOL} 400 request_timeout no request received in time\n`);
    }, this.opts.requestTimeoutMs ?? 10_000);
    timer.unref();
    const onData = (chunk: Buffer): void => {
      if (done) return;
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const kind = sniff(buf);
      if (kind === 'more') return;
      if (kind === 'raw') {
        const nl = buf.indexOf(0x0a);
        if (nl < 0) {
          if (buf.length <= MAX_REQUEST_LINE) return;
          stop();
          this.refuse(identity, undefined, 'bad_request', 'request line too long');
          endSoon(socket, `${LIVE_PROTOCOL} 400 bad_request request line longer than ${MAX_REQUEST_LINE} bytes\n`);
          return;
        }
        stop();
        this.handleRaw(socket, identity, buf.toString('utf8', 0, nl).replace(/\r$/, ''));
        return;
      }
      if (kind === 'http') {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) {
          if (buf.length <= MAX_HTTP_HEAD) return;
          stop();
          identity.protocol = 'wss';
          this.refuse(identity, undefined, 'bad_request', 'HTTP request head too large');
          endSoon(socket, httpResponse(431, 'request head too large'));
          return;
        }
        stop();
        identity.protocol = 'wss';
        this.handleHttp(socket, identity, buf.subarray(0, end).toString('latin1'), buf.subarray(end + 4));
        return;
      }
      stop();
      this.refuse(identity, undefined, 'bad_request', 'unknown protocol');
      endSoon(socket, `${LIVE_PROTOCOL} 400 bad_request expected "${LIVE_PROTOCOL} token=... filter=..." or a WebSocket upgrade to ${LIVE_WS_PATH}\n`);
    };
    socket.on('data', onData);
  }

  private handleRaw(socket: tls.TLSSocket, identity: ViewerIdentity, line: string): void {
    const refuse = (status: number, reason: RefusalReason, message: string, filter?: string): void => {
      this.refuse(identity, filter, reason, message);
      endSoon(socket, `${LIVE_PROTOCOL} ${status} ${reason} ${message}\n`);
    };
    const req = parseRequestLine(line);
    if (typeof req === 'string') return refuse(400, 'bad_request', req);
    if (req.client) identity.client = req.client;
    // Credentials first: an unauthenticated client learns nothing else.
    const auth = this.authenticate(socket, req.token, identity);
    if (!auth.ok) return refuse(auth.status, auth.reason, auth.message, req.filter ?? undefined);
    let filter: LiveFilter | null;
    try {
      filter = parseLiveFilter(req.filter);
    } catch (err) {
      return refuse(400, 'bad_filter', `filter: ${(err as Error).message}`, req.filter ?? undefined);
    }
    if (this.viewers.size >= this.maxViewers) return refuse(503, 'too_many_viewers', `the server allows ${this.maxViewers} viewers at a time`, filter?.text);
    this.attachSocket(socket, identity, filter, pcapngFramer);
  }

  private handleHttp(socket: tls.TLSSocket, identity: ViewerIdentity, head: string, rest: Buffer): void {
    const lines = head.split('\r\n');
    const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? '');
    const refuse = (status: number, reason: RefusalReason, message: string, filter?: string, extra: string[] = []): void => {
      this.refuse(identity, filter, reason, message);
      endSoon(socket, httpResponse(status, message, [`X-Meshcap-Refusal: ${reason}`, ...extra]));
    };
    if (!m) return refuse(400, 'bad_request', 'malformed HTTP request line');
    const headers: Record<string, string> = {};
    for (const l of lines.slice(1)) {
      const c = l.indexOf(':');
      if (c <= 0) return refuse(400, 'bad_request', 'malformed HTTP header');
      const k = l.slice(0, c).trim().toLowerCase();
      const val = l.slice(c + 1).trim();
      headers[k] = headers[k] !== undefined ? `${headers[k]}, ${val}` : val;
    }
    let url: URL;
    try {
      url = new URL(m[2]!, 'https://meshcap.invalid');
    } catch {
      return refuse(400, 'bad_request', 'malformed request target');
    }
    const ua = headers['user-agent'];
    const client = url.searchParams.get('client') ?? ua;
    if (client) identity.client = client;
    if (url.pathname !== LIVE_WS_PATH) return refuse(404, 'not_found', `not found: the live WebSocket endpoint is ${LIVE_WS_PATH}`);
    if (m[1] !== 'GET' || (headers.upgrade ?? '').toLowerCase() !== 'websocket' || !headers['sec-websocket-key']) {
      return refuse(426, 'bad_request', `${LIVE_WS_PATH} is a WebSocket endpoint (wss://host:port${LIVE_WS_PATH})`, undefined, ['Upgrade: websocket']);
    }
    const filterText = url.searchParams.get('filter') ?? undefined;
    let token: string | null = null;
    const authz = headers.authorization;
    if (authz) {
      const b = /^Bearer\s+(\S+)\s*$/i.exec(authz);
      if (!b) return refuse(400, 'bad_request', 'Authorization must be "Bearer <token>"', filterText);
      token = b[1]!;
    } else if (headers['sec-websocket-protocol']) {
      for (const p of headers['sec-websocket-protocol'].split(',').map((s) => s.trim())) {
        if (p.startsWith('bearer.')) token = p.slice(7);
      }
    }
    const auth = this.authenticate(socket, token, identity);
    if (!auth.ok) {
      const extra = auth.status === 401 ? ['WWW-Authenticate: Bearer realm="meshcap-live"'] : [];
      return refuse(auth.status, auth.reason, auth.message, filterText, extra);
    }
    let filter: LiveFilter | null;
    try {
      filter = parseLiveFilter(filterText);
    } catch (err) {
      return refuse(400, 'bad_filter', `filter: ${(err as Error).message}`, filterText);
    }
    if (this.viewers.size >= this.maxViewers) return refuse(503, 'too_many_viewers', `the server allows ${this.maxViewers} viewers at a time`, filter?.text);
    const req = { method: m[1], url: m[2], headers, httpVersion: '1.1', socket } as unknown as IncomingMessage;
    this.wss!.handleUpgrade(req, socket, rest, (ws) => {
      socket.resume();
      this.attachWebSocket(ws, identity, filter);
    });
  }

  private onPlainConnection(socket: net.Socket): void {
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'live pcap-over-ip connection error'));
    const identity: ViewerIdentity = { remote: remoteOf(socket), protocol: 'pcap-over-ip', auth: 'none' };
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.viewers.size >= this.maxViewers) {
      this.refuse(identity, undefined, 'too_many_viewers', `the server allows ${this.maxViewers} viewers at a time`);
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    this.attachSocket(socket, identity, null, pcapFramer);
  }

  private attachSocket(socket: net.Socket, identity: ViewerIdentity, filter: LiveFilter | null, framer: RecordFramer): void {
    const conn: ViewerConn = {
      buffered: () => socket.writableLength,
      send: (b) => {
        socket.write(b);
      },
      end: () => endSoon(socket),
      destroy: () => socket.destroy(),
    };
    const v = this.addViewer(conn, identity, filter, framer);
    let failure: string | null = null;
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EPIPE' && err.code !== 'ECONNRESET') failure = err.message;
    });
    // A client that closes its side (even a half-close) ends the session: without it a viewer that
    // went away would only be noticed at the next packet.
    socket.on('close', () => (failure ? this.endViewer(v, 'error', failure) : this.endViewer(v, 'client_closed')));
    socket.resume(); // anything the client sends after its request is ignored
  }

  private attachWebSocket(ws: WebSocket, identity: ViewerIdentity, filter: LiveFilter | null): void {
    const conn: ViewerConn = {
      buffered: () => ws.bufferedAmount,
      send: (b) => ws.send(b, { binary: true }),
      end: () => {
        ws.close(1001, 'meshcap serve is shutting down');
        setTimeout(() => ws.terminate(), 1000).unref();
      },
      destroy: () => ws.terminate(),
    };
    const v = this.addViewer(conn, identity, filter, pcapngFramer);
    let failure: string | null = null;
    ws.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EPIPE' && err.code !== 'ECONNRESET') failure = err.message;
    });
    ws.on('close', () => (failure ? this.endViewer(v, 'error', failure) : this.endViewer(v, 'client_closed')));
  }

  /** Ends every session (reason "shutdown"), stops listening. */
  async close(): Promise<void> {
    if (this.closing) return this.closing;
    this.closing = (async () => {
      if (this.pruneTimer) clearInterval(this.pruneTimer);
      this.tlsFiles?.stop();
      for (const v of [...this.viewers]) {
        this.endViewer(v, 'shutdown');
        v.conn.end();
      }
      const servers = [this.tlsServer, this.plainServer].filter((s): s is net.Server => s !== null);
      await Promise.all(
        servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              const t = setTimeout(resolve, 1500);
              t.unref();
              s.close(() => {
                clearTimeout(t);
                resolve();
              });
            }),
        ),
      );
      this.wss?.close();
      this.flows.clear();
    })();
    return this.closing;
  }
}

const JOIN_BUF = Buffer.from(JOINED_MID_STREAM);

/** Creates the live sink (call start() before use, add it to the pipeline with addSink). */
export function createLiveSink(opts: LiveServerOptions, log: Logger): LiveServer {
  return new LiveServer(opts, log);
}

/** Parses `MESHCAP-LIVE/1 key=value ...`; a string is the error. */
export function parseRequestLine(line: string): ParsedRequest | string {
  const parts = line.split(' ').filter(Boolean);
  const proto = parts.shift();
  if (proto !== LIVE_PROTOCOL) {
    if (proto?.startsWith('MESHCAP-LIVE/')) return `unsupported protocol version ${proto}: this server speaks ${LIVE_PROTOCOL}`;
    return `expected "${LIVE_PROTOCOL} token=... filter=..."`;
  }
  const out: ParsedRequest = { token: null, filter: null, client: null };
  const seen = new Set<string>();
  for (const p of parts) {
    const eq = p.indexOf('=');
    if (eq <= 0) return `malformed parameter "${p.slice(0, 40)}": expected key=value`;
    const key = p.slice(0, eq);
    let value: string;
    try {
      value = decodeURIComponent(p.slice(eq + 1));
    } catch {
      return `parameter ${key}: bad percent-encoding`;
    }
    if (seen.has(key)) return `parameter ${key} given twice`;
    seen.add(key);
    if (key === 'token') out.token = value;
    else if (key === 'filter') out.filter = value;
    else if (key === 'client') out.client = value;
  }
  return out;
}

/** Builds a request line (clients: extcap, tests). */
export function requestLine(p: { token?: string | null; filter?: string | null; client?: string | null }): string {
  const parts = [LIVE_PROTOCOL];
  if (p.token) parts.push(`token=${encodeURIComponent(p.token)}`);
  if (p.filter) parts.push(`filter=${encodeURIComponent(p.filter)}`);
  if (p.client) parts.push(`client=${encodeURIComponent(p.client)}`);
  return `${parts.join(' ')}\n`;
}

const GET = Buffer.from('GET ');
const RAW = Buffer.from(`${LIVE_PROTOCOL.slice(0, 'MESHCAP-LIVE/'.length)}`);

function sniff(buf: Buffer): 'raw' | 'http' | 'more' | 'bad' {
  const isPrefix = (want: Buffer): 'yes' | 'more' | 'no' => {
    const n = Math.min(buf.length, want.length);
    if (!buf.subarray(0, n).equals(want.subarray(0, n))) return 'no';
    return buf.length >= want.length ? 'yes' : 'more';
  };
  const raw = isPrefix(RAW);
  if (raw === 'yes') return 'raw';
  const http = isPrefix(GET);
  if (http === 'yes') return 'http';
  return raw === 'more' || http === 'more' ? 'more' : 'bad';
}

const STATUS_TEXT: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  426: 'Upgrade Required',
  431: 'Request Header Fields Too Large',
  503: 'Service Unavailable',
};

function httpResponse(status: number, message: string, extra: string[] = []): string {
  const body = `${message}\n`;
  return [
    `HTTP/1.1 ${status} ${STATUS_TEXT[status] ?? 'Error'}`,
    'Content-Type: text/plain; charset=utf-8',
    `Content-Length: ${Buffer.byteLength(body)}`,
    'Connection: close',
    ...extra,
    '',
    body,
  ].join('\r\n');
}

/** Writes the last words (if any), ends, and destroys if the peer does not finish in 2 s. */
function endSoon(socket: net.Socket, last?: string): void {
  if (socket.destroyed) return;
  socket.resume(); // read (and discard) until the peer's EOF, so 'close' comes
  if (last !== undefined) socket.end(last);
  else socket.end();
  const t = setTimeout(() => socket.destroy(), 2000);
  t.unref();
  socket.once('close', () => clearTimeout(t));
}

function listen(server: net.Server, host: string, port: number, flag: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(new Error(`live: cannot listen on ${host}:${port} (${flag}): ${err.message}`));
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

function remoteOf(socket: net.Socket): string {
  const a = socket.remoteAddress ?? '?';
  return `${a.includes(':') ? `[${a}]` : a}:${socket.remotePort ?? 0}`;
}

function fmtAddr(a: net.AddressInfo): string {
  return a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
}

function dn(name: Record<string, string | string[]> | undefined): string | undefined {
  if (!name) return undefined;
  return Object.entries(name)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('+') : v}`)
    .join(',');
}

/** The block's records in a buffer of their own (copied out of the shared block memory at memcpy speed). */
function copyOut(block: Block): Buffer {
  const out = Buffer.allocUnsafe(block.recordBytes);
  copyBytes(out, 0, block.records());
  return out;
}
