/**
 * The admin /tap door: works with stock Envoy (every release with the tap extension).
 *
 * POSTs an `envoy.admin.v3.TapRequest` to `<admin>/tap` for a transport-socket tap configured with
 * `common_config.admin_config.config_id`, and reads the response for as long as Envoy keeps it
 * open: pretty-printed JSON TraceWrappers concatenated with no delimiter, over chunked transfer
 * encoding, object boundaries anywhere. The body is split incrementally (ConcatJsonSplitter, one
 * object at most `maxObjectBytes` in memory), each object parsed and converted to the binary
 * TraceWrapper, and decoded like every other door.
 *
 * Envoy's side, as read in its sources (source/extensions/common/tap/admin.cc):
 *  - One attached /tap stream per Envoy process, whatever the config id: a second POST gets
 *    400 "An attached /tap admin stream already exists. Detach it.".
 *  - Closing the connection detaches: Envoy clears the tap config (new connections are no longer
 *    tapped). Connections opened before the attach are never tapped.
 *  - 400 also for an unknown config id (the tapped listener is not loaded yet), a body that fails
 *    strict validation, or no body; 404 when no tap extension registered /tap at all.
 *  - TapConfig needs `match` (or the deprecated `match_config`): Envoy rejects a config with
 *    neither ("Neither match nor match_config is set in TapConfig").
 *  - Bodies are cut at max_buffered_rx/tx_bytes (1 KiB by default) per streamed event, so the
 *    request raises both.
 *
 * Every failure (Envoy down, stream ended, 4xx/5xx) is logged with context and retried with
 * exponential backoff and jitter. The admin port is unauthenticated and all-powerful: only
 * loopback URLs are accepted.
 *
 * Trace ids are Envoy connection ids, unique per Envoy process only. A re-attach to the same
 * process keeps the same node namespace (Envoy keeps sending segments of connections tapped
 * earlier), while an Envoy restart (told by `/server_info` uptime) starts a new one.
 */
import http from 'node:http';
import net from 'node:net';
import type { Logger } from 'pino';
import { ConcatJsonSplitter } from './json-stream.js';
import type { StreamIdentity, TapEventHandler } from './tap-event.js';
import { TraceDecoder } from './trace-decoder.js';
import { jsonTraceToBinary } from './trace-json.js';

export const ADMIN_SOURCE = 'admin';

/** Envoy's default per-direction body limit is 1 KiB; meshcap asks for this much instead. */
export const DEFAULT_ADMIN_MAX_BUFFERED_BYTES = 1024 * 1024;

export const ALREADY_ATTACHED = 'An attached /tap admin stream already exists';

export interface BackoffOptions {
  /** First retry delay (default 250 ms). */
  initialMs: number;
  /** Largest retry delay (default 30 s). */
  maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initialMs: 250, maxMs: 30_000 };

export interface AdminTapClientOptions {
  /** http://127.0.0.1:15000 (loopback only). */
  adminUrl: string;
  /** AdminConfig.config_id of the tap to attach to. */
  configId: string;
  /** OutputConfig.max_buffered_rx_bytes and max_buffered_tx_bytes (default 1 MiB). */
  maxBufferedBytes?: number;
  /** Largest JSON object accepted; larger ones are counted and skipped (default max(4 MiB, 3 × maxBufferedBytes)). */
  maxObjectBytes?: number;
  backoff?: Partial<BackoffOptions>;
  /** Give up connecting after this long (default 5 s). */
  connectTimeoutMs?: number;
  /** Ask /server_info for the node id and uptime before attaching (default true). */
  serverInfo?: boolean;
  /** Jitter source, for tests (default Math.random). */
  random?: () => number;
  /** Observer for tests and status: called on every state change. */
  onState?: (state: AdminClientState, detail: string) => void;
}

export type AdminClientState = 'idle' | 'connecting' | 'attached' | 'backoff' | 'stopped';

export interface AdminClientCounters {
  /** POSTs sent. */
  attempts: number;
  /** 200 responses (attached streams). */
  attached: number;
  /** TraceWrappers accepted. */
  traces: number;
  /** Objects rejected (bad JSON, not a TraceWrapper, too large). */
  rejected: number;
  /** Reconnects scheduled. */
  retries: number;
}

/** Loopback hosts: the admin endpoint must never be reached over the network. */
export function isLoopbackHost(host: string): boolean {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (h.toLowerCase() === 'localhost') return true;
  if (net.isIPv4(h)) return h.startsWith('127.');
  if (net.isIPv6(h)) {
    const lower = h.toLowerCase();
    if (lower === '::1' || lower === '0:0:0:0:0:0:0:1') return true;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(lower);
    return !!mapped && mapped[1]!.startsWith('127.');
  }
  return false;
}

/**
 * Parses and checks an --envoy-admin URL: http only, a loopback host, an explicit port.
 * Throws an Error saying why otherwise.
 */
export function validateAdminUrl(text: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new Error(`--envoy-admin: "${text}" is not a URL; expected e.g. http://127.0.0.1:15000`);
  }
  if (url.protocol !== 'http:') {
    throw new Error(`--envoy-admin: "${text}": only http:// is supported (Envoy's admin endpoint speaks plain HTTP on loopback)`);
  }
  if (!isLoopbackHost(url.hostname)) {
    throw new Error(
      `--envoy-admin: refusing "${text}": the Envoy admin endpoint is unauthenticated and can reconfigure or stop Envoy, ` +
        'so meshcap only talks to it on loopback (127.0.0.0/8, ::1, localhost). Run meshcap in the same pod/host as Envoy.',
    );
  }
  if (url.username || url.password) throw new Error(`--envoy-admin: "${text}": credentials in the URL are not supported`);
  if (url.search || url.hash) throw new Error(`--envoy-admin: "${text}": no query or fragment expected`);
  return url;
}

/**
 * The TapRequest meshcap sends: streamed socket events to a streaming_admin sink as JSON (the
 * only formats Envoy's streaming admin sink supports), every connection matched, body limits
 * raised. Field names are Envoy's (snake_case); Envoy validates the body strictly.
 */
export function buildTapRequest(configId: string, maxBufferedBytes: number = DEFAULT_ADMIN_MAX_BUFFERED_BYTES): Record<string, unknown> {
  return {
    config_id: configId,
    tap_config: {
      match: { any_match: true },
      output_config: {
        sinks: [{ format: 'JSON_BODY_AS_BYTES', streaming_admin: {} }],
        max_buffered_rx_bytes: maxBufferedBytes,
        max_buffered_tx_bytes: maxBufferedBytes,
        streaming: true,
      },
    },
  };
}

/** Equal-jitter exponential backoff: a delay in [d/2, d], d = min(max, initial × 2^attempt). */
export function backoffDelay(attempt: number, opts: BackoffOptions, random: () => number = Math.random): number {
  const d = Math.min(opts.maxMs, opts.initialMs * 2 ** Math.min(attempt, 30));
  return Math.round(d / 2 + (random() * d) / 2);
}

const MAX_ERROR_BODY = 4096;
/** A stream that stayed attached this long resets the backoff even if it carried no trace. */
const HEALTHY_STREAM_MS = 30_000;

export class AdminTapClient {
  readonly url: URL;
  readonly configId: string;
  readonly counters: AdminClientCounters = { attempts: 0, attached: 0, traces: 0, rejected: 0, retries: 0 };
  private readonly maxBufferedBytes: number;
  private readonly maxObjectBytes: number;
  private readonly backoff: BackoffOptions;
  private readonly connectTimeoutMs: number;
  private readonly useServerInfo: boolean;
  private readonly random: () => number;
  private readonly decoder: TraceDecoder;
  private readonly requestBody: Buffer;
  private readonly label: string;

  private stateValue: AdminClientState = 'idle';
  private attempt = 0;
  private timer: NodeJS.Timeout | null = null;
  private req: http.ClientRequest | null = null;
  private stopped = false;
  /** Identity of the Envoy process traces are attributed to. */
  private stream: StreamIdentity;
  private generation = 0;
  private envoyStartSec: number | null = null;
  private serverNode = '';

  constructor(
    private readonly opts: AdminTapClientOptions,
    private readonly handler: TapEventHandler,
    private readonly log: Logger,
  ) {
    this.url = validateAdminUrl(opts.adminUrl);
    if (!opts.configId) throw new Error('--tap-config-id: a non-empty config id is required');
    this.configId = opts.configId;
    const mb = opts.maxBufferedBytes ?? DEFAULT_ADMIN_MAX_BUFFERED_BYTES;
    if (!Number.isInteger(mb) || mb < 1 || mb > 0xffffffff) throw new Error(`admin max buffered bytes must be an integer in 1..4294967295, got ${mb}`);
    this.maxBufferedBytes = mb;
    this.maxObjectBytes = opts.maxObjectBytes ?? Math.max(4 * 1024 * 1024, 3 * mb);
    this.backoff = { ...DEFAULT_BACKOFF, ...opts.backoff };
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 5000;
    this.useServerInfo = opts.serverInfo ?? true;
    this.random = opts.random ?? Math.random;
    this.decoder = new TraceDecoder(handler);
    this.requestBody = Buffer.from(JSON.stringify(buildTapRequest(this.configId, mb)));
    this.label = `${this.url.origin} config_id=${this.configId}`;
    this.stream = { nodeId: `admin:${this.url.origin}`, tapId: this.configId, source: ADMIN_SOURCE };
  }

  get state(): AdminClientState {
    return this.stateValue;
  }

  /** The node namespace traces are currently filed under. */
  get nodeId(): string {
    return this.stream.nodeId;
  }

  start(): void {
    if (this.stopped || this.stateValue !== 'idle') return;
    void this.connect();
  }

  /** Detaches (closing the connection makes Envoy clear the tap) and stops retrying. */
  stop(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const req = this.req;
    this.req = null;
    this.setState('stopped', 'stopped');
    if (!req || req.destroyed) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => resolve();
      req.once('close', done);
      req.destroy();
      // 'close' is always emitted after destroy(), but never wait long.
      setTimeout(done, 1000).unref();
    });
  }

  private setState(s: AdminClientState, detail: string): void {
    this.stateValue = s;
    try {
      this.opts.onState?.(s, detail);
    } catch {
      /* an observer must not break the door */
    }
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    this.setState('connecting', this.label);
    if (this.useServerInfo) await this.refreshServerInfo();
    if (this.stopped) return;
    this.counters.attempts++;
    const url = this.url;
    const basePath = url.pathname.replace(/\/+$/, '');
    const req = http.request({
      host: url.hostname.replace(/^\[|\]$/g, ''),
      port: url.port || 80,
      path: `${basePath}/tap`,
      method: 'POST',
      agent: false,
      headers: { 'content-type': 'application/json', 'content-length': this.requestBody.length, accept: '*/*' },
    });
    this.req = req;
    let settled = false;
    const connectTimer = setTimeout(() => {
      if (!settled) req.destroy(new Error(`no response within ${this.connectTimeoutMs} ms`));
    }, this.connectTimeoutMs);
    connectTimer.unref();
    req.on('socket', (s) => {
      // Envoy dying without a FIN (host crash, network namespace gone) is noticed by keepalive.
      s.setKeepAlive(true, 30_000);
      s.setNoDelay(true);
    });
    req.on('response', (res) => {
      settled = true;
      clearTimeout(connectTimer);
      if (res.statusCode === 200) this.onAttached(req, res);
      else this.onRejected(req, res);
    });
    req.on('error', (err) => {
      settled = true;
      clearTimeout(connectTimer);
      if (this.req !== req) return; // stopped, or already handled
      this.req = null;
      this.retry('connect_failed', `cannot reach Envoy admin ${this.label}: ${(err as Error).message}`, 'warn');
    });
    req.end(this.requestBody);
  }

  private onAttached(req: http.ClientRequest, res: http.IncomingMessage): void {
    this.counters.attached++;
    const since = Date.now();
    let tracesThisStream = 0;
    this.log.info(
      { admin: this.url.origin, config_id: this.configId, node: this.stream.nodeId, envoy_node: this.serverNode || undefined, max_buffered_bytes: this.maxBufferedBytes },
      `attached to Envoy admin /tap (${this.label})`,
    );
    this.setState('attached', this.label);
    const splitter = new ConcatJsonSplitter({
      maxObjectBytes: this.maxObjectBytes,
      onObject: (text) => {
        if (this.onObject(text)) {
          tracesThisStream++;
          if (tracesThisStream === 1) this.attempt = 0; // Envoy is delivering: start backoff over
        }
      },
      onError: (reason, detail) => {
        this.counters.rejected++;
        this.handler.onIngestError(this.stream, reason === 'object_too_large' ? 'message_too_large' : 'malformed_json', `admin /tap ${this.label}: ${detail}`);
      },
    });
    let ended = false;
    const finish = (why: string, detail: string): void => {
      if (ended) return;
      ended = true;
      // An object cut by the end of the stream is reported (and dropped) here.
      splitter.end();
      if (this.req !== req) return; // stop() in progress
      this.req = null;
      if (Date.now() - since >= HEALTHY_STREAM_MS) this.attempt = 0;
      this.retry(why, `${detail} (${this.label}, ${tracesThisStream} traces on this stream)`, 'warn');
    };
    res.on('data', (chunk: Buffer) => {
      try {
        splitter.push(chunk);
      } catch (err) {
        // Never expected (callbacks catch their own errors); keep the door alive regardless.
        this.handler.onIngestError(this.stream, 'malformed_json', `admin /tap ${this.label}: ${(err as Error).message}`);
      }
    });
    res.on('end', () => finish('stream_ended', 'Envoy ended the /tap stream'));
    res.on('aborted', () => finish('stream_aborted', 'the /tap stream was cut'));
    res.on('error', (err) => finish('stream_aborted', `the /tap stream failed: ${err.message}`));
    res.on('close', () => finish('stream_aborted', 'the /tap connection closed'));
  }

  private onRejected(req: http.ClientRequest, res: http.IncomingMessage): void {
    const parts: Buffer[] = [];
    let size = 0;
    res.on('data', (c: Buffer) => {
      if (size < MAX_ERROR_BODY) {
        parts.push(c);
        size += c.length;
      }
    });
    let done = false;
    const finish = (): void => {
      if (done) return;
      done = true;
      if (this.req !== req) return;
      this.req = null;
      req.destroy();
      const body = Buffer.concat(parts).toString('utf8').slice(0, MAX_ERROR_BODY).trim();
      const status = res.statusCode ?? 0;
      let hint = '';
      if (status === 400 && body.includes(ALREADY_ATTACHED)) {
        hint = ': another client holds Envoy\'s only /tap stream (another meshcap, or a curl left running); retrying';
      } else if (status === 400 && /Unknown config id/i.test(body)) {
        hint = `: no tap transport socket with admin_config.config_id "${this.configId}" is loaded (yet); retrying`;
      } else if (status === 404) {
        hint = ': Envoy has no /tap endpoint: no tap extension with admin_config is configured (yet); retrying';
      }
      this.retry(status === 400 && body.includes(ALREADY_ATTACHED) ? 'already_attached' : `http_${status}`, `Envoy admin ${this.label} answered ${status} "${body}"${hint}`, 'warn');
    };
    res.on('end', finish);
    res.on('close', finish);
    res.on('error', finish);
  }

  /** One JSON object from the stream. Returns true when it was a TraceWrapper and accepted. */
  private onObject(text: string): boolean {
    let bin: Buffer;
    try {
      bin = jsonTraceToBinary(JSON.parse(text));
    } catch (err) {
      this.counters.rejected++;
      this.handler.onIngestError(this.stream, 'malformed_json', `admin /tap ${this.label}: ${(err as Error).message}`);
      return false;
    }
    this.handler.onIngestMessage(ADMIN_SOURCE, text.length);
    const ok = this.decoder.decodeTraceWrapper(bin, this.stream);
    if (ok) this.counters.traces++;
    else this.counters.rejected++;
    return ok;
  }

  private retry(reason: string, detail: string, level: 'warn' | 'info'): void {
    if (this.stopped) return;
    const delay = backoffDelay(this.attempt, this.backoff, this.random);
    this.attempt++;
    this.counters.retries++;
    this.log[level]({ admin: this.url.origin, config_id: this.configId, reason, retry_in_ms: delay, attempt: this.attempt }, `${detail}; reconnecting in ${delay} ms`);
    this.setState('backoff', reason);
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.connect();
    }, delay);
  }

  /**
   * GET /server_info: Envoy's node id (for logs) and its uptime, to tell a restarted Envoy (trace
   * ids start over) from a re-attach to the same process. Optional: any failure is ignored.
   */
  private async refreshServerInfo(): Promise<void> {
    let info: unknown;
    try {
      info = await this.getJson('/server_info', 2000, 1024 * 1024);
    } catch {
      return;
    }
    if (typeof info !== 'object' || info === null) return;
    const o = info as { node?: { id?: unknown }; uptime_current_epoch?: unknown };
    if (o.node && typeof o.node.id === 'string') this.serverNode = o.node.id;
    const up = typeof o.uptime_current_epoch === 'string' ? /^(\d+)(?:\.\d+)?s$/.exec(o.uptime_current_epoch) : null;
    if (!up) return;
    const startSec = Math.floor(Date.now() / 1000) - Number(up[1]);
    if (this.envoyStartSec !== null && Math.abs(startSec - this.envoyStartSec) > 2) {
      this.generation++;
      const nodeId = `admin:${this.url.origin}#${this.generation}`;
      this.log.info({ admin: this.url.origin, config_id: this.configId, previous: this.stream.nodeId, node: nodeId }, 'Envoy restarted (uptime went back): new trace id namespace');
      this.stream = { nodeId, tapId: this.configId, source: ADMIN_SOURCE };
    }
    this.envoyStartSec = startSec;
  }

  private getJson(pathName: string, timeoutMs: number, maxBytes: number): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const url = this.url;
      const req = http.get(
        { host: url.hostname.replace(/^\[|\]$/g, ''), port: url.port || 80, path: url.pathname.replace(/\/+$/, '') + pathName, agent: false, timeout: timeoutMs },
        (res) => {
          if (res.statusCode !== 200) {
            res.resume();
            reject(new Error(`HTTP ${res.statusCode}`));
            return;
          }
          const parts: Buffer[] = [];
          let size = 0;
          res.on('data', (c: Buffer) => {
            size += c.length;
            if (size > maxBytes) req.destroy(new Error('response too large'));
            else parts.push(c);
          });
          res.on('end', () => {
            try {
              resolve(JSON.parse(Buffer.concat(parts).toString('utf8')));
            } catch (err) {
              reject(err as Error);
            }
          });
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', reject);
    });
  }
}
