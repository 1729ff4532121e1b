/**
 * Tiny benchmark harness shared by the files in bench/: timed repetitions with warm-up, medians,
 * GC counting through PerformanceObserver, heap growth across forced collections, and plain-text
 * tables. No dependencies beyond Node.
 *
 * A measurement is a `Case`: `batch(n)` does n units of work (n events, n messages, ...) and
 * returns nothing; `units` says how many packets and payload bytes one unit is. The harness calls
 * batch() in a loop until the repetition time is up, reading the clock only between batches, so
 * the measured code never sees the harness.
 */
import os from 'node:os';
import { execSync } from 'node:child_process';
import { PerformanceObserver, performance, constants as perfConstants } from 'node:perf_hooks';
import v8 from 'node:v8';
import vm from 'node:vm';

export interface Case {
  /** Stable identifier (used in JSON, and by --filter). */
  id: string;
  /** Human label for the table. */
  label: string;
  /** Per unit of work (one batch() step). */
  packetsPerUnit: number;
  payloadBytesPerUnit: number;
  /** Bytes of input per unit (wire bytes for ingest benchmarks); defaults to payloadBytesPerUnit. */
  inputBytesPerUnit?: number;
  /** Units per batch: big enough that one batch takes ~1 ms. */
  batchUnits: number;
  batch(n: number): void;
}

export interface Rep {
  seconds: number;
  units: number;
  gcMinor: number;
  gcMajor: number;
  gcOther: number;
  /** heapUsed after a forced GC, after minus before the repetition (bytes). */
  heapGrowth: number;
  /**
   * Bytes allocated on the JS heap during the repetition: heapUsed growth plus what each GC in it
   * freed (v8.GCProfiler). Exact up to ~250 KB of heapUsed granularity per repetition.
   */
  allocated: number;
}

export interface Measured {
  id: string;
  label: string;
  reps: Rep[];
  /** Medians over the repetitions. */
  unitsPerSec: number;
  gbps: number; // payload GB/s (1e9)
  mpps: number; // million packets per second
  inputMBps: number; // input MB/s (1e6)
  usPerUnit: number;
  nsPerPacket: number;
  /** Totals over all repetitions, per million packets. */
  gcPerMpkt: number;
  minorGcPerMpkt: number;
  majorGcPerMpkt: number;
  heapGrowthPerMpkt: number; // bytes
  /** Bytes allocated on the JS heap per packet, over all repetitions. */
  allocBytesPerPacket: number;
  packets: number;
}

export interface HarnessOptions {
  warmupMs: number;
  repMs: number;
  reps: number;
}

export const DEFAULT_HARNESS: HarnessOptions = { warmupMs: 400, repMs: 500, reps: 5 };

// ---------------------------------------------------------------------------------------------
// GC accounting

/** `gc()` from --expose-gc, or obtained at run time when the flag was not given. */
export const forceGc: () => void = (() => {
  const g = (globalThis as { gc?: () => void }).gc;
  if (typeof g === 'function') return g;
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
})();

export const gcExposedByFlag = typeof (globalThis as { gc?: unknown }).gc === 'function';

interface GcEntry {
  start: number;
  kind: number;
}

const gcLog: GcEntry[] = [];
let observer: PerformanceObserver | null = null;

function ensureObserver(): void {
  if (observer) return;
  observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) record(e);
  });
  observer.observe({ entryTypes: ['gc'] });
}

function record(e: PerformanceEntry): void {
  const detail = (e as PerformanceEntry & { detail?: { kind?: number } }).detail;
  gcLog.push({ start: e.startTime, kind: detail?.kind ?? 0 });
}

/** Lets the observer deliver pending entries (it is called from the event loop). */
async function drainObserver(): Promise<void> {
  await new Promise((r) => setTimeout(r, 5));
  await new Promise((r) => setImmediate(r));
  for (const e of observer!.takeRecords()) record(e);
}

function countGcs(t0: number, t1: number): { minor: number; major: number; other: number } {
  let minor = 0;
  let major = 0;
  let other = 0;
  for (const e of gcLog) {
    if (e.start < t0 || e.start > t1) continue;
    if (e.kind === perfConstants.NODE_PERFORMANCE_GC_MINOR) minor++;
    else if (e.kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR) major++;
    else other++; // incremental marking steps, weak callbacks
  }
  return { minor, major, other };
}

// ---------------------------------------------------------------------------------------------
// Timing

function runFor(c: Case, ms: number): { seconds: number; units: number } {
  const n = c.batchUnits;
  let units = 0;
  const t0 = performance.now();
  const stop = t0 + ms;
  let t = t0;
  do {
    c.batch(n);
    units += n;
    t = performance.now();
  } while (t < stop);
  return { seconds: (t - t0) / 1000, units };
}

/** Bytes allocated in a window: heapUsed growth plus what every GC inside the window freed. */
function allocatedBytes(h0: number, h1: number, profile: GcProfile): number {
  let freed = 0;
  for (const g of profile.statistics) freed += g.beforeGC.heapStatistics.usedHeapSize - g.afterGC.heapStatistics.usedHeapSize;
  return h1 - h0 + freed;
}

interface GcProfile {
  statistics: Array<{ gcType: string; beforeGC: { heapStatistics: { usedHeapSize: number } }; afterGC: { heapStatistics: { usedHeapSize: number } } }>;
}

async function rep(c: Case, ms: number): Promise<Rep> {
  await drainObserver();
  forceGc();
  const profiler = new v8.GCProfiler();
  profiler.start();
  const h0 = process.memoryUsage().heapUsed;
  const t0 = performance.now();
  const { seconds, units } = runFor(c, ms);
  const t1 = performance.now();
  const hEnd = process.memoryUsage().heapUsed;
  const profile = profiler.stop() as unknown as GcProfile;
  await drainObserver();
  const gcs = countGcs(t0, t1);
  forceGc();
  process.memoryUsage(); // the first read after a full GC can be off by ~250 KB
  const h1 = process.memoryUsage().heapUsed;
  const allocated = allocatedBytes(h0, hEnd, profile);
  if (process.env.BENCH_DEBUG_GC) {
    console.error(`[gc] ${c.id} ${t0.toFixed(1)}..${t1.toFixed(1)} ms: observer ${JSON.stringify(gcs)}, profiler ${profile.statistics.map((g) => g.gcType).join(',') || 'none'}; heap ${h0} -> ${hEnd} -> ${h1}; allocated ${allocated}`);
  }
  return { seconds, units, gcMinor: gcs.minor, gcMajor: gcs.major, gcOther: gcs.other, heapGrowth: h1 - h0, allocated };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * Warms every case up, then runs the repetitions round-robin (rep 1 of every case, then rep 2,
 * ...), so that a noisy neighbour slows all cases of a group alike and in-run ratios stay fair.
 */
export async function measureGroup(cases: Case[], opts: HarnessOptions = DEFAULT_HARNESS, onRep?: (c: Case, r: Rep) => void): Promise<Measured[]> {
  ensureObserver();
  for (const c of cases) runFor(c, opts.warmupMs);
  const reps = new Map<Case, Rep[]>(cases.map((c) => [c, []]));
  for (let i = 0; i < opts.reps; i++) {
    for (const c of cases) {
      const r = await rep(c, opts.repMs);
      reps.get(c)!.push(r);
      onRep?.(c, r);
    }
  }
  return cases.map((c) => summarise(c, reps.get(c)!));
}

function summarise(c: Case, reps: Rep[]): Measured {
  const ups = median(reps.map((r) => r.units / r.seconds));
  const totalUnits = reps.reduce((a, r) => a + r.units, 0);
  const packets = totalUnits * c.packetsPerUnit;
  const mpkt = packets / 1e6;
  const minor = reps.reduce((a, r) => a + r.gcMinor, 0);
  const major = reps.reduce((a, r) => a + r.gcMajor, 0);
  const other = reps.reduce((a, r) => a + r.gcOther, 0);
  const growth = reps.reduce((a, r) => a + r.heapGrowth, 0);
  return {
    id: c.id,
    label: c.label,
    reps,
    unitsPerSec: ups,
    gbps: (ups * c.payloadBytesPerUnit) / 1e9,
    mpps: (ups * c.packetsPerUnit) / 1e6,
    inputMBps: (ups * (c.inputBytesPerUnit ?? c.payloadBytesPerUnit)) / 1e6,
    usPerUnit: 1e6 / ups,
    nsPerPacket: c.packetsPerUnit > 0 ? 1e9 / (ups * c.packetsPerUnit) : 0,
    gcPerMpkt: mpkt > 0 ? (minor + major + other) / mpkt : 0,
    minorGcPerMpkt: mpkt > 0 ? minor / mpkt : 0,
    majorGcPerMpkt: mpkt > 0 ? major / mpkt : 0,
    heapGrowthPerMpkt: mpkt > 0 ? growth / mpkt : 0,
    allocBytesPerPacket: packets > 0 ? reps.reduce((a, r) => a + r.allocated, 0) / packets : 0,
    packets,
  };
}

// ---------------------------------------------------------------------------------------------
// Reporting

/** Formats rows as an aligned plain-text table (first row is the header). */
export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ');
  const out = [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  ')];
  for (const r of rows.slice(1)) out.push(line(r));
  return out.join('\n');
}

export function fmt(x: number, digits = 2): string {
  if (!Number.isFinite(x)) return '-';
  return x.toFixed(digits);
}

export interface Machine {
  date: string;
  nproc: number;
  cpuModel: string;
  node: string;
  v8: string;
  platform: string;
  kernel: string;
  totalMemGiB: number;
  gcExposedByFlag: boolean;
}

export function machine(): Machine {
  let cpuModel = os.cpus()[0]?.model ?? 'unknown';
  try {
    const m = /Model name:\s*(.*)/.exec(execSync('lscpu', { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }));
    if (m) cpuModel = m[1]!.trim();
  } catch {
    /* lscpu missing: os.cpus() model */
  }
  let nproc = os.availableParallelism();
  try {
    nproc = Number(execSync('nproc', { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()) || nproc;
  } catch {
    /* keep availableParallelism */
  }
  return {
    date: new Date().toISOString(),
    nproc,
    cpuModel,
    node: process.version,
    v8: process.versions.v8,
    platform: `${process.platform}-${process.arch}`,
    kernel: os.release(),
    totalMemGiB: Math.round(os.totalmem() / 2 ** 30),
    gcExposedByFlag,
  };
}

/** One line of the run-all summary: a figure, optionally against a same-run baseline. */
export interface SummaryRow {
  bench: string;
  figure: string;
  value: string;
  baseline: string;
  ratio: string;
  target: string;
}

export interface BenchReport {
  name: string;
  summary: SummaryRow[];
  /** Where the machine-readable results went, if anywhere. */
  jsonPath?: string;
}

/** Parses `--filter x`, `--quick`, `--no-json` and `--rep-ms n` style flags shared by benches. */
export function parseArgs(argv: string[]): { filter: string | null; quick: boolean; json: boolean; repMs: number | null; warmupMs: number | null } {
  let filter: string | null = null;
  let quick = false;
  let json = true;
  let repMs: number | null = null;
  let warmupMs: number | null = null;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--filter') filter = argv[++i] ?? null;
    else if (a.startsWith('--filter=')) filter = a.slice(9);
    else if (a === '--quick') quick = true;
    else if (a === '--no-json') json = false;
    else if (a.startsWith('--rep-ms=')) repMs = Number(a.slice(9));
    else if (a.startsWith('--warmup-ms=')) warmupMs = Number(a.slice(12));
  }
  return { filter, quick, json, repMs, warmupMs };
}
