/**
 * Runs the real `meshcap` CLI (bin/meshcap.js → dist/) as a child process for end-to-end tests:
 * start `meshcap serve`, wait until it is ready, collect its JSON log lines (stderr), stop it with
 * a signal and report how it exited and how long that took; scrape its Prometheus /metrics.
 *
 * Every process started here is remembered; call `killAll()` in afterEach so a failing test never
 * leaves a server behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const MESHCAP_BIN = process.env.MESHCAP_E2E_BIN ?? path.join(REPO_ROOT, 'bin/meshcap.js');
export const FIXTURES = path.resolve(REPO_ROOT, '..', 'shared', 'fixtures');
export const ENVOY_FIXTURES = path.join(FIXTURES, 'envoy');
/** True when the CLI can run (dist/ built, or another implementation named by MESHCAP_E2E_BIN). */
export const CLI_BUILT = !!process.env.MESHCAP_E2E_BIN || fs.existsSync(path.join(REPO_ROOT, 'dist/src/cli/main.js'));

/** One pino log line (anything else written to stderr is kept in `stderr` only). */
export interface LogLine {
  level: number;
  msg: string;
  reason?: string;
  [k: string]: unknown;
}

export const LOG_LEVEL = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 } as const;

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface StopResult extends ExitInfo {
  /** Milliseconds from sending the signal to the process having exited. */
  elapsedMs: number;
}

export interface StartOptions {
  /** Arguments after `serve`. */
  args: string[];
  cwd?: string;
  /** Extra environment (merged over process.env minus MESHCAP_*). */
  env?: Record<string, string>;
  /** Keep stdout as Buffers in `stdout` (for `-w -`); otherwise it is drained and discarded. */
  captureStdout?: boolean;
  /** Unix socket path to wait for (in addition to the 'meshcap serving' log line). */
  socket?: string;
  /**
   * RLIMIT_FSIZE in bytes (util-linux `prlimit`): writes past it fail with EFBIG, as writes to a
   * full disk fail with ENOSPC — the same error path, without a filesystem to fill.
   */
  fileSizeLimit?: number;
  readyTimeoutMs?: number;
}

export interface ServeProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Parsed JSON log lines so far. */
  readonly logs: LogLine[];
  /** All of stderr so far, as text. */
  stderr(): string;
  /** All of stdout so far (captureStdout only). */
  stdout(): Buffer;
  readonly exited: Promise<ExitInfo>;
  alive(): boolean;
  /** Sends `signal` and waits for exit (SIGKILL after timeoutMs, reported as such). */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<StopResult>;
  /** Resolves with the first log line (already seen or future) matching `pred`. */
  waitForLog(pred: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  /** Log lines at warn or above whose `reason` is `reason`. */
  warnings(reason?: string): LogLine[];
}

const running = new Set<ChildProcess>();

/** SIGKILLs every process this module started that is still running (afterEach). */
export async function killAll(): Promise<void> {
  const waits: Promise<unknown>[] = [];
  for (const c of running) {
    if (c.exitCode === null && c.signalCode === null) {
      waits.push(new Promise((r) => c.once('exit', r)));
      c.kill('SIGKILL');
    }
  }
  running.clear();
  await Promise.all(waits);
}

/** Environment for the child: the test runner's, without any MESHCAP_* that would change config. */
function childEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('MESHCAP_') && k !== 'NODE_OPTIONS') env[k] = v;
  return { ...env, ...extra };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Spawns `meshcap serve ARGS` and resolves once it logged 'meshcap serving' (and its socket exists). */
export async function startServe(opts: StartOptions): Promise<ServeProcess> {
  const argv = [process.execPath, MESHCAP_BIN, 'serve', ...opts.args];
  if (opts.fileSizeLimit !== undefined) argv.unshift('prlimit', `--fsize=${opts.fileSizeLimit}`, '--');
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: opts.cwd ?? os.tmpdir(),
    env: childEnv(opts.env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  const logs: LogLine[] = [];
  const errChunks: Buffer[] = [];
  const outChunks: Buffer[] = [];
  const waiters: Array<{ pred: (l: LogLine) => boolean; resolve: (l: LogLine) => void }> = [];
  let partial = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    errChunks.push(chunk);
    partial += chunk.toString('utf8');
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      if (!line.startsWith('{')) continue;
      let parsed: LogLine;
      try {
        parsed = JSON.parse(line) as LogLine;
      } catch {
        continue;
      }
      logs.push(parsed);
      for (let i = waiters.length - 1; i >= 0; i--) {
        if (waiters[i]!.pred(parsed)) {
          waiters[i]!.resolve(parsed);
          waiters.splice(i, 1);
        }
      }
    }
  });
  child.stdout!.on('data', (chunk: Buffer) => {
    if (opts.captureStdout) outChunks.push(chunk);
  });
  const exited = new Promise<ExitInfo>((resolve) => {
    child.once('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    });
  });
  let isAlive = true;
  void exited.then(() => (isAlive = false));
  // stdio may still hold data when 'exit' fires: 'close' means every pipe is drained.
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));

  const stderr = (): string => Buffer.concat(errChunks).toString('utf8');
  const waitForLog = (pred: (l: LogLine) => boolean, timeoutMs = 10_000): Promise<LogLine> => {
    const seen = logs.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise<LogLine>((resolve, reject) => {
      const w = { pred, resolve: (l: LogLine) => (clearTimeout(t), resolve(l)) };
      const t = setTimeout(() => {
        const i = waiters.indexOf(w);
        if (i >= 0) waiters.splice(i, 1);
        reject(new Error(`no matching log line within ${timeoutMs} ms; stderr:\n${stderr()}`));
      }, timeoutMs);
      waiters.push(w);
      void exited.then(() =>
        setTimeout(() => {
          if (waiters.includes(w)) {
            waiters.splice(waiters.indexOf(w), 1);
            clearTimeout(t);
            reject(new Error(`meshcap exited before the awaited log line; stderr:\n${stderr()}`));
          }
        }, 50),
      );
    });
  };

  const proc: ServeProcess = {
    child,
    pid: child.pid!,
    logs,
    stderr,
    stdout: () => Buffer.concat(outChunks),
    exited,
    alive: () => isAlive,
    async stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 10_000): Promise<StopResult> {
      const t0 = performance.now();
      if (!isAlive) return { ...(await exited), elapsedMs: 0 };
      child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      const info = await exited;
      const elapsedMs = performance.now() - t0;
      clearTimeout(timer);
      await Promise.race([closed, sleep(1000)]);
      return { ...info, elapsedMs };
    },
    waitForLog,
    warnings: (reason?: string) => logs.filter((l) => l.level >= LOG_LEVEL.warn && (reason === undefined || l.reason === reason)),
  };

  try {
    await waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('meshcap serving'), opts.readyTimeoutMs ?? 15_000);
    if (opts.socket) {
      const deadline = Date.now() + 5000;
      while (!fs.existsSync(opts.socket)) {
        if (Date.now() > deadline) throw new Error(`socket ${opts.socket} not created; stderr:\n${stderr()}`);
        await sleep(20);
      }
    }
  } catch (err) {
    if (isAlive) child.kill('SIGKILL');
    throw err;
  }
  return proc;
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
  elapsedMs: number;
}

/** Runs `meshcap ARGS` to completion (convert, bad flags, …). */
export function runCli(args: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {}): Promise<CliResult> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [MESHCAP_BIN, ...args], { cwd: opts.cwd ?? os.tmpdir(), env: childEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (c: Buffer) => out.push(c));
    child.stderr!.on('data', (c: Buffer) => err.push(c));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      running.delete(child);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8'), elapsedMs: performance.now() - t0 });
    });
  });
}

/** A TCP port free on 127.0.0.1 right now (bind to 0, read it, release it). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** True when something already listens on host:port. */
export function portInUse(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(true));
    srv.listen(port, host, () => srv.close(() => resolve(false)));
  });
}

/** GET http://host:port/path → status and body. */
export function httpGet(port: number, urlPath: string, host = '127.0.0.1'): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port, path: urlPath, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8'), headers: res.headers }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.setTimeout(5000, () => req.destroy(new Error(`GET ${urlPath} timed out`)));
  });
}

/**
 * Prometheus text exposition → Map from series key to value. The key is the metric name, plus
 * `{a="x",b="y"}` with labels sorted by name when there are any (use `seriesKey` to build one).
 */
export function parsePrometheus(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$/.exec(line);
    if (!m) throw new Error(`unparseable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    if (m[3]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?/g;
      let lm: RegExpExecArray | null;
      while ((lm = re.exec(m[3]))) labels[lm[1]!] = lm[2]!.replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
    }
    const v = m[4]!;
    const value = v === '+Inf' ? Infinity : v === '-Inf' ? -Infinity : Number(v);
    out.set(seriesKey(m[1]!, labels), value);
  }
  return out;
}

export function seriesKey(name: string, labels: Record<string, string> = {}): string {
  const keys = Object.keys(labels).sort();
  if (keys.length === 0) return name;
  return `${name}{${keys.map((k) => `${k}="${labels[k]}"`).join(',')}}`;
}

/** GET /metrics and parse it. */
export async function scrapeMetrics(port: number, host = '127.0.0.1'): Promise<Map<string, number>> {
  const res = await httpGet(port, '/metrics', host);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}: ${res.body}`);
  return parsePrometheus(res.body);
}

/** A series' value, 0 when absent. */
export function metricValue(metrics: Map<string, number>, name: string, labels: Record<string, string> = {}): number {
  return metrics.get(seriesKey(name, labels)) ?? 0;
}

/** Scrapes until `pred` holds (counters are updated asynchronously), or returns the last scrape. */
export async function waitForMetrics(port: number, pred: (m: Map<string, number>) => boolean, timeoutMs = 5000): Promise<Map<string, number>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await scrapeMetrics(port);
    if (pred(m) || Date.now() > deadline) return m;
    await sleep(50);
  }
}

/** A fresh directory under os.tmpdir(). */
export function tempDir(prefix = 'meshcap-e2e-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Splits a gRPC length-prefixed body (5-byte prefix per message) into its messages. */
export function splitGrpcFrames(body: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let off = 0;
  while (off < body.length) {
    if (off + 5 > body.length) throw new Error(`gRPC body: truncated prefix at ${off}`);
    if (body[off] !== 0) throw new Error(`gRPC body: compressed message at ${off}`);
    const len = body.readUInt32BE(off + 1);
    if (off + 5 + len > body.length) throw new Error(`gRPC body: truncated message at ${off}`);
    out.push(body.subarray(off + 5, off + 5 + len));
    off += 5 + len;
  }
  return out;
}

/** The synthetic fixture's StreamTapsRequest messages (node "sidecar~10.0.0.1~…", trace 1, 8 messages). */
export function syntheticStreamMessages(): Buffer[] {
  return splitGrpcFrames(fs.readFileSync(path.join(ENVOY_FIXTURES, 'synthetic_streamtaps_requests.grpc.bin')));
}

/**
 * The six HTTP/2 Info strings of Envoy's golden `tshark -d tcp.port==10000,http2` output
 * (tap2pcap_h2_ipv4.txt), e.g. "Magic, SETTINGS[0], WINDOW_UPDATE[0], HEADERS[1]: GET /".
 */
export function expectedHttp2Info(): string[] {
  const text = fs.readFileSync(path.join(ENVOY_FIXTURES, 'tap2pcap_h2_ipv4.txt'), 'utf8');
  return text
    .split('\n')
    .map((l) => /\sHTTP2\s+\d+\s+(.*)$/.exec(l)?.[1]?.trim())
    .filter((s): s is string => !!s);
}
