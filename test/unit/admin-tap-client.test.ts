/**
 * The admin /tap door against an emulated Envoy admin endpoint (test/helpers/envoy-tap-emulation.ts):
 * pretty JSON TraceWrappers concatenated with no delimiter over chunked encoding, chunk
 * boundaries inside tokens, Envoy's 400 on a second attach, streams that end, Envoy down/restarted.
 * The real Envoy trace goes through a real Pipeline + FileSink into pcapng, checked with tshark.
 */
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  AdminTapClient,
  backoffDelay,
  buildTapRequest,
  DEFAULT_ADMIN_MAX_BUFFERED_BYTES,
  isLoopbackHost,
  validateAdminUrl,
  type AdminClientState,
} from '../../src/ingest/admin-tap-client.js';
import {
  ALREADY_ATTACHED_TEXT,
  EmulatedEnvoyAdmin,
  envoyJson,
  expectedH2Info,
  fixture,
  fixtureBufferedTrace,
  fixtureStreamedSegments,
  h2Info,
  repoRoot,
  sleep,
  testPipeline,
  waitFor,
  type TestPipeline,
} from '../helpers/envoy-tap-emulation.js';

const CONFIG_ID = 'meshcap_inbound';
const FAST = { initialMs: 20, maxMs: 200 };

let tmp: string;
let envoy: EmulatedEnvoyAdmin;
let tp: TestPipeline;
const clients: AdminTapClient[] = [];

function client(opts: Partial<ConstructorParameters<typeof AdminTapClient>[0]> = {}, onState?: (s: AdminClientState, d: string) => void): AdminTapClient {
  const c = new AdminTapClient({ adminUrl: envoy.url, configId: CONFIG_ID, backoff: FAST, onState, ...opts }, tp.pipeline, tp.log);
  clients.push(c);
  return c;
}

/** A raw POST like `curl -X POST --data-binary @req.json http://127.0.0.1:15000/tap`. */
function rawTap(body: unknown): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string; req: http.ClientRequest; res: http.IncomingMessage }> {
  return new Promise((resolve, reject) => {
    const data = JSON.stringify(body);
    const req = http.request({ host: '127.0.0.1', port: envoy.port, path: '/tap', method: 'POST', agent: false, headers: { 'content-length': Buffer.byteLength(data) } }, (res) => {
      if (res.statusCode === 200) {
        resolve({ status: 200, headers: res.headers, body: '', req, res });
        return;
      }
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts).toString('utf8'), req, res }));
    });
    req.on('error', reject);
    req.end(data);
  });
}

beforeEach(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-admin-'));
  envoy = new EmulatedEnvoyAdmin([CONFIG_ID]);
  await envoy.listen();
  tp = testPipeline(path.join(tmp, 'out.pcapng'));
});

afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.stop()));
  await tp.close();
  await envoy.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Odd chunk sizes so boundaries fall inside keys, base64 strings, escapes and numbers. */
const ODD_CHUNKS = [1, 7, 13, 2, 301, 5, 64, 3, 1021, 11];

describe('admin /tap client against an emulated Envoy admin endpoint', () => {
  it('posts a TapRequest with streaming, a streaming_admin JSON sink, raised body limits and a match', async () => {
    const c = client({ maxBufferedBytes: 2 * 1024 * 1024 });
    c.start();
    await envoy.waitAttached();
    await waitFor(() => c.state === 'attached', 'the 200');
    expect(envoy.requests).toEqual([buildTapRequest(CONFIG_ID, 2 * 1024 * 1024)]);
    expect(envoy.requests[0]).toEqual({
      config_id: CONFIG_ID,
      tap_config: {
        match: { any_match: true },
        output_config: {
          sinks: [{ format: 'JSON_BODY_AS_BYTES', streaming_admin: {} }],
          max_buffered_rx_bytes: 2097152,
          max_buffered_tx_bytes: 2097152,
          streaming: true,
        },
      },
    });
    expect(buildTapRequest('x')).toMatchObject({ tap_config: { output_config: { max_buffered_rx_bytes: DEFAULT_ADMIN_MAX_BUFFERED_BYTES } } });
    expect(c.state).toBe('attached');
    expect(c.nodeId).toBe(`admin:${envoy.url}`);
  });

  it('the emulated endpoint is byte-faithful on the wire: 200, chunked framing, objects cut anywhere, no delimiter', async () => {
    const sock = net.connect(envoy.port, '127.0.0.1');
    const body = JSON.stringify(buildTapRequest(CONFIG_ID));
    sock.write(`POST /tap HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    const raw: Buffer[] = [];
    sock.on('data', (c: Buffer) => raw.push(c));
    await envoy.waitAttached();
    const objs = fixtureStreamedSegments(1).slice(0, 3).map((s) => envoyJson(s, { alwaysPrint: true }));
    await envoy.send(objs.join(''), [100, 37]);
    await waitFor(() => Buffer.concat(raw).length > objs.join('').length, 'the bytes');
    sock.destroy();
    const text = Buffer.concat(raw).toString('latin1');
    const [head, rest] = [text.slice(0, text.indexOf('\r\n\r\n')), text.slice(text.indexOf('\r\n\r\n') + 4)];
    expect(head.split('\r\n')[0]).toBe('HTTP/1.1 200 OK');
    expect(head.toLowerCase()).toContain('transfer-encoding: chunked');
    expect(head.toLowerCase()).not.toContain('content-length');
    // De-chunk: sizes alternate 100 and 37 bytes; the payload is the objects back to back.
    const sizes: number[] = [];
    let payload = '';
    for (let p = 0; p < rest.length; ) {
      const eol = rest.indexOf('\r\n', p);
      const n = parseInt(rest.slice(p, eol), 16);
      sizes.push(n);
      payload += rest.slice(eol + 2, eol + 2 + n);
      p = eol + 2 + n + 2;
    }
    expect(sizes.slice(0, 4)).toEqual([100, 37, 100, 37]);
    expect(payload).toBe(objs.join(''));
    expect(payload).toContain('}{'); // no delimiter between objects
  });

  it('the real Envoy trace (buffered, pretty JSON split mid-token over chunked encoding) becomes the six HTTP/2 frames', async () => {
    const c = client();
    c.start();
    await envoy.waitAttached();
    const text = envoyJson(fixtureBufferedTrace(3), { alwaysPrint: true });
    expect(text).toContain('\n "socket_buffered_trace": {\n  "trace_id": "3",'); // protobuf's one-space indent
    await envoy.send(text, ODD_CHUNKS);
    await waitFor(() => c.counters.traces === 1 && tp.stats.flowsClosed === 1, 'the trace');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(tp.stats.ingestMessages.get('admin')).toBe(1);
    expect(tp.errors()).toEqual({});
  });

  it('streamed segments; a second attach gets 400 "already exists", the client retries, and an ended stream reconnects to the same namespace', async () => {
    // Someone else (an operator's curl) holds Envoy's only /tap stream.
    const curl = await rawTap(buildTapRequest(CONFIG_ID));
    expect(curl.status).toBe(200);
    expect(curl.headers['transfer-encoding']).toBe('chunked');
    const second = await rawTap(buildTapRequest(CONFIG_ID));
    expect(second).toMatchObject({ status: 400, body: ALREADY_ATTACHED_TEXT });

    const states: string[] = [];
    const c = client({}, (s, d) => states.push(`${s}:${d}`));
    c.start();
    await waitFor(() => states.includes('backoff:already_attached'), 'the 400');
    const warn = tp.logs.find((l) => l.reason === 'already_attached');
    expect(warn?.msg).toContain(ALREADY_ATTACHED_TEXT);
    expect(warn?.retry_in_ms).toBeGreaterThan(0);

    // curl goes away (Envoy detaches it); meshcap attaches on a retry.
    curl.req.destroy();
    await waitFor(() => c.state === 'attached', 'attach');
    const first = envoy.attached;
    const segs = fixtureStreamedSegments(42).map((s) => envoyJson(s, { alwaysPrint: true }));
    // Half the segments, then half of the next object, then Envoy ends the stream.
    await envoy.send(segs.slice(0, 4).join(''), ODD_CHUNKS);
    await envoy.send(segs[4]!.slice(0, 200), [50]);
    await waitFor(() => c.counters.traces === 4, 'four segments');
    envoy.endStream();
    await waitFor(() => c.counters.attached === 2 && c.state === 'attached', 'the reconnect');
    expect(envoy.attached).not.toBe(first);
    expect(tp.logs.filter((l) => l.retry_in_ms !== undefined).map((l) => l.reason)).toEqual(['already_attached', 'stream_ended']);
    // The cut object was reported as truncated; Envoy re-sends nothing, the next segments follow.
    expect(tp.errors()).toEqual({ 'admin/malformed_json': 1 });
    await envoy.send(segs.slice(4).join(''), ODD_CHUNKS);
    await waitFor(() => tp.stats.flowsClosed === 1, 'the closed event');
    expect(c.counters.traces).toBe(segs.length);
    expect(c.nodeId).toBe(`admin:${envoy.url}`); // same Envoy process: same trace id namespace
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(tp.stats.flowsOpened).toBe(1);
  });

  it('Envoy down at start: retries with growing delays until it listens, then attaches', async () => {
    const port = envoy.port;
    await envoy.close();
    const delays: number[] = [];
    const c = new AdminTapClient({ adminUrl: `http://127.0.0.1:${port}`, configId: CONFIG_ID, backoff: { initialMs: 20, maxMs: 160 }, random: () => 1 }, tp.pipeline, tp.log);
    clients.push(c);
    c.start();
    await waitFor(() => tp.logs.filter((l) => l.reason === 'connect_failed').length >= 5, 'five failed connects');
    for (const l of tp.logs) if (l.reason === 'connect_failed') delays.push(l.retry_in_ms as number);
    expect(delays.slice(0, 5)).toEqual([20, 40, 80, 160, 160]);
    expect(tp.logs.find((l) => l.reason === 'connect_failed')?.msg).toMatch(/ECONNREFUSED/);
    envoy = new EmulatedEnvoyAdmin([CONFIG_ID]);
    await envoy.listen(port);
    await envoy.waitAttached();
    // Indentation does not matter to the splitter (protobuf prints one space; two spaces here).
    await envoy.send(envoyJson(fixtureBufferedTrace(1), { alwaysPrint: true, indent: 2 }), [4096]);
    await waitFor(() => c.counters.traces === 1, 'the trace');
  });

  it('unknown config id (tap not loaded yet) and a missing /tap endpoint are retried with a hint', async () => {
    const c = client({ configId: 'not_loaded_yet' });
    c.start();
    await waitFor(() => tp.logs.some((l) => l.reason === 'http_400'), 'the 400');
    expect(tp.logs.find((l) => l.reason === 'http_400')!.msg).toContain("Unknown config id 'not_loaded_yet'");
    envoy.configIds.add('not_loaded_yet'); // Istio pushed the EnvoyFilter
    await envoy.waitAttached();
    await waitFor(() => c.state === 'attached', 'attach');
  });

  it('an Envoy restart (uptime went back) moves traces to a new node namespace; trace ids may repeat', async () => {
    const c = client();
    c.start();
    await envoy.waitAttached();
    const segs = fixtureStreamedSegments(1).map((s) => envoyJson(s, { alwaysPrint: true }));
    await envoy.send(segs.slice(0, 3).join(''));
    await waitFor(() => c.counters.traces === 3, 'segments');
    const before = c.nodeId;
    envoy.restart();
    envoy.endStream();
    await waitFor(() => c.nodeId !== before && c.state === 'attached', 'the new namespace');
    expect(c.nodeId).toBe(`admin:${envoy.url}#1`);
    // The new Envoy process numbers connections from 1 again: a separate flow, not a clash.
    await envoy.send(segs.join(''));
    await waitFor(() => tp.stats.flowsClosed === 1, 'the second connection');
    expect(tp.stats.flowsOpened).toBe(2);
    expect(tp.logs.some((l) => /Envoy restarted/.test(l.msg))).toBe(true);
  });

  it('bad input: truncated JSON, non-JSON garbage, an object over the cap, JSON that is not a TraceWrapper: counted, logged, the door keeps working', async () => {
    const c = client({ maxObjectBytes: 64 * 1024 });
    c.start();
    await envoy.waitAttached();
    const good = envoyJson(fixtureBufferedTrace(9), { alwaysPrint: true });
    const huge = `{\n "socket_buffered_trace": {\n  "trace_id": "5",\n  "events": [ { "read": { "data": { "as_bytes": "${'A'.repeat(100_000)}" } } } ]\n }\n}`;
    await envoy.send('this is not JSON at all\n', [5]);
    await envoy.send(huge, [8192]);
    await envoy.send('{\n "hello": "world",\n "n": [1, 2, {"x": "}"}]\n}', [3]); // valid JSON, not a trace
    await envoy.send('{\n "socket_buffered_trace": {\n  "trace_id": 12,,\n }\n}', [9]); // broken JSON
    await envoy.send(good, ODD_CHUNKS);
    await waitFor(() => c.counters.traces === 1, 'the good trace after the bad ones');
    // A stream that ends inside an object: truncated, reported, and the client reconnects.
    await envoy.send(good.slice(0, good.length / 2), [777]);
    await sleep(20);
    envoy.endStream();
    await waitFor(() => c.counters.attached === 2 && c.state === 'attached', 'the reconnect');
    await envoy.send(envoyJson(fixtureBufferedTrace(10), { alwaysPrint: true }), ODD_CHUNKS);
    await waitFor(() => c.counters.traces === 2, 'the trace after the truncated one');
    expect(tp.errors()).toEqual({
      'admin/malformed_json': 3, // garbage, broken JSON, truncated at stream end
      'admin/message_too_large': 1,
      'admin/empty_trace': 1, // {"hello": ...} holds no trace
    });
    const warned = tp.logs.filter((l) => l.level === 40 && l.source === 'admin').map((l) => l.msg);
    expect(warned.some((m) => /outside a JSON object/.test(m))).toBe(true);
    expect(warned.some((m) => /exceeds 65536 bytes/.test(m))).toBe(true);
    expect(warned.some((m) => /stream ended inside a JSON object/.test(m))).toBe(true);
    expect(warned.some((m) => /holds no trace/.test(m))).toBe(true);
    await tp.close();
    // Both good traces are complete connections with all six frames.
    expect(await h2Info(tp.out)).toEqual([...expectedH2Info(), ...expectedH2Info()]);
  });

  it('stop() detaches (Envoy sees the connection close) and no reconnect follows', async () => {
    const c = client();
    c.start();
    const a = await envoy.waitAttached();
    await c.stop();
    await waitFor(() => a.closed, 'the detach');
    expect(c.state).toBe('stopped');
    await sleep(100);
    expect(envoy.requests.length).toBe(1);
    expect(envoy.attached).toBeNull();
  });

  it('stop() while Envoy is unreachable cancels the pending retry', async () => {
    await envoy.close();
    const c = client();
    c.start();
    await waitFor(() => c.state === 'backoff', 'a failed attempt');
    await c.stop();
    const n = c.counters.attempts;
    await sleep(300);
    expect(c.counters.attempts).toBe(n);
  });
});

describe('admin URL and backoff rules', () => {
  it('accepts only loopback http URLs', () => {
    for (const ok of ['http://127.0.0.1:15000', 'http://localhost:15000', 'http://[::1]:15000', 'http://127.1.2.3:9901/']) {
      expect(() => validateAdminUrl(ok)).not.toThrow();
    }
    expect(() => validateAdminUrl('http://10.0.0.5:15000')).toThrow(/refusing.*unauthenticated.*loopback/);
    expect(() => validateAdminUrl('http://envoy.default.svc:15000')).toThrow(/refusing/);
    expect(() => validateAdminUrl('http://[::ffff:10.0.0.1]:15000')).toThrow(/refusing/);
    expect(() => validateAdminUrl('https://127.0.0.1:15000')).toThrow(/only http/);
    expect(() => validateAdminUrl('127.0.0.1:15000')).toThrow(/only http|not a URL/);
    expect(() => validateAdminUrl('http://user:pw@127.0.0.1:15000')).toThrow(/credentials/);
    expect(isLoopbackHost('::ffff:127.0.0.1')).toBe(true);
    expect(isLoopbackHost('0.0.0.0')).toBe(false);
    expect(() => new AdminTapClient({ adminUrl: 'http://192.168.1.1:15000', configId: 'x' }, tp.pipeline, tp.log)).toThrow(/refusing/);
  });

  it('backoff doubles from 250 ms, is capped at 30 s, and jitters within [d/2, d]', () => {
    const opts = { initialMs: 250, maxMs: 30_000 };
    expect([0, 1, 2, 3, 10, 50].map((n) => backoffDelay(n, opts, () => 1))).toEqual([250, 500, 1000, 2000, 30_000, 30_000]);
    expect(backoffDelay(0, opts, () => 0)).toBe(125);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(i % 12, opts);
      const full = Math.min(30_000, 250 * 2 ** (i % 12));
      expect(d).toBeGreaterThanOrEqual(full / 2);
      expect(d).toBeLessThanOrEqual(full);
    }
  });
});

const BIN = path.join(repoRoot, 'bin', 'meshcap.js');
const BUILT = fs.existsSync(path.join(repoRoot, 'dist', 'src', 'cli', 'main.js'));

describe.skipIf(!BUILT)('meshcap serve with the stock-Envoy doors (built CLI)', () => {
  it('--envoy-admin/--tap-config-id, --udp-listen and --watch feed one capture; SIGTERM detaches and exits 0', async () => {
    const { spawn } = await import('node:child_process');
    const dgram = await import('node:dgram');
    const watchDir = path.join(tmp, 'taps');
    fs.mkdirSync(watchDir);
    const out = path.join(tmp, 'cli.pcapng');
    const udpPort = await new Promise<number>((resolve) => {
      const probe = dgram.createSocket('udp4');
      probe.bind(0, '127.0.0.1', () => {
        const p = probe.address().port;
        probe.close(() => resolve(p));
      });
    });
    const child = spawn(process.execPath, [BIN, 'serve', '--grpc-listen', `unix:${path.join(tmp, 'g.sock')}`, '--metrics-listen', 'off', '-w', out,
      '--envoy-admin', envoy.url, '--tap-config-id', CONFIG_ID, '--admin-max-buffered-bytes', '65536', '--udp-listen', `127.0.0.1:${udpPort}`, '--watch', watchDir], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const a = await envoy.waitAttached(15_000);
      expect(envoy.requests[0]).toEqual(buildTapRequest(CONFIG_ID, 65536));
      await waitFor(() => /meshcap serving/.test(stderr), 'the startup log');
      const started = stderr.split('\n').find((l) => l.includes('meshcap serving'))!;
      expect(started).toContain(`udp:127.0.0.1:${udpPort}`);
      expect(started).toContain(`attaching to Envoy admin ${envoy.url} (config_id ${CONFIG_ID})`);
      expect(started).toContain(`watching ${watchDir}`);
      await envoy.send(envoyJson(fixtureBufferedTrace(1), { alwaysPrint: true }), ODD_CHUNKS);
      const s = dgram.createSocket('udp4');
      await new Promise<void>((resolve) => s.send(fixture('tap2pcap_h2_ipv4.v3.pb'), udpPort, '127.0.0.1', () => resolve()));
      s.close();
      fs.writeFileSync(path.join(watchDir, 'tap_1.json'), envoyJson(fixtureBufferedTrace(1), { alwaysPrint: true }));
      await waitFor(() => (stderr.match(/first tap datagram/g) ?? []).length === 1, 'the datagram');
      await sleep(1500); // the watcher's first rescan and the pipeline's flush
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
      await waitFor(() => a.closed, 'the detach');
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
    expect(await h2Info(out)).toEqual([...expectedH2Info(), ...expectedH2Info(), ...expectedH2Info()]);
  });
});
