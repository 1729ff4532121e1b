/**
 * Envoy's side of the stock-Envoy doors, emulated for tests: its JSON printer, the admin /tap
 * endpoint, and the real fixture trace recast as streamed segments; plus a real Pipeline + FileSink
 * and the tshark check of the fixture's HTTP/2 frames.
 *
 * JSON as Envoy writes it (MessageUtil::getJsonStringFromMessage → protobuf's C++ JSON printer):
 * preserve_proto_field_names (snake_case), fields in field-number order, uint64/int64 as strings,
 * bytes base64, enums by name, google.protobuf.Timestamp as RFC 3339 with 0, 3, 6 or 9 fraction
 * digits, and when pretty-printed ONE space of indentation per level (`{\n "socket_buffered_trace":
 * {\n  "trace_id": "0",` ...; see Envoy tap outputs quoted in the wild). Admin and file sinks print
 * with always_print_primitive_fields (defaults such as `"read_truncated": false` appear, unset
 * messages and unset oneof members do not); the UDP sink prints without it.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import pino, { type Logger } from 'pino';
import { PipelineStats } from '../../src/control/stats.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { Pipeline } from '../../src/pipeline.js';
import { FileSink } from '../../src/sink/file-sink.js';
import { tsharkInfo } from './tshark.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const fixturesDir = path.resolve(repoRoot, '..', 'shared', 'fixtures', 'envoy');
export const fixture = (name: string): Buffer => fs.readFileSync(path.join(fixturesDir, name));

export function traceWrapper(): protobuf.Type {
  return loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');
}

// ---------------------------------------------------------------------------------------------
// Envoy's JSON printer

export interface EnvoyJsonOptions {
  /** always_print_primitive_fields (admin and file sinks: true; UDP sink: false). */
  alwaysPrint: boolean;
  /** Pretty-print with protobuf's one-space indentation (default true). */
  pretty?: boolean;
  /** Indentation when pretty (default 1, what protobuf's C++ printer uses). */
  indent?: number;
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

function isLong(v: unknown): v is { low: number; high: number; toString(): string } {
  return typeof v === 'object' && v !== null && 'low' in v && 'high' in v;
}

/** RFC 3339 the way protobuf prints a Timestamp: fraction of 0, 3, 6 or 9 digits. */
export function protobufTimestamp(seconds: number, nanos: number): string {
  const base = new Date(seconds * 1000).toISOString().replace(/\.\d{3}Z$/, '');
  if (nanos === 0) return `${base}Z`;
  let frac = String(nanos).padStart(9, '0');
  if (nanos % 1_000_000 === 0) frac = frac.slice(0, 3);
  else if (nanos % 1000 === 0) frac = frac.slice(0, 6);
  return `${base}.${frac}Z`;
}

function scalarDefault(f: protobuf.Field, v: unknown): boolean {
  if (v === undefined || v === null) return true;
  if (isLong(v)) return v.low === 0 && v.high === 0;
  if (Buffer.isBuffer(v) || v instanceof Uint8Array) return v.length === 0;
  if (f.resolvedType instanceof protobuf.Enum) return v === 0;
  return v === 0 || v === '' || v === false;
}

function scalarJson(f: protobuf.Field, v: unknown): Json {
  if (f.resolvedType instanceof protobuf.Enum) return f.resolvedType.valuesById[v as number] ?? (v as number);
  if (['int64', 'uint64', 'sint64', 'fixed64', 'sfixed64'].includes(f.type)) return isLong(v) ? v.toString() : String(v ?? 0);
  if (f.type === 'bytes') return Buffer.from((v as Uint8Array | undefined) ?? []).toString('base64');
  return v as Json;
}

function messageJson(type: protobuf.Type, msg: Record<string, unknown>, always: boolean): { [k: string]: Json } {
  if (type.fullName === '.google.protobuf.Timestamp') throw new Error('Timestamp is printed by its parent');
  const out: { [k: string]: Json } = {};
  for (const f of [...type.fieldsArray].sort((a, b) => a.id - b.id)) {
    f.resolve();
    const v = msg[f.name];
    const member = f.partOf !== null && f.partOf !== undefined;
    const set = Object.hasOwn(msg, f.name) && v !== null && v !== undefined;
    const rt = f.resolvedType;
    if (f.repeated) {
      const arr = (v as unknown[] | undefined) ?? [];
      if (arr.length === 0 && !always) continue;
      out[f.name] = arr.map((e) => (rt instanceof protobuf.Type ? valueJson(rt, e, always) : scalarJson(f, e)));
    } else if (rt instanceof protobuf.Type) {
      if (!set) continue;
      out[f.name] = valueJson(rt, v, always);
    } else if (member) {
      if (!set) continue; // unset oneof members are never printed
      out[f.name] = scalarJson(f, v);
    } else {
      if (!always && scalarDefault(f, v)) continue;
      out[f.name] = scalarJson(f, v);
    }
  }
  return out;
}

function valueJson(type: protobuf.Type, v: unknown, always: boolean): Json {
  if (type.fullName === '.google.protobuf.Timestamp') {
    const t = v as { seconds: unknown; nanos?: number };
    return protobufTimestamp(Number(isLong(t.seconds) ? t.seconds.toString() : t.seconds ?? 0), t.nanos ?? 0);
  }
  return messageJson(type, v as Record<string, unknown>, always);
}

/** A TraceWrapper (plain object in protobufjs keepCase form, or a decoded message) as Envoy prints it. */
export function envoyJson(obj: Record<string, unknown> | protobuf.Message, opts: EnvoyJsonOptions): string {
  const type = traceWrapper();
  const msg = obj instanceof protobuf.Message ? obj : type.fromObject(obj);
  const tree = messageJson(type, msg as unknown as Record<string, unknown>, opts.alwaysPrint);
  return opts.pretty === false ? JSON.stringify(tree) : JSON.stringify(tree, null, opts.indent ?? 1);
}

/** A protobuf varint (the length prefix of PROTO_BINARY_LENGTH_DELIMITED files). */
export function varint(n: number): Buffer {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n >>>= 7;
  }
  out.push(n);
  return Buffer.from(out);
}

export function encodeTrace(obj: Record<string, unknown>): Buffer {
  const type = traceWrapper();
  const u8 = type.encode(type.fromObject(obj)).finish();
  return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

// ---------------------------------------------------------------------------------------------
// The real trace (tap2pcap_h2_ipv4: one h2c connection, 6 events)

export interface FixtureEvent {
  timestamp: { seconds: number; nanos: number };
  read?: { data: { as_bytes: Buffer } };
  write?: { data: { as_bytes: Buffer }; end_stream?: boolean };
}

/** The fixture's buffered trace as a plain object (keepCase names, Buffers, numbers). */
export function fixtureBufferedTrace(traceId = 0): Record<string, unknown> {
  const type = traceWrapper();
  const obj = type.toObject(type.decode(fixture('tap2pcap_h2_ipv4.v3.pb')), { longs: Number, bytes: Buffer }) as {
    socket_buffered_trace: { trace_id?: number; connection: unknown; events: FixtureEvent[] };
  };
  obj.socket_buffered_trace.trace_id = traceId;
  return obj as unknown as Record<string, unknown>;
}

/**
 * The same connection as Envoy's streaming transport-socket tap sends it (Envoy 1.37 seq_num
 * semantics): a connection segment, one segment per event, a closed event 1 µs after the last.
 */
export function fixtureStreamedSegments(traceId: number): Array<Record<string, unknown>> {
  const buffered = fixtureBufferedTrace(traceId).socket_buffered_trace as { connection: unknown; events: FixtureEvent[] };
  const out: Array<Record<string, unknown>> = [{ socket_streamed_trace_segment: { trace_id: traceId, connection: buffered.connection } }];
  let seq = 1;
  let last = { seconds: 0, nanos: 0 };
  for (const e of buffered.events) {
    const len = (e.read ?? e.write)!.data.as_bytes.length;
    const event: Record<string, unknown> = { timestamp: e.timestamp, seq_num: seq };
    if (e.read) event.read = { data: { as_bytes: e.read.data.as_bytes } };
    else event.write = { data: { as_bytes: e.write!.data.as_bytes }, end_stream: false };
    out.push({ socket_streamed_trace_segment: { trace_id: traceId, event } });
    seq += len;
    last = e.timestamp;
  }
  const closedTs = { seconds: last.seconds, nanos: last.nanos + 1000 };
  out.push({ socket_streamed_trace_segment: { trace_id: traceId, event: { timestamp: closedTs, closed: {}, seq_num: seq } } });
  return out;
}

/** The six Info strings of Envoy's expected tshark output for this trace. */
export function expectedH2Info(): string[] {
  return fixture('tap2pcap_h2_ipv4.txt')
    .toString('utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => /HTTP2 \d+ (.*)$/.exec(l)![1]!.trim());
}

/** `tshark -d tcp.port==10000,http2 -Y http2 -T fields -e _ws.col.Info`. */
export function h2Info(file: string): Promise<string[]> {
  return tsharkInfo(file, { decodeAs: ['tcp.port==10000,http2'], filter: 'http2' });
}

// ---------------------------------------------------------------------------------------------
// A real pipeline writing pcapng, with logs collected

export interface LogLine {
  level: number;
  msg: string;
  [k: string]: unknown;
}

export interface TestPipeline {
  pipeline: Pipeline;
  stats: PipelineStats;
  log: Logger;
  logs: LogLine[];
  out: string;
  /** Flushes and closes; the capture at `out` is complete afterwards. */
  close(): Promise<void>;
  /** Ingest errors by door and reason, e.g. { 'admin/malformed_json': 1 }. */
  errors(): Record<string, number>;
}

export function testPipeline(out: string): TestPipeline {
  const logs: LogLine[] = [];
  const log = pino(
    { level: 'debug' },
    {
      write(line: string) {
        logs.push(JSON.parse(line) as LogLine);
      },
    },
  );
  const stats = new PipelineStats();
  const pipeline = new Pipeline(
    { framer: pcapngFramer, snaplen: 262144, mss4: 1460, mss6: 1440, blockSize: 1024 * 1024, blockCount: 4, flushIntervalMs: 50, idleTimeoutMs: 300_000, maxFlows: 1000 },
    stats,
    log,
  );
  const sink = new FileSink({ path: out, framer: pcapngFramer, snaplen: 262144, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 4 }, stats, log);
  pipeline.addSink(sink);
  pipeline.start();
  let closed: Promise<void> | null = null;
  return {
    pipeline,
    stats,
    log,
    logs,
    out,
    close: () => (closed ??= pipeline.close()),
    errors: () => {
      const r: Record<string, number> = {};
      for (const [k, v] of stats.ingestErrors) r[k.replace('\u0000', '/')] = v;
      return r;
    },
  };
}

export async function waitFor(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// The admin endpoint

export const ALREADY_ATTACHED_TEXT = 'An attached /tap admin stream already exists. Detach it.';

export interface AttachedStream {
  /** The parsed TapRequest. */
  request: Record<string, unknown>;
  res: http.ServerResponse;
  closed: boolean;
}

/**
 * An HTTP/1.1 server that answers like Envoy's admin (source/extensions/common/tap/admin.cc):
 * POST /tap with a TapRequest → 200 and a chunked body kept open, one attached stream at a time
 * (a second POST → 400 with Envoy's exact text), 400 for unknown config ids and bodies without a
 * match; GET /server_info with node id and uptime. Tests push JSON through `send`, cut into
 * chunks at arbitrary points, and may end the stream.
 */
export class EmulatedEnvoyAdmin {
  readonly server: http.Server;
  readonly configIds = new Set<string>();
  readonly requests: Array<Record<string, unknown>> = [];
  readonly rejected: Array<{ status: number; body: string }> = [];
  attached: AttachedStream | null = null;
  nodeId = 'sidecar~10.1.2.3~app-7d9f.default~default.svc.cluster.local';
  /** Envoy has been up for an hour. */
  startedAt = Date.now() - 3_600_000;
  port = 0;
  private waiters: Array<() => void> = [];

  constructor(configIds: string[]) {
    for (const id of configIds) this.configIds.add(id);
    this.server = http.createServer((req, res) => this.route(req, res));
  }

  async listen(port = 0): Promise<number> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, '127.0.0.1', () => resolve());
    });
    this.port = (this.server.address() as { port: number }).port;
    return this.port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Simulates an Envoy restart for /server_info (uptime starts over). */
  restart(): void {
    this.startedAt = Date.now();
  }

  /** Resolves when a /tap stream is attached. */
  async waitAttached(timeoutMs = 10_000): Promise<AttachedStream> {
    if (this.attached && !this.attached.closed) return this.attached;
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('timed out waiting for a /tap attach')), timeoutMs);
      this.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
    return this.attached!;
  }

  /**
   * Writes `text` to the attached stream in chunks of the given sizes (cycled), each chunk its own
   * HTTP chunk and, with the pause between them, usually its own TCP read on the client.
   */
  async send(text: string | Buffer, chunkSizes: number[] = [4096], pauseMs = 1): Promise<void> {
    const a = this.attached;
    if (!a || a.closed) throw new Error('no attached /tap stream');
    const buf = typeof text === 'string' ? Buffer.from(text) : text;
    let pos = 0;
    let i = 0;
    while (pos < buf.length) {
      const n = Math.max(1, chunkSizes[i++ % chunkSizes.length]!);
      a.res.write(buf.subarray(pos, pos + n));
      pos += n;
      if (pauseMs > 0) await sleep(pauseMs);
    }
  }

  /** Envoy ends the response (what a stream that ends looks like to the client). */
  endStream(): void {
    const a = this.attached;
    if (!a) return;
    a.res.end();
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = (req.url ?? '/').split('?')[0];
    if (url === '/server_info' && req.method === 'GET') {
      const up = Math.max(0, Math.floor((Date.now() - this.startedAt) / 1000));
      const body = JSON.stringify({ version: 'emulated/1.37.0', state: 'LIVE', uptime_current_epoch: `${up}s`, uptime_all_epochs: `${up}s`, node: { id: this.nodeId, cluster: 'app.default' } }, null, 1);
      res.writeHead(200, { 'content-type': 'application/json' }).end(body);
      return;
    }
    if (url !== '/tap') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=UTF-8' }).end('invalid path. admin commands are:\n');
      return;
    }
    if (req.method !== 'POST') {
      res.writeHead(405, { 'content-type': 'text/plain; charset=UTF-8' }).end('Method Not Allowed\n');
      return;
    }
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('end', () => this.tap(req, res, Buffer.concat(parts).toString('utf8')));
  }

  private bad(res: http.ServerResponse, text: string): void {
    this.rejected.push({ status: 400, body: text });
    res.writeHead(400, { 'content-type': 'text/plain; charset=UTF-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-cache, max-age=0', 'x-content-type-options': 'nosniff', server: 'envoy' }).end(text);
  }

  private tap(req: http.IncomingMessage, res: http.ServerResponse, body: string): void {
    if (this.attached && !this.attached.closed) return this.bad(res, ALREADY_ATTACHED_TEXT);
    if (!body) return this.bad(res, '/tap requires a JSON/YAML body');
    let request: Record<string, unknown>;
    try {
      request = JSON.parse(body) as Record<string, unknown>;
    } catch (err) {
      return this.bad(res, `Unable to parse JSON as proto (${(err as Error).message})`);
    }
    const configId = String(request.config_id ?? '');
    const tapConfig = request.tap_config as { match?: unknown; match_config?: unknown; output_config?: { sinks?: Array<Record<string, unknown>> } } | undefined;
    if (!tapConfig || !tapConfig.output_config) return this.bad(res, 'Proto constraint validation failed (TapRequestValidationError.TapConfig: value is required)');
    const sinks = tapConfig.output_config.sinks ?? [];
    if (sinks.length !== 1) return this.bad(res, 'Proto constraint validation failed (OutputConfigValidationError.Sinks: value must contain between 1 and 1 items, inclusive)');
    if (!this.configIds.has(configId)) return this.bad(res, `Unknown config id '${configId}'. No extension has registered with this id.`);
    if (!tapConfig.match && !tapConfig.match_config) return this.bad(res, `Neither match nor match_config is set in TapConfig: ${JSON.stringify(tapConfig)}`);
    const sink = sinks[0]!;
    if (!('streaming_admin' in sink) || !['JSON_BODY_AS_BYTES', 'JSON_BODY_AS_STRING', undefined].includes(sink.format as string | undefined)) {
      return this.bad(res, 'emulator: only streaming_admin with a JSON format is emulated');
    }
    this.requests.push(request);
    // Envoy sends the headers as soon as the handler returns 200 and keeps the body open.
    res.writeHead(200, {
      'content-type': 'text/plain; charset=UTF-8',
      'cache-control': 'no-cache, max-age=0',
      'x-content-type-options': 'nosniff',
      server: 'envoy',
      'transfer-encoding': 'chunked',
    });
    res.flushHeaders();
    const a: AttachedStream = { request, res, closed: false };
    this.attached = a;
    // Closing the client connection detaches (Envoy's addOnDestroyCallback clears the tap).
    const detach = (): void => {
      a.closed = true;
      if (this.attached === a) this.attached = null;
    };
    res.on('close', detach);
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}
