/**
 * Latency (issue 5, benchmark 6): event received → packet on disk, p50 / p99, at the default flush
 * interval (250 ms) and at --flush-interval 10.
 *
 * Measured from outside: this process is the Envoy (one StreamTaps stream over the Unix socket,
 * one connection) and the reader. It sends single 64-byte read events at random moments (gaps
 * uniform in 0.5–1.5 × a mean, so they fall at every phase of meshcap's flush timer), each payload
 * carrying a marker with its sequence number, noting the send time; and it polls the capture file
 * (`<file>.part`, open for reading) every millisecond: new bytes are read and searched for markers,
 * and each marker found closes its sample. The same clock on both sides.
 *
 * A third case repeats the default while 8 other sidecars stream 100 MB/s into the same meshcap.
 *
 * Baseline, same run, same method: the null gRPC sink with --append, which writes every message to
 * a file the moment it arrives (fs.writeSync): gRPC delivery + one write + this process's polling,
 * i.e. the floor of what can be observed this way. Target: p99 ≤ flush interval + 10 ms.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/latency.js [--quick] [--no-json]
 */
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { fmt, parseArgs, table, type BenchReport, type SummaryRow } from './harness.js';
import { TapStream } from './lib/h2client.js';
import { Load } from './lib/load.js';
import { MB, MeshcapProc, NullSinkProc, percentile, sleep, tempDir, writeResults } from './lib/procs.js';
import { identifierRequest, streamTapsRequest } from './lib/tapwire.js';

export interface LatencyOptions {
  quick?: boolean;
  json?: boolean;
  log?: (line: string) => void;
}

const MARK = 'MCLAT';
const BACKGROUND_RATE = 100 * MB;
const PAYLOAD = 64;

interface Samples {
  label: string;
  flushMs: number | null;
  background: number;
  sent: number;
  got: number[];
  missing: number;
}

function marker(id: number): Buffer {
  const b = Buffer.alloc(PAYLOAD, 0x2e);
  b.write(`${MARK}${id.toString(16).padStart(8, '0')}`, 0, 'latin1');
  return b;
}

/** Runs one measurement against a server whose output file is `file`. */
async function measure(target: string, file: string, durationMs: number, meanGapMs: number, settleMs: number): Promise<{ sent: number; lat: number[]; missing: number }> {
  const stream = await TapStream.open(target);
  const traceId = 42;
  let seq = 1;
  let ts = 1_763_900_000;
  const event = (payload: Buffer) => {
    const m = streamTapsRequest(traceId, { kind: 'read', tsSec: ts, tsNsec: 0, payload, seqNum: seq });
    seq += payload.length;
    ts += 1;
    return m;
  };
  await stream.write(Buffer.concat([identifierRequest('latency', 'bench'), streamTapsRequest(traceId, { kind: 'connection', local: { address: '10.0.0.1', port: 8443 }, remote: { address: '10.0.0.2', port: 40000 } })]));

  // The reader: poll size every ms, read what is new, find markers.
  const sentAt = new Map<number, number>();
  const lat: number[] = [];
  let fd = -1;
  let pos = 0;
  let tail = Buffer.alloc(0);
  const markBuf = Buffer.from(MARK, 'latin1');
  const poll = () => {
    if (fd < 0) {
      try {
        fd = fs.openSync(file, 'r');
      } catch {
        return;
      }
    }
    const size = fs.fstatSync(fd).size;
    if (size <= pos) return;
    const now = performance.now();
    const chunk = Buffer.allocUnsafe(size - pos);
    const n = fs.readSync(fd, chunk, 0, chunk.length, pos);
    pos += n;
    const hay = tail.length ? Buffer.concat([tail, chunk.subarray(0, n)]) : chunk.subarray(0, n);
    let i = hay.indexOf(markBuf);
    let consumed = 0;
    while (i >= 0 && i + MARK.length + 8 <= hay.length) {
      const id = parseInt(hay.toString('latin1', i + MARK.length, i + MARK.length + 8), 16);
      const t = sentAt.get(id);
      if (t !== undefined) {
        lat.push(now - t);
        sentAt.delete(id);
      }
      consumed = i + MARK.length + 8;
      i = hay.indexOf(markBuf, consumed);
    }
    tail = Buffer.from(hay.subarray(Math.max(consumed, hay.length - (MARK.length + 8))));
  };
  const timer = setInterval(poll, 1);

  // Warm-up event: wait until it is visible, so the file exists and the flow has started.
  sentAt.set(0, performance.now());
  await stream.write(event(marker(0)));
  const w0 = performance.now();
  while (lat.length === 0 && performance.now() - w0 < 5000) await sleep(5);
  lat.length = 0;

  let id = 0;
  const end = performance.now() + durationMs;
  while (performance.now() < end) {
    await sleep(meanGapMs * (0.5 + Math.random()));
    id++;
    const m = event(marker(id));
    sentAt.set(id, performance.now());
    const p = stream.write(m);
    if (p) await p;
  }
  const s0 = performance.now();
  while (sentAt.size > 0 && performance.now() - s0 < settleMs) await sleep(5);
  clearInterval(timer);
  if (fd >= 0) fs.closeSync(fd);
  await stream.end();
  return { sent: id, lat, missing: sentAt.size };
}

export async function runLatencyBench(o: LatencyOptions = {}): Promise<BenchReport> {
  const log = o.log ?? ((l: string) => console.log(l));
  const q = o.quick ?? false;
  const started = Date.now();
  const results: Samples[] = [];
  const dir = tempDir('latency');
  try {
    // Baseline: the null sink appending each message at once.
    {
      const d = path.join(dir, 'null');
      fs.mkdirSync(d);
      const file = path.join(d, 'messages.bin');
      const ns = await NullSinkProc.start(d, file);
      const r = await measure(ns.target, file, q ? 1500 : 3000, 5, 1000);
      await ns.stop();
      results.push({ label: 'null gRPC sink, write on arrival', flushMs: null, background: 0, sent: r.sent, got: r.lat, missing: r.missing });
    }
    const cases: Array<{ flush: number; ms: number; gap: number; background: number }> = [
      { flush: 250, ms: q ? 5000 : 10_000, gap: 20, background: 0 },
      { flush: 10, ms: q ? 2000 : 4000, gap: 5, background: 0 },
      // The same default, while 8 other sidecars stream 100 MB/s (the capture file grows all the time).
      { flush: 250, ms: q ? 3000 : 6000, gap: 20, background: BACKGROUND_RATE },
    ];
    for (const c of cases) {
      const d = path.join(dir, `f${c.flush}-${c.background}`);
      fs.mkdirSync(d);
      const mc = await MeshcapProc.start({ dir: d, file: 'lat.pcapng', args: ['--flush-interval', String(c.flush)] });
      const bg = c.background ? await Load.start({ target: mc.target, sidecars: 8, rate: c.background, durationMs: c.ms + 1000, nodePrefix: 'background' }) : null;
      if (bg) await sleep(500);
      const r = await measure(mc.target, path.join(d, 'lat.pcapng.part'), c.ms, c.gap, c.flush + 2000);
      if (bg) await bg.stop();
      await mc.stop();
      const label = `meshcap serve, --flush-interval ${c.flush}${c.flush === 250 ? ' (default)' : ''}${c.background ? `, ${c.background / MB} MB/s background load` : ''}`;
      results.push({ label, flushMs: c.flush, background: c.background, sent: r.sent, got: r.lat, missing: r.missing });
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const stats = results.map((r) => {
    const s = [...r.got].sort((a, b) => a - b);
    return { ...r, n: s.length, p50: percentile(s, 50), p90: percentile(s, 90), p99: percentile(s, 99), max: s[s.length - 1] ?? NaN, mean: s.reduce((a, b) => a + b, 0) / (s.length || 1) };
  });
  log('\n## Event sent → packet visible in the capture file (ms)');
  log(table([['server', 'samples', 'missing', 'p50', 'p90', 'p99', 'max', 'mean', 'target p99'], ...stats.map((s) => [s.label, String(s.n), String(s.missing), fmt(s.p50, 1), fmt(s.p90, 1), fmt(s.p99, 1), fmt(s.max, 1), fmt(s.mean, 1), s.flushMs === null ? '' : `≤ ${s.flushMs + 10}`])]));
  const base = stats[0]!;
  const summary: SummaryRow[] = [];
  for (const s of stats.slice(1)) {
    const bg = s.background ? `, ${s.background / MB} MB/s background` : '';
    summary.push({ bench: 'latency', figure: `event → disk p50, flush ${s.flushMs} ms${bg} (ms)`, value: fmt(s.p50, 1), baseline: `null sink ${fmt(base.p50, 1)}`, ratio: '', target: '' });
    summary.push({ bench: 'latency', figure: `event → disk p99, flush ${s.flushMs} ms${bg} (ms)`, value: fmt(s.p99, 1), baseline: `null sink ${fmt(base.p99, 1)}`, ratio: s.missing ? `${s.missing} missing` : '', target: `≤ ${s.flushMs! + 10}` });
  }
  summary.push({ bench: 'latency', figure: 'TODO event → broker p50/p99', value: 'TODO', baseline: 'not measured: broker sink in progress', ratio: '', target: '' });
  const elapsed = (Date.now() - started) / 1000;
  log(`\n(latency in ${fmt(elapsed, 1)} s)`);
  const report: BenchReport = { name: 'latency', summary };
  if (o.json !== false) {
    report.jsonPath = writeResults('latency', { elapsedSeconds: elapsed, runs: stats.map(({ got, ...rest }) => ({ ...rest, samplesMs: got.map((x) => Math.round(x * 100) / 100) })), summary });
    log(`results: ${report.jsonPath}`);
  }
  return report;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = parseArgs(process.argv.slice(2));
  const r = await runLatencyBench({ quick: args.quick, json: args.json });
  console.log(`\n${table([['figure', 'value', 'baseline (same run)', 'ratio', 'target'], ...r.summary.map((x) => [x.figure, x.value, x.baseline, x.ratio, x.target])])}`);
}
