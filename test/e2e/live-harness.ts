/**
 * Shared by the live endpoint and extcap tests: a throw-away PKI made with openssl, a real Pipeline
 * (FileSink + LiveServer) fed with Envoy traces through the real TraceDecoder, and raw / WebSocket
 * viewer clients. Servers bind to 127.0.0.1 only.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import pino, { type Logger } from 'pino';
import { WebSocket } from 'ws';
import { PipelineStats } from '../../src/control/stats.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { TraceDecoder, type StreamState } from '../../src/ingest/trace-decoder.js';
import { Pipeline } from '../../src/pipeline.js';
import { FileSink } from '../../src/sink/file-sink.js';
import { LiveServer, requestLine, type LiveServerOptions } from '../../src/sink/live-server.js';
import { TestPki } from '../helpers/pki.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const ENVOY_FIXTURES = path.resolve(REPO, '..', 'shared', 'fixtures', 'envoy');

export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

// ---------------------------------------------------------------------------------------------
// PKI (test/helpers/pki.ts: openssl via execFile)

export interface Pki {
  dir: string;
  /** CA that signs the server and the good client certificate. */
  ca: string;
  serverCert: string;
  serverKey: string;
  /** The server's next certificate (same names, same CA, new key): a rotation. */
  serverCert2: string;
  serverKey2: string;
  clientCert: string;
  clientKey: string;
  /** Another CA, and a client certificate it signed. */
  otherCa: string;
  rogueCert: string;
  rogueKey: string;
  remove(): void;
}

export async function makePki(): Promise<Pki> {
  const pki = await TestPki.create('meshcap-live-pki-');
  const ca = await pki.ca('ca');
  const other = await pki.ca('other-ca');
  const server = await pki.leaf(ca, 'server', { cn: 'localhost', ip: ['127.0.0.1'], dns: ['localhost'] });
  const server2 = await pki.leaf(ca, 'server2', { cn: 'localhost', ip: ['127.0.0.1'], dns: ['localhost'] });
  const client = await pki.leaf(ca, 'client', { cn: 'viewer-alice' });
  const rogue = await pki.leaf(other, 'rogue', { cn: 'viewer-mallory' });
  return {
    dir: pki.dir,
    ca: ca.cert,
    serverCert: server.cert,
    serverKey: server.key,
    serverCert2: server2.cert,
    serverKey2: server2.key,
    clientCert: client.cert,
    clientKey: client.key,
    otherCa: other.cert,
    rogueCert: rogue.cert,
    rogueKey: rogue.key,
    remove: () => pki.remove(),
  };
}

export const GOOD_TOKEN = 'tok-3f9c2b7e41d8a0c5e6f7a8b9c0d1e2f3';
export const OTHER_TOKEN = 'tok-another-valid-token-0123456789';
export const WRONG_TOKEN = 'tok-wrong-wrong-wrong-wrong-wrong-0';

export function writeTokenFiles(dir: string): { serverTokens: string; clientToken: string; wrongToken: string } {
  const serverTokens = path.join(dir, 'tokens');
  fs.writeFileSync(serverTokens, `# live viewers\n${GOOD_TOKEN}\n\n${OTHER_TOKEN}\n`, { mode: 0o600 });
  const clientToken = path.join(dir, 'token');
  fs.writeFileSync(clientToken, `${GOOD_TOKEN}\n`, { mode: 0o600 });
  const wrongToken = path.join(dir, 'wrong-token');
  fs.writeFileSync(wrongToken, `${WRONG_TOKEN}\n`, { mode: 0o600 });
  return { serverTokens, clientToken, wrongToken };
}

// ---------------------------------------------------------------------------------------------
// Pipeline + live server

export interface LogLine {
  level: number;
  msg: string;
  audit?: boolean;
  event?: string;
  [k: string]: unknown;
}

export interface LiveEnv {
  pipeline: Pipeline;
  stats: PipelineStats;
  live: LiveServer;
  file: FileSink;
  /** The FileSink's capture. */
  out: string;
  port: number;
  logs: LogLine[];
  audit(): LogLine[];
  /** Feeds the synthetic StreamTaps fixture (Envoy's h2c trace, trace_id 1) through the decoder. */
  feedFixture(from?: number, to?: number): void;
  /** Feeds TraceWrapper messages for one Envoy node. */
  feedTraces(nodeId: string, messages: Buffer[]): void;
  close(): Promise<void>;
}

export function grpcFrames(body: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let off = 0; off < body.length; ) {
    const len = body.readUInt32BE(off + 1);
    out.push(body.subarray(off + 5, off + 5 + len));
    off += 5 + len;
  }
  return out;
}

export const FIXTURE_MESSAGES = (): Buffer[] => grpcFrames(fs.readFileSync(path.join(ENVOY_FIXTURES, 'synthetic_streamtaps_requests.grpc.bin')));

/** The six HTTP/2 Info strings of Envoy's golden tshark output for the fixture trace. */
export function expectedHttp2Info(): string[] {
  return fs
    .readFileSync(path.join(ENVOY_FIXTURES, 'tap2pcap_h2_ipv4.txt'), 'utf8')
    .split('\n')
    .map((l) => /\sHTTP2\s+\d+\s+(.*)$/.exec(l)?.[1]?.trim())
    .filter((s): s is string => !!s);
}

export async function startLiveEnv(dir: string, opts: Partial<LiveServerOptions> = {}, pipelineOpts: { blockSize?: number; blockCount?: number } = {}): Promise<LiveEnv> {
  const logs: LogLine[] = [];
  const log: Logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) });
  const stats = new PipelineStats();
  const pipeline = new Pipeline(
    {
      framer: pcapngFramer,
      snaplen: 262144,
      mss4: 1460,
      mss6: 1440,
      blockSize: pipelineOpts.blockSize ?? 256 * 1024,
      blockCount: pipelineOpts.blockCount ?? 8,
      flushIntervalMs: 50,
      idleTimeoutMs: 300_000,
      maxFlows: 10_000,
    },
    stats,
    log,
  );
  const out = path.join(dir, 'file-sink.pcapng');
  const file = new FileSink({ path: out, framer: pcapngFramer, snaplen: 262144, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 8 }, stats, log);
  pipeline.addSink(file);
  const live = new LiveServer({ listen: '127.0.0.1:0', snaplen: 262144, flowInfo: (id) => pipeline.flows.flowInfo(id), ...opts }, log);
  await live.start();
  pipeline.addSink(live);
  pipeline.start();
  const grpcDecoder = new TraceDecoder(pipeline);
  const wrapperDecoder = new TraceDecoder(pipeline);
  const fixture = FIXTURE_MESSAGES();
  let state: StreamState = { identity: null, messages: 0 };
  let closed: Promise<void> | null = null;
  return {
    pipeline,
    stats,
    live,
    file,
    out,
    port: live.addresses.tls?.port ?? 0,
    logs,
    audit: () => logs.filter((l) => l.audit === true),
    feedFixture(from = 0, to = fixture.length) {
      if (from === 0) state = { identity: null, messages: 0 };
      for (const m of fixture.slice(from, to)) grpcDecoder.decodeStreamTapsRequest(m, state, 'grpc', () => ({ nodeId: 'anon', tapId: '', source: 'grpc' }));
    },
    feedTraces(nodeId, messages) {
      for (const m of messages) wrapperDecoder.decodeTraceWrapper(m, { nodeId, tapId: 'tap', source: 'test' });
    },
    close: () => (closed ??= pipeline.close()),
  };
}

// ---------------------------------------------------------------------------------------------
// Envoy traces made up here

const Wrapper = loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');
const seg = (traceId: number, piece: Record<string, unknown>): Buffer =>
  Buffer.from(Wrapper.encode(Wrapper.fromObject({ socket_streamed_trace_segment: { trace_id: traceId, ...piece } })).finish());
const sock = (address: string, port: number): Record<string, unknown> => ({ socket_address: { address, port_value: port } });
let clock = 1_700_000_000;
const ts = (): { seconds: number; nanos: number } => ({ seconds: clock++, nanos: 0 });

/** A whole connection: open, request, response (payload bytes), close. */
export function connection(traceId: number, local: [string, number], remote: [string, number], request: Buffer | string, response: Buffer | string): Buffer[] {
  return [
    seg(traceId, { connection: { local_address: sock(...local), remote_address: sock(...remote) } }),
    seg(traceId, { event: { timestamp: ts(), read: { data: { as_bytes: Buffer.from(request) } } } }),
    seg(traceId, { event: { timestamp: ts(), write: { data: { as_bytes: Buffer.from(response) }, end_stream: false } } }),
    seg(traceId, { event: { timestamp: ts(), closed: {} } }),
  ];
}

export const openConn = (traceId: number, local: [string, number], remote: [string, number]): Buffer =>
  seg(traceId, { connection: { local_address: sock(...local), remote_address: sock(...remote) } });
export const readEv = (traceId: number, data: Buffer | string): Buffer => seg(traceId, { event: { timestamp: ts(), read: { data: { as_bytes: Buffer.from(data) } } } });
export const writeEv = (traceId: number, data: Buffer | string): Buffer =>
  seg(traceId, { event: { timestamp: ts(), write: { data: { as_bytes: Buffer.from(data) }, end_stream: false } } });
export const closedEv = (traceId: number): Buffer => seg(traceId, { event: { timestamp: ts(), closed: {} } });

// ---------------------------------------------------------------------------------------------
// Viewers

export interface TlsClientOpts {
  ca?: string;
  cert?: string;
  key?: string;
}

function tlsOpts(o: TlsClientOpts): tls.ConnectionOptions {
  return {
    ...(o.ca ? { ca: fs.readFileSync(o.ca) } : {}),
    ...(o.cert ? { cert: fs.readFileSync(o.cert), key: fs.readFileSync(o.key!) } : {}),
  };
}

export interface RawViewer {
  socket: tls.TLSSocket;
  data(): Buffer;
  /** Resolves when the connection is closed (by either side). */
  closed: Promise<void>;
  error: Error | null;
}

/** A MESHCAP-LIVE/1 client. With `paused`, it never reads after the TLS handshake. */
export function rawViewer(port: number, o: TlsClientOpts & { token?: string; filter?: string; paused?: boolean; client?: string }): RawViewer {
  const chunks: Buffer[] = [];
  const socket = tls.connect({ host: '127.0.0.1', port, ...tlsOpts(o) });
  const v: RawViewer = {
    socket,
    data: () => Buffer.concat(chunks),
    closed: new Promise<void>((resolve) => socket.on('close', () => resolve())),
    error: null,
  };
  socket.on('error', (err) => (v.error = err));
  socket.on('secureConnect', () => {
    socket.write(requestLine({ token: o.token ?? null, filter: o.filter ?? null, client: o.client ?? 'live-test' }));
    if (o.paused) socket.pause();
  });
  socket.on('data', (d: Buffer) => chunks.push(d));
  return v;
}

export interface WsViewer {
  ws: WebSocket;
  messages: Buffer[];
  data(): Buffer;
  opened: Promise<void>;
  closed: Promise<{ code: number; reason: string }>;
  /** HTTP refusal, when the upgrade was refused. */
  refusal: Promise<{ status: number; reason: string; body: string } | null>;
}

export function wsViewer(port: number, o: TlsClientOpts & { token?: string; filter?: string; paused?: boolean }): WsViewer {
  const url = new URL(`wss://127.0.0.1:${port}/live`);
  if (o.filter) url.searchParams.set('filter', o.filter);
  const ws = new WebSocket(url, ['meshcap-live'], { ...tlsOpts(o), ...(o.token ? { headers: { Authorization: `Bearer ${o.token}` } } : {}) });
  const messages: Buffer[] = [];
  ws.on('message', (d: Buffer) => messages.push(d));
  ws.on('error', () => {});
  let refused: (r: { status: number; reason: string; body: string } | null) => void = () => {};
  const refusal = new Promise<{ status: number; reason: string; body: string } | null>((r) => (refused = r));
  ws.on('unexpected-response', (_req, res) => {
    let body = '';
    res.on('data', (d: Buffer) => (body += d.toString()));
    res.on('end', () => refused({ status: res.statusCode ?? 0, reason: String(res.headers['x-meshcap-refusal'] ?? ''), body }));
  });
  return {
    ws,
    messages,
    data: () => Buffer.concat(messages),
    opened: new Promise<void>((resolve) =>
      ws.on('open', () => {
        refused(null);
        if (o.paused) ws.pause();
        resolve();
      }),
    ),
    closed: new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }))),
    refusal,
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

/** EPB payloads of a pcapng byte stream (comments too), without relying on meshcap's reader. */
export function pcapngPackets(buf: Buffer): Array<{ data: Buffer; comments: string[] }> {
  const out: Array<{ data: Buffer; comments: string[] }> = [];
  let off = 0;
  while (off + 12 <= buf.length) {
    const type = buf.readUInt32LE(off);
    const len = buf.readUInt32LE(off + 4);
    if (len < 12 || off + len > buf.length) break;
    if (type === 6) {
      const cap = buf.readUInt32LE(off + 20);
      const data = buf.subarray(off + 28, off + 28 + cap);
      const comments: string[] = [];
      let o = off + 28 + ((cap + 3) & ~3);
      while (o + 4 <= off + len - 4) {
        const code = buf.readUInt16LE(o);
        const l = buf.readUInt16LE(o + 2);
        if (code === 0) break;
        if (code === 1) comments.push(buf.toString('utf8', o + 4, o + 4 + l));
        o += 4 + ((l + 3) & ~3);
      }
      out.push({ data, comments });
    }
    off += len;
  }
  return out;
}
