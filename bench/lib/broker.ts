/**
 * The broker path for the end-to-end benchmarks: a throwaway PKI (bench/lib/pki.ts), `meshcap
 * collect` as a child process (mutual TLS on 127.0.0.1, metrics on 127.0.0.1, captures in a
 * temporary directory), the `meshcap serve` flags that point its broker sink at it, and readers of
 * what collect wrote. Every child is stopped by its own pid (SIGTERM, then SIGKILL after a grace
 * period, and SIGKILL if this process exits first).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { BENCH_TRUST_DOMAIN, makeBenchPki, type BenchPki } from './pki.js';
import { MESHCAP_BIN, freePort, scrape, sleep, type Exit, type MeshcapProc, type Metrics } from './procs.js';

export { type BenchPki } from './pki.js';

/** Collect children still running: killed if this process exits early (a failed benchmark). */
const liveChildren = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of liveChildren) c.kill('SIGKILL');
});

/** A PKI in `dir` (a directory of the caller's temporary tree). */
export async function brokerPki(dir: string): Promise<BenchPki> {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return await makeBenchPki(dir);
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

export interface CollectOptions {
  pki: BenchPki;
  /** Capture directory (collect's -w). */
  dir: string;
  /** Extra collect flags, e.g. ['-C', '256', '-W', '2']. */
  args?: string[];
}

/** `meshcap collect` on 127.0.0.1:<free port>, admitting the benchmark's trust domain. */
export class CollectProc {
  private stderr = '';
  readonly exited: Promise<Exit>;
  exitedWith: Exit | null = null;

  private constructor(
    readonly child: ChildProcess,
    readonly port: number,
    readonly metricsPort: number,
    readonly dir: string,
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

  get log(): string {
    return this.stderr;
  }

  /** The broker URL for `meshcap serve --broker`. */
  get url(): string {
    return `tls://127.0.0.1:${this.port}`;
  }

  static async start(o: CollectOptions): Promise<CollectProc> {
    const [port, metricsPort] = [await freePort(), await freePort()];
    const args = [
      MESHCAP_BIN, 'collect',
      '--listen', `127.0.0.1:${port}`,
      '--tls-cert', o.pki.collector.cert, '--tls-key', o.pki.collector.key, '--tls-ca', o.pki.ca,
      '-w', o.dir,
      '--allow', `${BENCH_TRUST_DOMAIN}/**`,
      '--metrics-listen', `127.0.0.1:${metricsPort}`,
      '--log-level', 'warn',
      ...(o.args ?? []),
    ];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: path.dirname(o.dir) });
    const p = new CollectProc(child, port, metricsPort, o.dir);
    const deadline = Date.now() + 15_000;
    while ((await httpStatus(metricsPort, '/readyz')) !== 200) {
      if (p.exitedWith) throw new Error(`meshcap collect exited at start (${JSON.stringify(p.exitedWith)}): ${p.log}`);
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`meshcap collect not ready within 15 s: ${p.log}`);
      }
      await sleep(25);
    }
    return p;
  }

  scrape(): Promise<Metrics> {
    return scrape(this.metricsPort);
  }

  /** SIGTERM (collect writes what it received and completes its files), SIGKILL after `graceMs`. */
  async stop(graceMs = 10_000): Promise<Exit> {
    if (this.exitedWith) return this.exitedWith;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    const e = await this.exited;
    clearTimeout(t);
    return e;
  }
}

/**
 * Flags for `meshcap serve` forwarding to `collect` with the sidecar's certificate; the spool in
 * `spoolDir` (its default size, 1 GB).
 */
export function brokerServeArgs(pki: BenchPki, collect: CollectProc, spoolDir: string, extra: string[] = []): string[] {
  return ['--broker', collect.url, '--tls-cert', pki.sidecar.cert, '--tls-key', pki.sidecar.key, '--tls-ca', pki.ca, '--spool-dir', spoolDir, ...extra];
}

/** Waits until serve's broker sink is connected to the collector (and collect admitted it). */
export async function waitBrokerConnected(serve: MeshcapProc, collect: CollectProc, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const [m, c] = await Promise.all([serve.scrape(), collect.scrape()]);
    if (m.sum('meshcap_broker_connected') >= 1 && c.sum('meshcap_collect_connections_active') >= 1) return;
    if (serve.exitedWith || collect.exitedWith || Date.now() > deadline) {
      throw new Error(`broker sink not connected to collect within ${timeoutMs} ms: serve ${serve.log.slice(-1000)} collect ${collect.log.slice(-1000)}`);
    }
    await sleep(25);
  }
}

/** Capture files collect wrote under `dir` (completed and `.part`), its state directories skipped. */
export function collectedFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    let names: fs.Dirent[];
    try {
      names = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of names) {
      if (e.name.startsWith('.')) continue;
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.pcap(ng)?(\.part)?$/.test(e.name)) out.push(p);
    }
  };
  walk(dir);
  return out.sort();
}

/** The `.part` file collect is writing under `dir` (the first one found), or null. */
export function collectOpenFile(dir: string): string | null {
  return collectedFiles(dir).find((f) => f.endsWith('.part')) ?? null;
}
