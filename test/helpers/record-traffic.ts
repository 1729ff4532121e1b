/**
 * Records REAL traffic on loopback with tcpdump: real servers and clients (node:http, node:http2,
 * @grpc/grpc-js) run in this process while `tcpdump -i lo` captures their TCP connections.
 *
 * Every scenario returns the capture path and the server port(s). Server ports are picked from a
 * base in 27100..29400 (no Wireshark port registrations there, and below the Linux ephemeral range
 * so the server port is always the lower one and wins Wireshark's port-based dissector choice);
 * if a port is taken the next one is tried, so concurrent test files only need different bases.
 *
 * Requires root (or CAP_NET_RAW) for tcpdump: see `canCapture()`.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import type net from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { seededRandom } from './recast.js';

export interface TcpdumpStats {
  captured: number;
  receivedByFilter: number;
  droppedByKernel: number;
  stderr: string;
}

export interface Recording {
  scenario: string;
  /** The classic pcap (nanosecond magic, LINKTYPE_ETHERNET on Linux lo). */
  pcap: string;
  /** Server ports of this recording (the side Envoy would sit on). */
  serverPorts: number[];
  /** Server address ('127.0.0.1' or '::1'). */
  serverAddr: string;
  /** What tshark needs to dissect the application protocol on these ports. */
  decodeAs: string[];
  /** Number of TCP connections the scenario opened. */
  connections: number;
  tcpdump: TcpdumpStats;
}

export interface ScenarioOptions {
  /** Preferred server port (the next free one is used if taken). */
  port?: number;
  /** PRNG seed for bodies and sizes. */
  seed?: number;
}

/** True when tcpdump and tshark exist and we may capture on lo. */
export function canCapture(): boolean {
  if (process.platform !== 'linux') return false;
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return false;
  for (const bin of ['tcpdump', 'tshark']) {
    const r = spawnSync(bin, ['--version'], { stdio: 'ignore' });
    if (r.error || r.status !== 0) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// tcpdump

export interface CaptureOptions {
  iface?: string;
  /** Max time to wait for tcpdump's "listening on" (ms). */
  startTimeoutMs?: number;
  /** Delay between the end of the traffic and SIGINT (ms), so the last ACKs are captured. */
  settleMs?: number;
  /** Kernel buffer for tcpdump in KiB (-B). */
  bufferKiB?: number;
}

/**
 * Runs `tcpdump -i lo -w file -U -s 0 --immediate-mode 'tcp port P1 or …'` around `traffic()`.
 * `--immediate-mode` matters: with TPACKET_V3 ring buffering, packets still sitting in a
 * not-yet-retired ring block are lost when tcpdump gets SIGINT ("0 packets captured").
 */
export async function captureTcp(
  file: string,
  ports: number[],
  traffic: () => Promise<void>,
  opts: CaptureOptions = {},
): Promise<TcpdumpStats> {
  const filter = ports.map((p) => `tcp port ${p}`).join(' or ');
  const args = [
    '-i', opts.iface ?? 'lo',
    '-w', file,
    '-U', '-s', '0', '-n',
    '--immediate-mode',
    '--time-stamp-precision=nano',
    '-B', String(opts.bufferKiB ?? 32768),
    filter,
  ];
  const td = spawn('tcpdump', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  let exited = false;
  const exitP = new Promise<number | null>((resolve) => {
    td.on('exit', (code) => {
      exited = true;
      resolve(code);
    });
    td.on('error', () => {
      exited = true;
      resolve(-1);
    });
  });
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`tcpdump did not start: ${stderr}`)), opts.startTimeoutMs ?? 10_000);
      td.stderr!.setEncoding('utf8');
      td.stderr!.on('data', (d: string) => {
        stderr += d;
        if (stderr.includes('listening on')) {
          clearTimeout(timer);
          resolve();
        }
      });
      void exitP.then(() => {
        clearTimeout(timer);
        reject(new Error(`tcpdump exited early: ${stderr}`));
      });
    });
    await traffic();
    await sleep(opts.settleMs ?? 300);
  } finally {
    await stopProcess(td, exitP, () => exited);
  }
  const num = (re: RegExp) => Number(re.exec(stderr)?.[1] ?? NaN);
  return {
    captured: num(/(\d+) packets? captured/),
    receivedByFilter: num(/(\d+) packets? received by filter/),
    droppedByKernel: num(/(\d+) packets? dropped by kernel/),
    stderr,
  };
}

async function stopProcess(p: ChildProcess, exitP: Promise<unknown>, isExited: () => boolean): Promise<void> {
  if (isExited()) return;
  p.kill('SIGINT');
  const t = await Promise.race([exitP.then(() => 'exited'), sleep(5000).then(() => 'timeout')]);
  if (t === 'timeout' && !isExited()) {
    p.kill('SIGKILL');
    await exitP;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// Shared bits

export function seededBytes(len: number, seed: number): Buffer {
  const rnd = seededRandom(seed);
  const b = Buffer.allocUnsafe(len);
  let i = 0;
  for (; i + 4 <= len; i += 4) b.writeUInt32LE((rnd() * 0x1_0000_0000) >>> 0, i);
  for (; i < len; i++) b[i] = (rnd() * 256) | 0;
  return b;
}

/** Log-uniform integer in [min, max] (many small values, some large ones). */
export function logUniform(rnd: () => number, min: number, max: number): number {
  const lo = Math.log(min + 1);
  const hi = Math.log(max + 1);
  return Math.min(max, Math.max(min, Math.floor(Math.exp(lo + rnd() * (hi - lo))) - 1));
}

function readAll(s: NodeJS.ReadableStream): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    s.on('data', (d: Buffer) => parts.push(d));
    s.on('end', () => resolve(Buffer.concat(parts)));
    s.on('error', reject);
  });
}

/** Listens on the first free port from `preferred` on (up to 200 tries). */
async function listenFrom(server: net.Server | http.Server | http2.Http2Server, host: string, preferred: number): Promise<number> {
  for (let port = preferred; port < preferred + 200; port++) {
    const ok = await new Promise<boolean>((resolve, reject) => {
      const onErr = (e: NodeJS.ErrnoException) => {
        server.off('listening', onOk);
        if (e.code === 'EADDRINUSE') resolve(false);
        else reject(e);
      };
      const onOk = () => {
        server.off('error', onErr);
        resolve(true);
      };
      server.once('error', onErr);
      server.once('listening', onOk);
      server.listen({ port, host, exclusive: true });
    });
    if (ok) return port;
  }
  throw new Error(`no free port from ${preferred}`);
}

/** Tracks a server's sockets so the scenario can wait until every connection is fully closed. */
function trackSockets(server: net.Server | http.Server | http2.Http2Server) {
  const open = new Set<net.Socket>();
  let count = 0;
  server.on('connection', (s: net.Socket) => {
    count++;
    open.add(s);
    s.on('close', () => open.delete(s));
  });
  return {
    get count() {
      return count;
    },
    async waitClosed(timeoutMs = 5000): Promise<void> {
      const end = Date.now() + timeoutMs;
      while (open.size > 0 && Date.now() < end) await sleep(10);
      for (const s of open) s.destroy();
    },
  };
}

function closeServer(server: { close(cb?: (err?: Error) => void): unknown }): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

interface HttpResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

function httpRequest(options: http.RequestOptions, body?: Buffer | Buffer[]): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = http.request(options, (res) => {
      readAll(res).then((b) => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: b }), reject);
    });
    req.on('error', reject);
    if (Array.isArray(body)) {
      for (const part of body) req.write(part);
      req.end();
    } else {
      req.end(body);
    }
  });
}

function expect(cond: boolean, what: string): void {
  if (!cond) throw new Error(`scenario check failed: ${what}`);
}

function sha256(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

// ---------------------------------------------------------------------------------------------
// (a) HTTP/1.1, large bodies, keep-alive

export async function recordHttp1Large(dir: string, opts: ScenarioOptions = {}): Promise<Recording> {
  const seed = opts.seed ?? 101;
  const big = seededBytes(3 * 1024 * 1024, seed);
  const upload = seededBytes(1024 * 1024, seed + 1);
  const server = http.createServer({ keepAliveTimeout: 10_000 }, (req, res) => {
    void readAll(req).then((body) => {
      const url = req.url ?? '/';
      if (url === '/upload') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ len: body.length, sha256: sha256(body) }));
      } else if (url === '/big') {
        res.setHeader('content-type', 'application/octet-stream');
        res.setHeader('content-length', big.length);
        res.end(big);
      } else if (url === '/chunked') {
        res.setHeader('content-type', 'text/plain');
        res.write('x'.repeat(3000));
        res.write('y'.repeat(70));
        res.end('z'.repeat(20_000));
      } else if (url === '/not-found') {
        res.statusCode = 404;
        res.end('nope');
      } else {
        res.setHeader('content-type', 'text/plain');
        res.end(`hello ${url} ${body.length}`);
      }
    });
  });
  const track = trackSockets(server);
  const port = await listenFrom(server, '127.0.0.1', opts.port ?? 27100);
  const pcap = path.join(dir, 'http1-large.pcap');
  try {
    const tcpdump = await captureTcp(pcap, [port], async () => {
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const base = { host: '127.0.0.1', port, agent };
      try {
        const r1 = await httpRequest({ ...base, path: '/small/1' });
        expect(r1.status === 200, 'GET /small/1');
        const r2 = await httpRequest({ ...base, method: 'POST', path: '/upload', headers: { 'content-type': 'application/octet-stream', 'content-length': upload.length } }, upload);
        expect(JSON.parse(r2.body.toString()).sha256 === sha256(upload), 'POST /upload');
        const r3 = await httpRequest({ ...base, path: '/big' });
        expect(r3.body.equals(big), 'GET /big');
        const r4 = await httpRequest({ ...base, method: 'POST', path: '/echo' }, [Buffer.from('chunk-1;'), Buffer.from('chunk-2;'), Buffer.from('c3')]);
        expect(r4.status === 200, 'POST /echo (chunked)');
        const r5 = await httpRequest({ ...base, path: '/chunked' });
        expect(r5.body.length === 23_070, 'GET /chunked');
        const r6 = await httpRequest({ ...base, path: '/not-found' });
        expect(r6.status === 404, 'GET /not-found');
        const r7 = await httpRequest({ ...base, method: 'PUT', path: '/small/2', headers: { 'content-length': 5 } }, Buffer.from('hello'));
        expect(r7.status === 200, 'PUT /small/2');
      } finally {
        agent.destroy();
      }
      await track.waitClosed();
    });
    return { scenario: 'http1-large', pcap, serverPorts: [port], serverAddr: '127.0.0.1', decodeAs: [`tcp.port==${port},http`], connections: track.count, tcpdump };
  } finally {
    server.closeAllConnections();
    await closeServer(server);
  }
}

// ---------------------------------------------------------------------------------------------
// (b) HTTP/2 cleartext, prior knowledge

export async function recordH2c(dir: string, opts: ScenarioOptions = {}): Promise<Recording> {
  const seed = opts.seed ?? 202;
  const big = seededBytes(200 * 1024, seed);
  const upload = seededBytes(50 * 1024, seed + 1);
  const server = http2.createServer();
  server.on('stream', (stream, headers) => {
    void readAll(stream).then((body) => {
      const p = String(headers[':path']);
      if (p === '/big') {
        stream.respond({ ':status': 200, 'content-type': 'application/octet-stream', 'content-length': big.length });
        stream.end(big);
      } else if (p === '/upload') {
        stream.respond({ ':status': 201, 'content-type': 'application/json' });
        stream.end(JSON.stringify({ len: body.length, sha256: sha256(body) }));
      } else {
        stream.respond({ ':status': 200, 'content-type': 'text/plain', 'x-path': p });
        stream.end(`h2 hello ${p}`);
      }
    });
  });
  const track = trackSockets(server);
  const port = await listenFrom(server, '127.0.0.1', opts.port ?? 27110);
  const pcap = path.join(dir, 'h2c.pcap');
  try {
    const tcpdump = await captureTcp(pcap, [port], async () => {
      const session = http2.connect(`http://127.0.0.1:${port}`);
      const req = (h: http2.OutgoingHttpHeaders, body?: Buffer) =>
        new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
          const s = session.request(h, { endStream: !body });
          let status = 0;
          s.on('response', (rh) => (status = Number(rh[':status'])));
          s.on('error', reject);
          if (body) s.end(body);
          readAll(s).then((b) => resolve({ status, body: b }), reject);
        });
      try {
        const first = await req({ ':path': '/first' });
        expect(first.status === 200, 'h2 /first');
        const results = await withTimeout(
          Promise.all([
            req({ ':path': '/big' }),
            req({ ':path': '/a', 'x-custom': 'one' }),
            req({ ':method': 'POST', ':path': '/upload', 'content-type': 'application/octet-stream' }, upload),
            req({ ':path': '/b' }),
            req({ ':path': '/c', 'accept': 'text/plain' }),
          ]),
          10_000,
          'h2c requests',
        );
        expect(results[0].body.equals(big), 'h2 /big');
        expect(JSON.parse(results[2].body.toString()).sha256 === sha256(upload), 'h2 /upload');
        await req({ ':path': '/last' });
      } finally {
        await new Promise<void>((resolve) => session.close(() => resolve()));
      }
      await track.waitClosed();
    });
    return { scenario: 'h2c', pcap, serverPorts: [port], serverAddr: '127.0.0.1', decodeAs: [`tcp.port==${port},http2`], connections: track.count, tcpdump };
  } finally {
    await closeServer(server);
  }
}

// ---------------------------------------------------------------------------------------------
// (c) gRPC (grpc-js server and client, raw Buffer messages: no .proto needed)

const identity = (b: Buffer) => b;
const ECHO_SERVICE: grpc.ServiceDefinition = {
  Unary: {
    path: '/meshcap.test.Echo/Unary',
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
  Collect: {
    path: '/meshcap.test.Echo/Collect',
    requestStream: true,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
};

/**
 * gRPC messages are wrapped as a protobuf `message { bytes data = 1; }` so that Wireshark's
 * schema-less protobuf dissection of the payload succeeds: random bytes as a gRPC message make
 * it report "Malformed Packet" and, depending on TCP segmentation, lose the gRPC stream context
 * afterwards (packet-grpc.c assertion), so the dissection would not be comparable.
 */
export function pbWrap(b: Buffer): Buffer {
  const v: number[] = [];
  let n = b.length;
  do {
    v.push((n & 0x7f) | (n > 0x7f ? 0x80 : 0));
    n >>>= 7;
  } while (n > 0);
  return Buffer.concat([Buffer.from([0x0a, ...v]), b]);
}

export function pbUnwrap(m: Buffer): Buffer {
  if (m.length === 0) return m;
  if (m[0] !== 0x0a) throw new Error('pbUnwrap: not field 1 / length-delimited');
  let n = 0;
  let shift = 0;
  let i = 1;
  for (;;) {
    const c = m[i++]!;
    n += (c & 0x7f) * 2 ** shift;
    shift += 7;
    if (!(c & 0x80)) break;
  }
  return m.subarray(i, i + n);
}

export async function recordGrpc(dir: string, opts: ScenarioOptions = {}): Promise<Recording> {
  const seed = opts.seed ?? 303;
  const rnd = seededRandom(seed);
  const server = new grpc.Server();
  server.addService(ECHO_SERVICE, {
    Unary: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      const req = pbUnwrap(call.request);
      cb(null, pbWrap(Buffer.concat([Buffer.from('echo:'), req.subarray(0, 64), Buffer.from(`:${req.length}`)])));
    },
    Collect: (call: grpc.ServerReadableStream<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      let n = 0;
      let total = 0;
      call.on('data', (d: Buffer) => {
        n++;
        total += pbUnwrap(d).length;
      });
      call.on('end', () => cb(null, pbWrap(Buffer.from(`messages=${n} bytes=${total}`))));
    },
  });
  let port = 0;
  for (let p = opts.port ?? 27120; p < (opts.port ?? 27120) + 200 && !port; p++) {
    port = await new Promise<number>((resolve) =>
      server.bindAsync(`127.0.0.1:${p}`, grpc.ServerCredentials.createInsecure(), (err, bound) => resolve(err ? 0 : bound)),
    );
  }
  if (!port) throw new Error('grpc: no free port');
  const pcap = path.join(dir, 'grpc.pcap');
  let connections = 0;
  try {
    const tcpdump = await captureTcp(pcap, [port], async () => {
      const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
      try {
        const unary = (req: Buffer) =>
          new Promise<Buffer>((resolve, reject) =>
            client.makeUnaryRequest('/meshcap.test.Echo/Unary', identity, identity, pbWrap(req), (err, res) => (err ? reject(err) : resolve(pbUnwrap(res!)))),
          );
        const u1 = await withTimeout(unary(Buffer.from('ping')), 10_000, 'grpc unary');
        expect(u1.toString() === 'echo:ping:4', 'grpc unary 1');
        const bigReq = seededBytes(100 * 1024, seed + 1);
        const u2 = await withTimeout(unary(bigReq), 10_000, 'grpc unary 2');
        expect(u2.toString('latin1').endsWith(`:${bigReq.length}`), 'grpc unary 2');
        const sizes = Array.from({ length: 8 }, () => logUniform(rnd, 1, 40_000));
        const res = await withTimeout(
          new Promise<Buffer>((resolve, reject) => {
            const call = client.makeClientStreamRequest('/meshcap.test.Echo/Collect', identity, identity, (err, r) => (err ? reject(err) : resolve(pbUnwrap(r!))));
            sizes.forEach((s, i) => call.write(pbWrap(seededBytes(s, seed + 10 + i))));
            call.end();
          }),
          10_000,
          'grpc client stream',
        );
        expect(res.toString() === `messages=${sizes.length} bytes=${sizes.reduce((a, b) => a + b, 0)}`, 'grpc client stream');
        const u3 = await withTimeout(unary(Buffer.alloc(0)), 10_000, 'grpc unary 3');
        expect(u3.toString() === 'echo::0', 'grpc unary 3');
      } finally {
        client.close();
      }
      connections = 1;
      await withTimeout(new Promise<void>((resolve) => server.tryShutdown(() => resolve())), 5000, 'grpc server shutdown').catch(() => server.forceShutdown());
    });
    return { scenario: 'grpc', pcap, serverPorts: [port], serverAddr: '127.0.0.1', decodeAs: [`tcp.port==${port},http2`], connections, tcpdump };
  } finally {
    server.forceShutdown();
  }
}

// ---------------------------------------------------------------------------------------------
// (d) HTTP/1.1 over IPv6 ([::1])

export async function recordIpv6(dir: string, opts: ScenarioOptions = {}): Promise<Recording> {
  const seed = opts.seed ?? 404;
  const resp = seededBytes(500 * 1024, seed);
  const upload = seededBytes(200 * 1024, seed + 1);
  const server = http.createServer((req, res) => {
    void readAll(req).then((body) => {
      if (req.url === '/big') {
        res.setHeader('content-length', resp.length);
        res.end(resp);
      } else {
        res.setHeader('content-type', 'text/plain');
        res.end(`v6 ${req.method} ${req.url} ${body.length} ${sha256(body)}`);
      }
    });
  });
  const track = trackSockets(server);
  const port = await listenFrom(server, '::1', opts.port ?? 27130);
  const pcap = path.join(dir, 'ipv6.pcap');
  try {
    const tcpdump = await captureTcp(pcap, [port], async () => {
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      try {
        const base = { host: '::1', port, agent };
        expect((await httpRequest({ ...base, path: '/hello' })).status === 200, 'v6 GET /hello');
        const up = await httpRequest({ ...base, method: 'POST', path: '/upload', headers: { 'content-length': upload.length } }, upload);
        expect(up.body.toString().endsWith(sha256(upload)), 'v6 POST /upload');
        expect((await httpRequest({ ...base, path: '/big' })).body.equals(resp), 'v6 GET /big');
      } finally {
        agent.destroy();
      }
      // A second connection closed by the server (Connection: close).
      const r = await httpRequest({ host: '::1', port, agent: false, path: '/close', headers: { connection: 'close' } });
      expect(r.status === 200, 'v6 GET /close');
      await track.waitClosed();
    });
    return { scenario: 'ipv6', pcap, serverPorts: [port], serverAddr: '::1', decodeAs: [`tcp.port==${port},http`], connections: track.count, tcpdump };
  } finally {
    server.closeAllConnections();
    await closeServer(server);
  }
}

// ---------------------------------------------------------------------------------------------
// (e) many concurrent HTTP/1.1 connections with random-size bodies

export async function recordManyConnections(dir: string, opts: ScenarioOptions & { count?: number } = {}): Promise<Recording> {
  const seed = opts.seed ?? 505;
  const count = opts.count ?? 50;
  const rnd = seededRandom(seed);
  const server = http.createServer((req, res) => {
    void readAll(req).then((body) => {
      const size = Number(req.headers['x-response-size'] ?? 0);
      res.setHeader('content-type', 'application/octet-stream');
      res.setHeader('x-request-sha256', sha256(body));
      res.setHeader('content-length', size);
      res.end(seededBytes(size, size + 7));
    });
  });
  const track = trackSockets(server);
  const port = await listenFrom(server, '127.0.0.1', opts.port ?? 27140);
  const pcap = path.join(dir, 'many.pcap');
  const plan = Array.from({ length: count }, (_, i) => ({
    i,
    method: rnd() < 0.6 ? 'POST' : 'GET',
    reqSize: logUniform(rnd, 0, 128 * 1024),
    respSize: logUniform(rnd, 0, 128 * 1024),
  }));
  try {
    const tcpdump = await captureTcp(pcap, [port], async () => {
      await withTimeout(
        Promise.all(
          plan.map(async (p) => {
            const body = p.method === 'POST' ? seededBytes(p.reqSize, seed * 1000 + p.i) : undefined;
            const headers: http.OutgoingHttpHeaders = { 'x-response-size': String(p.respSize), 'x-conn': String(p.i) };
            if (body) headers['content-length'] = body.length;
            // agent:false -> a fresh connection per request, "Connection: close": the server closes.
            const r = await httpRequest({ host: '127.0.0.1', port, agent: false, method: p.method, path: `/conn/${p.i}`, headers }, body);
            expect(r.body.length === p.respSize, `many: response ${p.i}`);
            if (body) expect(r.headers['x-request-sha256'] === sha256(body), `many: request ${p.i}`);
          }),
        ),
        20_000,
        'many connections',
      );
      await track.waitClosed();
    });
    return { scenario: 'many', pcap, serverPorts: [port], serverAddr: '127.0.0.1', decodeAs: [`tcp.port==${port},http`], connections: track.count, tcpdump };
  } finally {
    server.closeAllConnections();
    await closeServer(server);
  }
}

export type ScenarioName = 'http1-large' | 'h2c' | 'grpc' | 'ipv6' | 'many';

export const SCENARIOS: Record<ScenarioName, (dir: string, opts?: ScenarioOptions) => Promise<Recording>> = {
  'http1-large': recordHttp1Large,
  h2c: recordH2c,
  grpc: recordGrpc,
  ipv6: recordIpv6,
  many: recordManyConnections,
};

/** Port offsets per scenario from a base, so callers can give each test file its own range. */
export const SCENARIO_PORT_OFFSETS: Record<ScenarioName, number> = { 'http1-large': 0, h2c: 10, grpc: 20, ipv6: 30, many: 40 };

/**
 * Records one scenario with ports from `basePort` + its offset. The recording is the reference the
 * tests compare meshcap's captures with, so it must be whole: when tcpdump reports packets dropped by
 * the kernel (its buffer overran on a busy machine), the scenario is recorded again, up to 3 times.
 * Callers still check `tcpdump.droppedByKernel`.
 */
export async function recordScenario(name: ScenarioName, dir: string, basePort: number, seed?: number): Promise<Recording> {
  fs.mkdirSync(dir, { recursive: true });
  for (let attempt = 1; ; attempt++) {
    const rec = await SCENARIOS[name](dir, { port: basePort + SCENARIO_PORT_OFFSETS[name], seed });
    if (rec.tcpdump.droppedByKernel === 0 || attempt === 3) return rec;
  }
}
