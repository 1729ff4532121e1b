/**
 * Bad input, end to end: the real `meshcap serve` receives one good StreamTaps stream (Envoy's
 * h2c trace recast as the synthetic fixture, node A) and, at the same time, one bad stream from
 * node B. Whatever node B does, meshcap must keep running, count the problem
 * (meshcap_ingest_errors_total{source="grpc",reason} or meshcap_dropped_packets_total{cause}),
 * say so in a warn log line, and leave node A's capture intact: the six HTTP/2 frames of Envoy's
 * golden tshark output and no TCP analysis flags on A's connection.
 */
import fs from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { encodeRequests, streamTaps, STREAM_TAPS_PATH, STREAM_TAPS_PATH_V2, type StreamTapsResult } from '../helpers/envoy-grpc-client.js';
import {
  CLI_BUILT,
  expectedHttp2Info,
  freePort,
  httpGet,
  killAll,
  LOG_LEVEL,
  metricValue,
  sleep,
  startServe,
  syntheticStreamMessages,
  tempDir,
  waitForMetrics,
  type ServeProcess,
} from '../helpers/serve-process.js';
import { tsharkFields } from '../helpers/tshark.js';

const GOOD_PORT = 53288; // node A's client port (Envoy's listener is 127.0.0.1:10000)
const T0 = 1525207293; // the fixture's epoch second
const B_LOCAL = '10.20.0.1';
const B_REMOTE = '10.20.0.2';

let GOOD: Buffer[] = [];
let EXPECTED: string[] = [];

beforeAll(() => {
  GOOD = syntheticStreamMessages();
  EXPECTED = expectedHttp2Info();
  expect(GOOD).toHaveLength(8);
  expect(EXPECTED).toHaveLength(6);
});

// --- StreamTapsRequest builders for node B (plain objects, encoded with protobufjs) ----------

const IDENTIFIER_B = { node: { id: 'node-B', cluster: 'bad-input' }, tap_id: 'bad-input-tap' };

type Piece = Record<string, unknown>;

function segment(traceId: number, piece: Piece, first = false): Record<string, unknown> {
  return {
    ...(first ? { identifier: IDENTIFIER_B } : {}),
    trace_id: traceId,
    trace: { socket_streamed_trace_segment: { trace_id: traceId, ...piece } },
  };
}

function connectionB(remotePort: number): Piece {
  return {
    local_address: { socket_address: { address: B_LOCAL, port_value: 8080 } },
    remote_address: { socket_address: { address: B_REMOTE, port_value: remotePort } },
  };
}

const connSeg = (traceId: number, remotePort: number, first = false) => segment(traceId, { connection: connectionB(remotePort) }, first);

function eventSeg(traceId: number, ev: { t: number; kind: 'read' | 'write' | 'closed'; data?: Buffer; seq?: number; conn?: Piece }, first = false) {
  const sec = Math.floor(ev.t);
  const nanos = Math.round((ev.t - sec) * 1e9);
  const event: Record<string, unknown> = { timestamp: { seconds: T0 + sec, nanos } };
  if (ev.kind === 'closed') event.closed = {};
  else event[ev.kind] = { data: { as_bytes: ev.data ?? Buffer.alloc(0) } };
  if (ev.seq !== undefined) event.seq_num = ev.seq;
  if (ev.conn) event.connection = ev.conn;
  return segment(traceId, { event }, first);
}

/** Printable filler (never mistaken for HTTP/2) of a given length. */
const filler = (n: number, c = 'b') => Buffer.alloc(n, c);

/** One gRPC message on the wire: compressed flag, big-endian length, bytes. */
function grpcFrame(body: Buffer, compressed: boolean): Buffer {
  const prefix = Buffer.alloc(5);
  prefix[0] = compressed ? 1 : 0;
  prefix.writeUInt32BE(body.length, 1);
  return Buffer.concat([prefix, body]);
}

interface RawCallResult {
  status: number;
  grpcStatus: string;
  grpcMessage: string;
  data: Buffer;
}

/**
 * A StreamTaps call made by hand over HTTP/2 (h2c on the Unix socket), for what grpc-js's client
 * will not send: chosen headers, gzip'd frames, a stream left open for the server's deadline.
 */
async function rawCall(sock: string, headers: http2.OutgoingHttpHeaders, body: Buffer, end = true): Promise<RawCallResult> {
  const session = http2.connect('http://localhost', { createConnection: () => net.connect(sock) });
  session.on('error', () => {});
  try {
    return await new Promise<RawCallResult>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no answer to ${JSON.stringify(headers)} in 5 s`)), 5000);
      const req = session.request({ ':method': 'POST', 'content-type': 'application/grpc', te: 'trailers', ...headers });
      const r: RawCallResult = { status: 0, grpcStatus: '', grpcMessage: '', data: Buffer.alloc(0) };
      const data: Buffer[] = [];
      const status = (h: http2.IncomingHttpHeaders): void => {
        if (h['grpc-status'] !== undefined) r.grpcStatus = String(h['grpc-status']);
        if (h['grpc-message'] !== undefined) r.grpcMessage = decodeURIComponent(String(h['grpc-message']));
      };
      req.on('response', (h) => {
        r.status = Number(h[':status']);
        status(h);
      });
      req.on('trailers', status);
      req.on('data', (c: Buffer) => data.push(c));
      req.on('error', () => {});
      // The server's side ends with its trailers, whether or not the request was ended.
      const done = (): void => {
        clearTimeout(timer);
        r.data = Buffer.concat(data);
        resolve(r);
      };
      req.on('end', done);
      req.on('close', done);
      if (end) req.end(body);
      else req.write(body);
    });
  } finally {
    session.destroy();
  }
}

// --- one server per test ---------------------------------------------------------------------

interface Env {
  dir: string;
  sock: string;
  target: string;
  out: string;
  port: number;
  proc: ServeProcess;
}

const dirs: string[] = [];

async function startEnv(extra: string[] = []): Promise<Env> {
  const dir = tempDir('meshcap-bad-');
  dirs.push(dir);
  const sock = path.join(dir, 'tap.sock');
  const out = path.join(dir, 'out.pcapng');
  const port = await freePort();
  const proc = await startServe({
    args: ['--grpc-listen', `unix:${sock}`, '-w', out, '--metrics-listen', `127.0.0.1:${port}`, '--flush-interval', '100', ...extra],
    cwd: dir,
    socket: sock,
    env: doorEnv,
  });
  return { dir, sock, target: `unix:${sock}`, out, port, proc };
}

afterEach(async () => {
  await killAll();
  if (!process.env.MESHCAP_E2E_KEEP) for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** Runs node A's good stream and `bad` concurrently; A must succeed. */
async function withGoodStream<T>(env: Env, bad: () => Promise<T>): Promise<T> {
  const [good, badResult] = await Promise.all([streamTaps(env.target, GOOD), bad()]);
  expect(good.code, `good stream: ${good.details}`).toBe(0);
  expect(good.sent).toBe(GOOD.length);
  return badResult;
}

/** The counter must rise, the process must live and answer /readyz, a warn line must name it. */
async function expectCounted(env: Env, metric: string, labels: Record<string, string>, min = 1): Promise<Map<string, number>> {
  const m = await waitForMetrics(env.port, (mm) => metricValue(mm, metric, labels) >= min, 2000);
  expect(metricValue(m, metric, labels), `${metric} ${JSON.stringify(labels)}\n${env.proc.stderr()}`).toBeGreaterThanOrEqual(min);
  expect(env.proc.alive()).toBe(true);
  expect((await httpGet(env.port, '/readyz')).status).toBe(200);
  return m;
}

async function expectWarn(env: Env, reason: string): Promise<void> {
  const line = await env.proc.waitForLog((l) => l.level >= LOG_LEVEL.warn && l.reason === reason, 3000);
  expect(line.msg.length).toBeGreaterThan(0);
}

/** SIGTERM → exit 0; node A's connection dissects exactly like Envoy's golden output, cleanly. */
async function stopAndCheckGood(env: Env): Promise<void> {
  const stop = await env.proc.stop('SIGTERM');
  expect({ code: stop.code, signal: stop.signal }, env.proc.stderr()).toEqual({ code: 0, signal: null });
  expect(fs.existsSync(env.out)).toBe(true);
  const info = await tsharkFields(env.out, ['_ws.col.Info'], { decodeAs: ['tcp.port==10000,http2'], filter: 'http2' });
  expect(info.map((r) => r[0])).toEqual(EXPECTED);
  const flagged = await tsharkFields(env.out, ['frame.number', '_ws.col.Info'], { filter: `tcp.port==${GOOD_PORT} && tcp.analysis.flags` });
  expect(flagged).toEqual([]);
  const completeness = await tsharkFields(env.out, ['tcp.completeness'], { twoPass: true, filter: `tcp.port==${GOOD_PORT}` });
  expect(new Set(completeness.map((r) => r[0]))).toEqual(new Set(['31']));
}

const ERRORS = 'meshcap_ingest_errors_total';
const grpcReason = (reason: string) => ({ source: 'grpc', reason });

/**
 * Every case runs against both StreamTaps doors: grpc-js (the default) and the experimental one on
 * node:http2 (MESHCAP_INGEST_H2=1, src/ingest/h2-tap-server.ts), which must behave the same.
 */
const DOORS: Array<[string, Record<string, string>]> = [
  ['grpc-js', {}],
  ['node:http2', { MESHCAP_INGEST_H2: '1' }],
];
let doorEnv: Record<string, string> = {};

describe.skipIf(!CLI_BUILT).each(DOORS)('meshcap serve (%s door): bad input next to a good stream', (door, env) => {
  beforeAll(() => {
    doorEnv = env;
  });
  it('malformed protobuf (random bytes, truncated message) is counted, the bad stream carries on', async () => {
    const env = await startEnv();
    const valid = encodeRequests([
      connSeg(3, 40001, true),
      eventSeg(3, { t: 1, kind: 'read', data: filler(120), seq: 1 }),
      eventSeg(3, { t: 1.1, kind: 'write', data: filler(80, 'w'), seq: 121 }),
      eventSeg(3, { t: 1.2, kind: 'closed', seq: 202 }),
    ]);
    // Field 3 with wire type 7 (no such wire type), then noise: rejected by the first tag.
    let x = 12345;
    const noise = Buffer.from(Array.from({ length: 300 }, () => ((x = (x * 1103515245 + 12345) >>> 0) >>> 16) & 0xff));
    const random = Buffer.concat([Buffer.from([0x1f]), noise]);
    const whole = encodeRequests([eventSeg(3, { t: 1.05, kind: 'read', data: filler(64), seq: 121 })])[0]!;
    const truncated = whole.subarray(0, whole.length - 9);
    const res = await withGoodStream(env, () => streamTaps(env.target, [valid[0]!, valid[1]!, random, truncated, valid[2]!, valid[3]!]));
    expect(res.code, res.details).toBe(0);
    const m = await expectCounted(env, ERRORS, grpcReason('malformed_protobuf'), 2);
    expect(metricValue(m, ERRORS, grpcReason('malformed_protobuf'))).toBe(2);
    await expectWarn(env, 'malformed_protobuf');
    await stopAndCheckGood(env);
    // The bad stream was not cut: its valid messages around the garbage made a whole connection.
    const b = await tsharkFields(env.out, ['tcp.len'], { filter: 'tcp.port==40001 && tcp.len > 0' });
    expect(b.map((r) => Number(r[0]))).toEqual([120, 80]);
  });

  it('a malformed FIRST message of a stream is counted under source="grpc"', async () => {
    // The identifier is not known yet when the very first message is rejected; the error still
    // came through the gRPC door and must be labelled so.
    const env = await startEnv();
    const garbage = Buffer.from([0x1a, 0x7f, 0x01, 0x02]); // field 3, length 127, 2 bytes present
    const res = await withGoodStream(env, () => streamTaps(env.target, [garbage, ...encodeRequests([connSeg(4, 40006, true)])]));
    expect(res.code, res.details).toBe(0);
    const m = await expectCounted(env, ERRORS, grpcReason('malformed_protobuf'), 1);
    expect(metricValue(m, ERRORS, { source: 'unknown', reason: 'malformed_protobuf' })).toBe(0);
    await expectWarn(env, 'malformed_protobuf');
    await stopAndCheckGood(env);
  });

  it('events for an unknown flow are counted and the flow starts mid-stream (no SYN)', async () => {
    const env = await startEnv();
    // No connection segment: the connection is only known from set_connection_per_event.
    const conn = connectionB(40002);
    const msgs = encodeRequests([
      eventSeg(7, { t: 2, kind: 'read', data: filler(300), seq: 5001, conn }, true),
      eventSeg(7, { t: 2.1, kind: 'write', data: filler(200, 'w'), seq: 5301, conn }),
      eventSeg(7, { t: 2.2, kind: 'read', data: filler(100), seq: 5501, conn }),
    ]);
    const res = await withGoodStream(env, () => streamTaps(env.target, msgs));
    expect(res.code, res.details).toBe(0);
    const m = await expectCounted(env, ERRORS, grpcReason('unknown_flow'), 1);
    expect(metricValue(m, ERRORS, grpcReason('unknown_flow'))).toBe(1);
    await expectWarn(env, 'unknown_flow');
    await stopAndCheckGood(env);
    const rows = await tsharkFields(env.out, ['tcp.flags.syn', 'tcp.len', 'frame.comment'], { filter: 'tcp.port==40002' });
    expect(rows.length).toBe(3);
    expect(rows.every((r) => r[0] === 'False' || r[0] === '0')).toBe(true);
    expect(rows.map((r) => Number(r[1]))).toEqual([300, 200, 100]);
    expect(rows[0]![2]).toMatch(/start not seen|mid-stream/);
  });

  it('a flow closed twice is counted as closed_unknown_flow, and only node B is affected', async () => {
    const env = await startEnv();
    // Same trace id as node A's connection (1): flows are keyed by node, so A must not be touched.
    const msgs = encodeRequests([
      connSeg(1, 40003, true),
      eventSeg(1, { t: 3, kind: 'read', data: filler(50), seq: 1 }),
      eventSeg(1, { t: 3.1, kind: 'write', data: filler(60, 'w'), seq: 51 }),
      eventSeg(1, { t: 3.2, kind: 'closed', seq: 112 }),
      eventSeg(1, { t: 3.3, kind: 'closed', seq: 113 }),
    ]);
    const res = await withGoodStream(env, () => streamTaps(env.target, msgs));
    expect(res.code, res.details).toBe(0);
    const m = await expectCounted(env, ERRORS, grpcReason('closed_unknown_flow'), 1);
    expect(metricValue(m, ERRORS, grpcReason('closed_unknown_flow'))).toBe(1);
    await expectWarn(env, 'closed_unknown_flow');
    await stopAndCheckGood(env);
    const fins = await tsharkFields(env.out, ['frame.number'], { filter: 'tcp.port==40003 && tcp.flags.fin==1' });
    expect(fins.length).toBe(2);
  });

  it('timestamps going backwards are counted and clamped (capture time never goes back)', async () => {
    const env = await startEnv();
    const msgs = encodeRequests([
      connSeg(9, 40004, true),
      eventSeg(9, { t: 4.5, kind: 'read', data: filler(70), seq: 1 }),
      eventSeg(9, { t: 4.2, kind: 'write', data: filler(90, 'w'), seq: 71 }), // 300 ms before the read
      eventSeg(9, { t: 4.6, kind: 'closed', seq: 162 }),
    ]);
    const res = await withGoodStream(env, () => streamTaps(env.target, msgs));
    expect(res.code, res.details).toBe(0);
    await expectCounted(env, ERRORS, grpcReason('timestamp_backwards'), 1);
    await expectWarn(env, 'timestamp_backwards');
    await stopAndCheckGood(env);
    const times = (await tsharkFields(env.out, ['frame.time_epoch'], { filter: 'tcp.port==40004' })).map((r) => Number(r[0]));
    expect(times.length).toBeGreaterThan(3);
    for (let i = 1; i < times.length; i++) expect(times[i]!).toBeGreaterThanOrEqual(times[i - 1]!);
  });

  it('a 64 MiB StreamTapsRequest (> --max-message-size 16 MiB) rejects that stream, counted and logged', async () => {
    const env = await startEnv();
    const [first] = encodeRequests([connSeg(11, 40007, true)]);
    const [big] = encodeRequests([eventSeg(11, { t: 5, kind: 'read', data: Buffer.alloc(64 * 1024 * 1024, 0x61), seq: 1 })]);
    expect(big!.length).toBeGreaterThan(64 * 1024 * 1024);
    const res: StreamTapsResult = await withGoodStream(env, () => streamTaps(env.target, [first!, big!]));
    expect(res.code, res.details).toBe(8); // RESOURCE_EXHAUSTED, from the door's size check
    expect(res.details).toMatch(/larger than max/);
    // grpc-js ends the call itself and meshcap sees a cancelled stream; the node:http2 door says
    // message_too_large. Accept either label, but it must be counted and logged under it.
    const m = await waitForMetrics(env.port, (mm) => metricValue(mm, ERRORS, grpcReason('message_too_large')) + metricValue(mm, ERRORS, grpcReason('stream_aborted')) >= 1);
    const reason = metricValue(m, ERRORS, grpcReason('message_too_large')) > 0 ? 'message_too_large' : 'stream_aborted';
    if (door === 'node:http2') expect(reason).toBe('message_too_large');
    expect(metricValue(m, ERRORS, grpcReason(reason)), env.proc.stderr()).toBe(1);
    expect(env.proc.alive()).toBe(true);
    await expectWarn(env, reason);
    await stopAndCheckGood(env);
  });

  it('a client that vanishes mid-message is counted as stream_aborted', async () => {
    const env = await startEnv();
    const vanish = async (): Promise<void> => {
      const session = http2.connect('http://localhost', { createConnection: () => net.connect(env.sock) });
      session.on('error', () => {});
      await new Promise<void>((resolve, reject) => {
        session.once('connect', () => resolve());
        session.once('error', reject);
      });
      const req = session.request({ ':method': 'POST', ':path': STREAM_TAPS_PATH, 'content-type': 'application/grpc', te: 'trailers' });
      req.on('error', () => {});
      const prefix = Buffer.alloc(5);
      prefix.writeUInt32BE(1000, 1); // promises 1000 bytes …
      req.write(Buffer.concat([prefix, Buffer.alloc(10, 0x0a)])); // … sends 10
      await sleep(150);
      session.destroy();
    };
    await withGoodStream(env, vanish);
    await expectCounted(env, ERRORS, grpcReason('stream_aborted'), 1);
    await expectWarn(env, 'stream_aborted');
    await stopAndCheckGood(env);
  });

  it('speaks gRPC as Envoy expects: v2alpha path, gzip messages, unknown method, wrong content-type, deadline', async () => {
    const env = await startEnv();
    // The frozen v2alpha path, its messages gzip-compressed (grpc-encoding: gzip, flag 1).
    const msgs = encodeRequests([connSeg(21, 40021, true), eventSeg(21, { t: 7, kind: 'read', data: filler(3000), seq: 1 }), eventSeg(21, { t: 7.1, kind: 'closed' })]);
    const gz = Buffer.concat(msgs.map((m) => grpcFrame(zlib.gzipSync(m), true)));
    const v2 = await rawCall(env.sock, { ':path': STREAM_TAPS_PATH_V2, 'grpc-encoding': 'gzip' }, gz);
    expect(v2, 'gzip on v2alpha').toMatchObject({ status: 200, grpcStatus: '0', data: Buffer.alloc(5) });
    // A method that does not exist.
    const nope = await rawCall(env.sock, { ':path': '/envoy.service.tap.v3.TapSinkService/Nope' }, grpcFrame(msgs[0]!, false));
    expect(nope).toMatchObject({ status: 200, grpcStatus: '12' });
    // Not gRPC at all.
    const json = await rawCall(env.sock, { ':path': STREAM_TAPS_PATH, 'content-type': 'application/json' }, Buffer.from('{}'));
    expect(json.status).toBe(415);
    // A deadline the server must enforce on a stream left open (grpc-timeout: 300 ms).
    const late = await rawCall(env.sock, { ':path': STREAM_TAPS_PATH, 'grpc-timeout': '300m' }, grpcFrame(encodeRequests([connSeg(22, 40022, true)])[0]!, false), false);
    expect(late.grpcStatus).toBe('4');
    await expectCounted(env, ERRORS, grpcReason('stream_aborted'), 1);
    await withGoodStream(env, async () => {});
    await stopAndCheckGood(env);
    // The gzip'd stream made its whole connection: handshake, 3000 bytes, teardown.
    const b = await tsharkFields(env.out, ['tcp.len'], { filter: 'tcp.port==40021 && tcp.len > 0' });
    expect(b.map((r) => Number(r[0])).reduce((a, x) => a + x, 0)).toBe(3000);
    const fin = await tsharkFields(env.out, ['frame.number'], { filter: 'tcp.port==40021 && tcp.flags.fin==1' });
    expect(fin.length).toBe(2);
  });

  it('also listens on TCP (127.0.0.1:PORT beside the Unix socket) and logs the peer', async () => {
    const tcp = await freePort();
    const env = await startEnv(['--grpc-listen', `127.0.0.1:${tcp}`]);
    const res = await streamTaps(`127.0.0.1:${tcp}`, GOOD);
    expect(res.code, res.details).toBe(0);
    const started = await env.proc.waitForLog((l) => l.msg === 'tap stream started', 3000);
    expect(String(started.peer)).toMatch(/^(ipv4:)?127\.0\.0\.1:\d+$/);
    await stopAndCheckGood(env);
  });

  it('a seq_num gap is counted as envoy_seq_gap and visible in the capture (comment + lost segment)', async () => {
    const env = await startEnv();
    // Envoy's seq_num: one counter per connection across both directions. The read of 500 bytes
    // at seq 201 never arrives; the next read says 701.
    const msgs = encodeRequests([
      connSeg(13, 40005, true),
      eventSeg(13, { t: 6, kind: 'read', data: filler(100), seq: 1 }),
      eventSeg(13, { t: 6.1, kind: 'write', data: filler(100, 'w'), seq: 101 }),
      eventSeg(13, { t: 6.3, kind: 'read', data: filler(100, 'c'), seq: 701 }),
      eventSeg(13, { t: 6.4, kind: 'write', data: filler(50, 'w'), seq: 801 }),
      eventSeg(13, { t: 6.5, kind: 'closed', seq: 852 }),
    ]);
    const res = await withGoodStream(env, () => streamTaps(env.target, msgs));
    expect(res.code, res.details).toBe(0);
    const m = await expectCounted(env, 'meshcap_dropped_packets_total', { cause: 'envoy_seq_gap' }, 1);
    expect(metricValue(m, 'meshcap_lost_bytes_total')).toBe(500);
    await stopAndCheckGood(env);
    const commented = await tsharkFields(env.out, ['frame.number', 'tcp.seq', 'tcp.len', 'frame.comment'], { filter: 'tcp.port==40005 && frame.comment contains "bytes missing"' });
    expect(commented.length).toBe(1);
    expect(commented[0]![3]).toMatch(/500 bytes missing/);
    // Relative seq: 1 (after SYN) + 100 delivered + 500 missing.
    expect(commented[0]!.slice(1, 3)).toEqual(['601', '100']);
    const lost = await tsharkFields(env.out, ['frame.number'], { filter: 'tcp.port==40005 && tcp.analysis.lost_segment' });
    expect(lost.map((r) => r[0])).toEqual([commented[0]![0]]);
  });
});
