/**
 * Child processes for the end-to-end benchmarks: `meshcap serve` (the system under test), the null
 * gRPC sink (the baseline), the load generator; Prometheus scraping, /proc readings (CPU per
 * thread, RSS, peak RSS), results files. Everything binds to 127.0.0.1 or Unix sockets in a
 * temporary directory, and every child is stopped by its own pid.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { machine } from '../harness.js';

export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'bench'))) return dir;
    dir = path.dirname(dir);
  }
  return process.cwd();
}

/**
 * The meshcap under test: this checkout's bin/meshcap.js, or MESHCAP_BENCH_BIN (another build, e.g.
 * a patched copy, to compare against this one on the same machine).
 */
export const MESHCAP_BIN = process.env.MESHCAP_BENCH_BIN || path.join(packageRoot(), 'bin', 'meshcap.js');

/** The V8 flag meshcap is deployed with (bin/meshcap.js's shebang, the Dockerfile, `npm start`). */
export const DEPLOYED_NODE_FLAGS = ['--initial-old-space-size=64'];

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function tempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `meshcap-bench-${tag}-`));
}

export async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// /proc

const TICK = 100; // USER_HZ on Linux

/** User and system CPU seconds of a process (all threads), or of one thread. */
export function cpuSeconds(pid: number, tid?: number): { user: number; sys: number } {
  try {
    const stat = fs.readFileSync(tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { user: Number(f[11]) / TICK, sys: Number(f[12]) / TICK };
  } catch {
    return { user: NaN, sys: NaN };
  }
}

/** CPU seconds of the main (JavaScript) thread and of every other thread (libuv pool, GC helpers). */
export function cpuSplit(pid: number): { main: number; others: number; total: number } {
  const all = cpuSeconds(pid);
  const main = cpuSeconds(pid, pid);
  const total = all.user + all.sys;
  return { main: main.user + main.sys, others: total - (main.user + main.sys), total };
}

/** VmRSS and VmHWM (peak RSS) in bytes. */
export function memStatus(pid: number): { rss: number; hwm: number } {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN) * 1024;
    return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
  } catch {
    return { rss: NaN, hwm: NaN };
  }
}

/** Polls a process's RSS every `everyMs`; keeps the maximum and the kernel's own peak (VmHWM). */
export class MemPoller {
  maxRss = 0;
  hwm = 0;
  private readonly timer: NodeJS.Timeout;
  constructor(
    private readonly pid: number,
    everyMs = 100,
  ) {
    this.timer = setInterval(() => this.poll(), everyMs);
    this.poll();
  }
  poll(): void {
    const m = memStatus(this.pid);
    if (m.rss > this.maxRss) this.maxRss = m.rss;
    if (m.hwm > this.hwm) this.hwm = m.hwm;
  }
  stop(): void {
    this.poll();
    clearInterval(this.timer);
  }
}

// ---------------------------------------------------------------------------------------------
// Prometheus

export class Metrics {
  constructor(readonly values: Map<string, number>) {}
  /** Sum of every series of `name` whose labels contain `labelPart` (e.g. 'source="grpc"'). */
  sum(name: string, labelPart = ''): number {
    let n = 0;
    for (const [k, v] of this.values) {
      const brace = k.indexOf('{');
      const base = brace < 0 ? k : k.slice(0, brace);
      if (base === name && (!labelPart || k.includes(labelPart))) n += v;
    }
    return n;
  }
  /** Every series of `name` by its label text. */
  series(name: string): Array<[string, number]> {
    const out: Array<[string, number]> = [];
    for (const [k, v] of this.values) if (k === name || k.startsWith(`${name}{`)) out.push([k.slice(name.length), v]);
    return out;
  }
}

export async function scrape(port: number, timeoutMs = 5000): Promise<Metrics> {
  const body = await new Promise<string>((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/metrics', timeout: timeoutMs }, (res) => {
      let s = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (s += d));
      res.on('end', () => resolve(s));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('metrics scrape timed out')));
    req.on('error', reject);
  });
  const values = new Map<string, number>();
  for (const line of body.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    values.set(line.slice(0, sp), Number(line.slice(sp + 1)));
  }
  return new Metrics(values);
}

async function httpStatus(port: number, p: string): Promise<number> {
  return await new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => resolve(0));
    req.on('timeout', () => req.destroy());
  });
}

// ---------------------------------------------------------------------------------------------
// meshcap serve

export interface MeshcapOptions {
  dir: string;
  /** Extra serve flags, e.g. ['--flush-interval', '10', '-C', '256', '-W', '2']. */
  args?: string[];
  /** Write a V8 CPU profile (node --cpu-prof) into this directory. */
  cpuProfDir?: string;
  /** Capture file name inside dir. */
  file?: string;
  /** Extra environment variables for serve. */
  env?: Record<string, string>;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** meshcap children still running: killed if this process exits early (a failed benchmark). */
const liveChildren = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of liveChildren) c.kill('SIGKILL');
});

/**
 * A meshcap child process (serve, collect): its log (the last 64 KiB of standard error), its exit,
 * readiness through /readyz, and a stop that escalates to SIGKILL.
 */
export class MeshcapChild {
  private stderr = '';
  readonly exited: Promise<Exit>;
  exitedWith: Exit | null = null;

  protected constructor(
    readonly child: ChildProcess,
    readonly metricsPort: number,
  ) {
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => {
      this.stderr = (this.stderr + d).slice(-64 * 1024);
    });
    liveChildren.add(child);
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        liveChildren.delete(child);
        this.exitedWith = { code, signal };
        resolve(this.exitedWith);
      }),
    );
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** The last 64 KiB of meshcap's log (standard error). */
  get log(): string {
    return this.stderr;
  }

  /** Resolves when /readyz answers 200; throws (with the log) if the child exits or 15 s pass. */
  protected async ready(what: string): Promise<void> {
    const deadline = Date.now() + 15_000;
    while ((await httpStatus(this.metricsPort, '/readyz')) !== 200) {
      if (this.exitedWith) throw new Error(`${what} exited at start (${JSON.stringify(this.exitedWith)}): ${this.log}`);
      if (Date.now() > deadline) {
        this.child.kill('SIGKILL');
        throw new Error(`${what} not ready within 15 s: ${this.log}`);
      }
      await sleep(25);
    }
  }

  scrape(): Promise<Metrics> {
    return scrape(this.metricsPort);
  }

  /** SIGTERM (meshcap completes its files), SIGKILL after `graceMs`. */
  async stop(graceMs = 15_000): Promise<Exit> {
    if (this.exitedWith) return this.exitedWith;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    const e = await this.exited;
    clearTimeout(t);
    return e;
  }
}

export class MeshcapProc extends MeshcapChild {
  readonly sock: string;
  readonly target: string;
  readonly capture: string;

  private constructor(child: ChildProcess, port: number, dir: string, file: string) {
    super(child, port);
    this.sock = path.join(dir, 'meshcap.sock');
    this.target = `unix:${this.sock}`;
    this.capture = path.join(dir, file);
  }

  /** The /metrics port. */
  get port(): number {
    return this.metricsPort;
  }

  static async start(o: MeshcapOptions): Promise<MeshcapProc> {
    const port = await freePort();
    const file = o.file ?? 'capture.pcapng';
    const node = [...DEPLOYED_NODE_FLAGS, ...(o.cpuProfDir ? ['--cpu-prof', `--cpu-prof-dir=${o.cpuProfDir}`] : [])];
    const args = [...node, MESHCAP_BIN, 'serve', '--grpc-listen', `unix:${path.join(o.dir, 'meshcap.sock')}`, '-w', path.join(o.dir, file), '--metrics-listen', `127.0.0.1:${port}`, '--log-level', 'warn', ...(o.args ?? [])];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: o.dir, env: { ...process.env, ...o.env } });
    const p = new MeshcapProc(child, port, o.dir, file);
    await p.ready('meshcap serve');
    return p;
  }
}

// ---------------------------------------------------------------------------------------------
// The null gRPC sink and the load generator (forked, with an IPC channel)

export interface NullStats {
  messages: number;
  bytes: number;
  /** With a write directory: bytes written to disk, and dropped because the disk fell behind. */
  writtenBytes: number;
  droppedBytes: number;
  /** With --hand-off: bytes the second thread has copied. */
  handedOffBytes: number;
  streamsActive: number;
  streamsTotal: number;
}

type Reply = { id: number } & Record<string, unknown>;

/** A forked child answering `{ id, cmd }` requests with `{ id, ... }` replies, plus events. */
export class IpcChild {
  private nextId = 1;
  private readonly waiting = new Map<number, (r: Reply) => void>();
  private readonly listeners: Array<(m: Record<string, unknown>) => void> = [];
  readonly exited: Promise<Exit>;
  exitedWith: Exit | null = null;
  stderr = '';

  constructor(readonly child: ChildProcess) {
    // A send to a child that already exited (EPIPE) must not take the benchmark down.
    child.on('error', (err) => (this.stderr += `\n[ipc] ${err.message}`));
    child.on('message', (m: Reply) => {
      const w = m.id ? this.waiting.get(m.id) : undefined;
      if (w) {
        this.waiting.delete(m.id);
        w(m);
      } else for (const l of this.listeners) l(m);
    });
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => (this.stderr = (this.stderr + d).slice(-16 * 1024)));
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        this.exitedWith = { code, signal };
        for (const w of this.waiting.values()) w({ id: 0, error: `child exited ${code ?? signal}: ${this.stderr}` });
        this.waiting.clear();
        resolve(this.exitedWith);
      }),
    );
  }

  static fork(script: string, args: string[] = []): IpcChild {
    return new IpcChild(fork(script, args, { stdio: ['ignore', 'inherit', 'pipe', 'ipc'], execArgv: [] }));
  }

  get pid(): number {
    return this.child.pid!;
  }

  request<T = Record<string, unknown>>(cmd: string, body: Record<string, unknown> = {}): Promise<T> {
    if (this.exitedWith || !this.child.connected) return Promise.reject(new Error(`child exited: ${this.stderr}`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, (r) => (r.error ? reject(new Error(String(r.error))) : resolve(r as unknown as T)));
      this.child.send({ id, cmd, ...body }, (err) => {
        if (err && this.waiting.delete(id)) reject(err);
      });
    });
  }

  /** Resolves with the next event message of this type. */
  next(type: string): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const l = (m: Record<string, unknown>): void => {
        if (m.type !== type) return;
        this.listeners.splice(this.listeners.indexOf(l), 1);
        resolve(m);
      };
      this.listeners.push(l);
      void this.exited.then((e) => reject(new Error(`child exited (${JSON.stringify(e)}) before "${type}": ${this.stderr}`)));
    });
  }

  async kill(): Promise<void> {
    if (!this.exitedWith) this.child.kill('SIGKILL');
    await this.exited;
  }
}

const here = path.dirname(fileURLToPath(import.meta.url));

export class NullSinkProc {
  readonly target: string;
  private constructor(
    readonly ipc: IpcChild,
    sock: string,
  ) {
    this.target = `unix:${sock}`;
  }
  get pid(): number {
    return this.ipc.pid;
  }
  /**
   * Starts the null gRPC sink on DIR/null.sock; `appendTo` makes it write every message to a file at
   * once, `writeDir` to a ring of files as a capture writer would; `flags`: more of null-sink.ts's
   * options (--hand-off, --raw-h2).
   */
  static async start(dir: string, appendTo?: string, writeDir?: string, flags: string[] = []): Promise<NullSinkProc> {
    const sock = path.join(dir, 'null.sock');
    const ipc = IpcChild.fork(path.join(here, '..', 'null-sink.js'), [
      '--listen',
      `unix:${sock}`,
      ...(appendTo ? ['--append', appendTo] : []),
      ...(writeDir ? ['--write-dir', writeDir] : []),
      ...flags,
    ]);
    await ipc.next('ready');
    return new NullSinkProc(ipc, sock);
  }
  stats(): Promise<NullStats> {
    return this.ipc.request<NullStats>('stats');
  }
  async stop(): Promise<void> {
    try {
      await this.ipc.request('stop');
    } catch {
      /* already gone */
    }
    await Promise.race([this.ipc.exited, sleep(5000)]);
    await this.ipc.kill();
  }
}

export function loadgenScript(): string {
  return path.join(here, '..', 'loadgen.js');
}

// ---------------------------------------------------------------------------------------------
// Results

/** Writes bench/results/<name>-<date>.json and returns its path relative to the working directory. */
export function writeResults(name: string, data: Record<string, unknown>): string {
  const m = machine();
  const dir = path.join(packageRoot(), 'bench', 'results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}-${m.date.slice(0, 10)}.json`);
  fs.writeFileSync(file, `${JSON.stringify({ bench: name, machine: m, ...data }, null, 2)}\n`);
  return path.relative(process.cwd(), file) || file;
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export const MB = 1e6;
export const MiB = 1024 * 1024;
