/**
 * The broker path for the end-to-end benchmarks: a throwaway PKI (bench/lib/pki.ts), `meshcap
 * collect` as a child process (mutual TLS on 127.0.0.1, metrics on 127.0.0.1, captures in a
 * temporary directory), the `meshcap serve` flags that point its broker sink at it, and readers of
 * what collect wrote. Every child is stopped by its own pid (SIGTERM, then SIGKILL after a grace
 * period, and SIGKILL if this process exits first).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BENCH_TRUST_DOMAIN, makeBenchPki, type BenchPki } from './pki.js';
import { DEPLOYED_NODE_FLAGS, MESHCAP_BIN, MeshcapChild, freePort, sleep, type Exit, type MeshcapProc } from './procs.js';

export { type BenchPki } from './pki.js';

/** A PKI in `dir` (a directory of the caller's temporary tree). */
export async function brokerPki(dir: string): Promise<BenchPki> {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return await makeBenchPki(dir);
}

export interface CollectOptions {
  pki: BenchPki;
  /** Capture directory (collect's -w). */
  dir: string;
  /** Extra collect flags, e.g. ['-C', '256', '-W', '2']. */
  args?: string[];
}

/** `meshcap collect` on 127.0.0.1:<free port>, admitting the benchmark's trust domain. */
export class CollectProc extends MeshcapChild {
  private constructor(
    child: ChildProcess,
    readonly port: number,
    metricsPort: number,
    readonly dir: string,
  ) {
    super(child, metricsPort);
  }

  /** The broker URL for `meshcap serve --broker`. */
  get url(): string {
    return `tls://127.0.0.1:${this.port}`;
  }

  static async start(o: CollectOptions): Promise<CollectProc> {
    const [port, metricsPort] = [await freePort(), await freePort()];
    const args = [
      ...DEPLOYED_NODE_FLAGS,
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
    await p.ready('meshcap collect');
    return p;
  }

  /** SIGTERM (collect writes what it received and completes its files), SIGKILL after `graceMs`. */
  override stop(graceMs = 10_000): Promise<Exit> {
    return super.stop(graceMs);
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
