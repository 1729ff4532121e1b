/**
 * Shared machinery of the broker tests (test/e2e/broker*.test.ts): a real Pipeline fed with Envoy
 * traces through the TraceDecoder, writing the "truth" to disk with a FileSink beside the broker
 * sink; socat as a plain TLS broker (its own process group, so it can be killed whole); `meshcap
 * collect` as a child process (for SIGKILL) or in-process; readers that split captures into raw
 * records and merge the captures of several connections.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pino, { type Logger } from 'pino';
import { Collector } from '../../src/cli/collect.js';
import { SpiffeMatcher } from '../../src/control/spiffe.js';
import { PipelineStats } from '../../src/control/stats.js';
import { TlsFiles } from '../../src/control/tls-files.js';
import { framerFor, type CaptureFormat } from '../../src/format/index.js';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { TraceDecoder } from '../../src/ingest/trace-decoder.js';
import { DEFAULT_PIPELINE, Pipeline } from '../../src/pipeline.js';
import { BrokerSink, parseBrokerUrl, type BrokerSinkOptions } from '../../src/sink/broker-sink.js';
import { FileSink } from '../../src/sink/file-sink.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitFor(what: string, pred: () => boolean | Promise<boolean>, timeoutMs = 15_000, everyMs = 25): Promise<void> {
  const t0 = Date.now();
  while (!(await pred())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

// ----- logs ---------------------------------------------------------------------------------

export interface CapturedLog {
  logger: Logger;
  lines: Array<Record<string, unknown> & { level: number; msg: string }>;
  /** Lines whose reason matches. */
  reasons(re: RegExp): Array<Record<string, unknown>>;
}

/** A pino logger whose JSON lines are kept in memory. */
export function captureLog(level = 'debug'): CapturedLog {
  const lines: CapturedLog['lines'] = [];
  const logger = pino(
    { level },
    {
      write(s: string) {
        for (const l of s.split('\n')) if (l) lines.push(JSON.parse(l));
      },
    },
  );
  return { logger, lines, reasons: (re) => lines.filter((l) => typeof l.reason === 'string' && re.test(l.reason as string)) };
}

// ----- traffic ------------------------------------------------------------------------------

const Wrapper = loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');

function seg(traceId: number, piece: Record<string, unknown>): Buffer {
  return Buffer.from(Wrapper.encode(Wrapper.fromObject({ socket_streamed_trace_segment: { trace_id: traceId, ...piece } })).finish());
}

/** A deterministic pseudo-random generator (xorshift32). */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 4294967296;
  };
}

/**
 * Traffic in rounds: `flows` connections (10.1.x.y:443 ← clients), each round every flow gets a
 * request and a response of random sizes; the last round closes them. Payload bytes are random,
 * so a duplicated or missing packet cannot hide.
 */
export class Traffic {
  private clock: number;
  private readonly rand: () => number;
  readonly rounds: Buffer[][] = [];

  constructor(
    readonly flows: number,
    rounds: number,
    readonly maxEvent = 48 * 1024,
    seed = 1,
    firstTraceId = 1,
  ) {
    this.rand = rng(seed);
    this.clock = 1_750_000_000 + seed * 10_000;
    const ts = (): { seconds: number; nanos: number } => {
      this.clock += 0.000731;
      const s = Math.floor(this.clock);
      return { seconds: s, nanos: Math.floor((this.clock - s) * 1e9) };
    };
    const bytes = (n: number): Buffer => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = (this.rand() * 256) | 0;
      return b;
    };
    for (let r = 0; r < rounds; r++) {
      const msgs: Buffer[] = [];
      for (let f = 0; f < flows; f++) {
        const id = firstTraceId + f;
        if (r === 0) {
          msgs.push(
            seg(id, {
              connection: {
                local_address: { socket_address: { address: `10.1.${(id >> 8) & 255}.${id & 255}`, port_value: 443 } },
                remote_address: { socket_address: { address: `10.2.${(id >> 8) & 255}.${id & 255}`, port_value: 40000 + (id % 20000) } },
              },
            }),
          );
        }
        const req = 1 + Math.floor(this.rand() * 2000);
        const resp = 1 + Math.floor(this.rand() * this.maxEvent);
        msgs.push(seg(id, { event: { timestamp: ts(), read: { data: { as_bytes: bytes(req) } } } }));
        msgs.push(seg(id, { event: { timestamp: ts(), write: { data: { as_bytes: bytes(resp) } } } }));
        if (r === rounds - 1) msgs.push(seg(id, { event: { timestamp: ts(), closed: {} } }));
      }
      this.rounds.push(msgs);
    }
  }
}

// ----- pipeline -----------------------------------------------------------------------------

export interface Rig {
  pipeline: Pipeline;
  stats: PipelineStats;
  decoder: TraceDecoder;
  /** The capture the FileSink writes (the truth). */
  diskFile: string;
  fileSink: FileSink;
  broker: BrokerSink;
  tls: TlsFiles;
  log: CapturedLog;
  /** Feeds rounds [from, to) of the traffic, flushing after each and pausing `gapMs`. */
  feed(traffic: Traffic, from?: number, to?: number, gapMs?: number, onRound?: (r: number) => Promise<void> | void): Promise<void>;
  close(): Promise<void>;
}

export interface RigOptions {
  dir: string;
  /** Format of the pipeline blocks and of the file on disk. */
  diskFormat: CaptureFormat;
  brokers: string[];
  cert: string;
  key: string;
  ca: string;
  broker?: Partial<BrokerSinkOptions>;
  log?: CapturedLog;
}

export function makeRig(o: RigOptions): Rig {
  const stats = new PipelineStats();
  const log = o.log ?? captureLog();
  const framer = framerFor(o.diskFormat);
  const pipeline = new Pipeline({ ...DEFAULT_PIPELINE, framer, blockSize: 256 * 1024, blockCount: 64, flushIntervalMs: 1000 }, stats, log.logger);
  const diskFile = path.join(o.dir, `disk.${o.diskFormat === 'pcapng' ? 'pcapng' : 'pcap'}`);
  const fileSink = new FileSink({ path: diskFile, framer, snaplen: 262144, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 64 }, stats, log.logger);
  const tls = new TlsFiles({ cert: o.cert, key: o.key, ca: o.ca }, log.logger, { role: 'broker client', pollMs: 100 });
  const broker = new BrokerSink(
    {
      brokers: o.brokers.map(parseBrokerUrl),
      mode: 'failover',
      format: 'pcap',
      snaplen: 262144,
      tls,
      brokerSpiffeId: null,
      spoolDir: null,
      spoolMaxBytes: 0,
      queueBytes: 64 << 20,
      replayWindowBytes: 'auto',
      backoffMinMs: 50,
      backoffMaxMs: 400,
      connectTimeoutMs: 2000,
      acceptWaitMs: 500,
      closeTimeoutMs: 5000,
      ...o.broker,
    },
    stats,
    log.logger,
  );
  pipeline.addSink(fileSink);
  pipeline.addSink(broker);
  broker.start();
  const decoder = new TraceDecoder(pipeline);
  const stream = { nodeId: 'node-broker-test', tapId: 'tap', source: 'test' };
  return {
    pipeline,
    stats,
    decoder,
    diskFile,
    fileSink,
    broker,
    tls,
    log,
    async feed(traffic, from = 0, to = traffic.rounds.length, gapMs = 0, onRound) {
      for (let r = from; r < to; r++) {
        for (const m of traffic.rounds[r]!) decoder.decodeTraceWrapper(m, stream);
        pipeline.flush();
        if (onRound) await onRound(r);
        await sleep(gapMs);
      }
    },
    async close() {
      await pipeline.close();
    },
  };
}

// ----- captures -----------------------------------------------------------------------------

export interface Records {
  format: 'pcap' | 'pcapng';
  header: Buffer;
  /** Whole records (pcap record header + frame, or pcapng EPB), in file order. */
  recs: Buffer[];
  /** Bytes after the last whole record (a connection cut mid-record). */
  trailing: number;
}

/** Splits a capture into its records, tolerating a cut at the end. pcapng: EPBs only. */
export function splitRecords(buf: Buffer): Records {
  if (buf.length === 0) return { format: 'pcap', header: buf, recs: [], trailing: 0 };
  const magic = buf.readUInt32LE(0);
  const recs: Buffer[] = [];
  if (magic === 0x0a0d0d0a) {
    const shb = buf.readUInt32LE(4);
    const hlen = shb + buf.readUInt32LE(shb + 4);
    let off = hlen;
    while (off + 12 <= buf.length) {
      const len = buf.readUInt32LE(off + 4);
      if (off + len > buf.length) break;
      if (buf.readUInt32LE(off) === 6) recs.push(buf.subarray(off, off + len));
      off += len;
    }
    return { format: 'pcapng', header: buf.subarray(0, hlen), recs, trailing: buf.length - off };
  }
  if (magic !== 0xa1b2c3d4 && magic !== 0xa1b23c4d) throw new Error(`not a capture: magic 0x${magic.toString(16)}`);
  let off = 24;
  while (off + 16 <= buf.length) {
    const end = off + 16 + buf.readUInt32LE(off + 8);
    if (end > buf.length) break;
    recs.push(buf.subarray(off, end));
    off = end;
  }
  return { format: 'pcap', header: buf.subarray(0, 24), recs, trailing: buf.length - off };
}

export function readRecords(file: string): Records {
  return splitRecords(fs.readFileSync(file));
}

/** The frame bytes of a record (without pcap/pcapng framing). */
export function frameOf(rec: Buffer, format: 'pcap' | 'pcapng'): Buffer {
  if (format === 'pcap') return rec.subarray(16);
  return rec.subarray(28, 28 + rec.readUInt32LE(20));
}

/**
 * Merges the captures of successive connections where each may start by repeating a tail of what
 * came before (resends after a break). Returns the merged records and how many were duplicates.
 */
export function mergeResent(parts: Buffer[][]): { merged: Buffer[]; duplicates: number; duplicateBytes: number; maxOverlap: number } {
  const merged: Buffer[] = [];
  let duplicates = 0;
  let duplicateBytes = 0;
  let maxOverlap = 0;
  for (const part of parts) {
    if (part.length === 0) continue;
    let overlap = 0;
    // The longest suffix of `merged` that is a prefix of `part`, searched from its first record.
    for (let j = merged.length - 1; j >= 0; j--) {
      if (!merged[j]!.equals(part[0]!)) continue;
      const n = merged.length - j;
      let ok = n <= part.length;
      for (let k = 0; ok && k < n; k++) ok = merged[j + k]!.equals(part[k]!);
      if (ok) {
        overlap = n;
        break;
      }
    }
    for (let k = 0; k < overlap; k++) duplicateBytes += part[k]!.length;
    duplicates += overlap;
    maxOverlap = Math.max(maxOverlap, overlap);
    for (let k = overlap; k < part.length; k++) merged.push(part[k]!);
  }
  return { merged, duplicates, duplicateBytes, maxOverlap };
}

/** Writes records as one capture file (to give tshark a merged view). */
export function writeCapture(file: string, header: Buffer, recs: Buffer[]): void {
  fs.writeFileSync(file, Buffer.concat([header, ...recs]));
}

/** First index where two record lists differ (-1 when equal), for readable failures. */
export function firstDifference(a: Buffer[], b: Buffer[]): number {
  const n = Math.max(a.length, b.length);
  for (let i = 0; i < n; i++) if (!a[i] || !b[i] || !a[i]!.equals(b[i]!)) return i;
  return -1;
}

// ----- socat broker ---------------------------------------------------------------------------

export class SocatBroker {
  child: ChildProcess | null = null;
  stderr = '';

  constructor(
    readonly port: number,
    readonly outDir: string,
    readonly cert: string,
    readonly key: string,
    readonly ca: string,
    /** Extra socat OPENSSL options, e.g. 'openssl-max-proto-version=TLS1.2'. */
    readonly extra = '',
  ) {
    fs.mkdirSync(outDir, { recursive: true });
  }

  /** Starts socat (one file per connection, named by arrival time) and waits until it listens. */
  async start(): Promise<void> {
    const addr = `OPENSSL-LISTEN:${this.port},bind=127.0.0.1,reuseaddr,fork,cert=${this.cert},key=${this.key},cafile=${this.ca},verify=1${this.extra ? `,${this.extra}` : ''}`;
    // -u: broker to file only. Every connection: a new shell, a new file.
    const sink = `SYSTEM:exec cat > ${this.outDir}/conn-$(date +%s%N)-$$.pcap`;
    const child = spawn('socat', ['-u', addr, sink], { detached: true, stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    await waitFor(`socat listening on ${this.port}`, () => listening(this.port), 5000);
  }

  /** Kills socat and every connection process (its whole process group). */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise((r) => c.once('exit', r));
    try {
      process.kill(-c.pid!, signal);
    } catch {
      /* already gone */
    }
    await exited;
    // The connection handlers of the group may outlive the parent by a moment.
    await sleep(50);
    this.child = null;
  }

  /** Capture files received, in connection order. */
  files(): string[] {
    return fs
      .readdirSync(this.outDir)
      .filter((n) => n.startsWith('conn-'))
      .sort((a, b) => {
        const ta = BigInt(a.split('-')[1]!);
        const tb = BigInt(b.split('-')[1]!);
        return ta < tb ? -1 : ta > tb ? 1 : 0;
      })
      .map((n) => path.join(this.outDir, n));
  }
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

// ----- meshcap collect ------------------------------------------------------------------------

export interface CollectProcess {
  child: ChildProcess;
  logs: Array<Record<string, unknown> & { msg: string }>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/**
 * A private build of the sources for the collector child process (in .vitest-tmp/, next to
 * node_modules so that packages resolve): the tests never depend on, or rewrite, dist/. Rebuilt
 * only when a source file is newer than the last build (type errors elsewhere still emit JS).
 */
const BUILD = path.join(REPO, '.vitest-tmp', 'broker-tests-build');
const RUNNER = path.join(BUILD, 'run-collect.mjs');
export function ensureBuilt(): void {
  const newest = (dir: string): number => {
    let t = 0;
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      t = Math.max(t, e.isDirectory() ? newest(p) : fs.statSync(p).mtimeMs);
    }
    return t;
  };
  const stamp = path.join(BUILD, 'built-at');
  if (fs.existsSync(stamp) && Number(fs.readFileSync(stamp, 'utf8')) >= newest(path.join(REPO, 'src'))) return;
  const started = Date.now();
  try {
    execFileSync(process.execPath, [path.join(REPO, 'node_modules/typescript/bin/tsc'), '-p', path.join(REPO, 'tsconfig.json'), '--outDir', BUILD, '--sourceMap', 'false'], { stdio: 'pipe' });
  } catch {
    /* type errors in files being edited elsewhere: JavaScript is emitted all the same */
  }
  fs.writeFileSync(RUNNER, "import { collect } from './src/cli/collect.js';\nprocess.exitCode = await collect(process.argv.slice(2));\n");
  fs.writeFileSync(stamp, String(started));
}

/** Runs `meshcap collect ARGS` and waits until it listens. */
export async function startCollect(args: string[]): Promise<CollectProcess> {
  ensureBuilt();
  const child = spawn(process.execPath, [RUNNER, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const logs: CollectProcess['logs'] = [];
  let partial = '';
  let ready: (() => void) | null = null;
  const readyP = new Promise<void>((r) => (ready = r));
  child.stderr!.on('data', (d: Buffer) => {
    partial += d.toString();
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        const l = JSON.parse(line);
        logs.push(l);
        if (typeof l.msg === 'string' && l.msg.startsWith('meshcap collecting on')) ready?.();
      } catch {
        logs.push({ msg: line });
      }
    }
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
  const t = setTimeout(() => child.kill('SIGKILL'), 15_000);
  await Promise.race([readyP, exited]);
  clearTimeout(t);
  if (child.exitCode !== null || child.signalCode !== null) throw new Error(`meshcap collect exited: ${JSON.stringify(logs)}`);
  return { child, logs, exited };
}

/** An in-process collector (faster to start; cannot be SIGKILLed). */
export async function inProcessCollector(o: { port: number; dir: string; cert: string; key: string; ca: string; allow: string[]; log?: CapturedLog }): Promise<{ collector: Collector; log: CapturedLog; tls: TlsFiles }> {
  const log = o.log ?? captureLog();
  const tls = new TlsFiles({ cert: o.cert, key: o.key, ca: o.ca }, log.logger, { role: 'collector', pollMs: 100 });
  const collector = new Collector(
    { host: '127.0.0.1', port: o.port, tls, dir: o.dir, allow: new SpiffeMatcher(o.allow), maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, fsync: false, maxConnections: 64 },
    log.logger,
  );
  await collector.start();
  return { collector, log, tls };
}

/** Every capture file collect wrote under DIR/<sidecar>, in file-sequence order. */
export function collectedFiles(dir: string): string[] {
  const out: string[] = [];
  if (!fs.existsSync(dir)) return out;
  for (const sub of fs.readdirSync(dir).sort()) {
    const d = path.join(dir, sub);
    if (!fs.statSync(d).isDirectory()) continue;
    const files = fs.readdirSync(d).filter((n) => /\.pcap(ng)?(\.part)?$/.test(n));
    files.sort((a, b) => Number(/_(\d{5})_/.exec(a)![1]) - Number(/_(\d{5})_/.exec(b)![1]));
    out.push(...files.map((n) => path.join(d, n)));
  }
  return out;
}
