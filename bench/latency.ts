/**
 * Latency (issue 5, benchmark 6): event received → packet on disk, p50 / p99, at the default flush
 * interval (250 ms) and at --flush-interval 10; and event → packet written by `meshcap collect` at
 * the far end of the broker sink.
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
 * Event → broker, at the default flush and at 10 ms: `meshcap serve --broker tls://127.0.0.1:PORT`
 * (mutual TLS, certificates made for the run: bench/lib/pki.ts; serve's own capture off, -w - into
 * /dev/null; default broker format, pcap) forwarding to a local `meshcap collect` child; the reader
 * polls the `.part` file collect writes (found under its directory once collect opens it) the same
 * way. Each sample is flush timer + broker sink + TLS + collect's write + the 1 ms polling: the real
 * far side, not a stand-in. Its baseline is the disk case at the same flush interval, same run.
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
import { brokerPki, brokerServeArgs, collectOpenFile, CollectProc, waitBrokerConnected } from './lib/broker.js';

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
  /** Where the packet had to arrive: serve's capture file, or collect's (through the broker sink). */
  to: 'disk' | 'broker';
  sent: number;
  got: number[];
  missing: number;
}

function marker(id: number): Buffer {
  const b = Buffer.alloc(PAYLOAD, 0x2e);
  b.write(`${MARK}${id.toString(16).padStart(8, '0')}`, 0, 'latin1');
  return b;
}

/**
 * Runs one measurement against a server whose output file is `file`, or the file `file()` names
 * once it exists (collect names its files when it opens them).
 */
async function measure(target: string, file: string | (() => string | null), durationMs: number, meanGapMs: number, settleMs: number): Promise<{ sent: number; lat: number[]; missing: number }> {
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
      const f = typeof file === 'string' ? file : file();
      if (f === null) return;
      try {
        fd = fs.openSync(f, 'r');
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
      results.push({ label: 'null gRPC sink, write on arrival', flushMs: null, background: 0, to: 'disk', sent: r.sent, got: r.lat, missing: r.missing });
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
      results.push({ label, flushMs: c.flush, background: c.background, to: 'disk', sent: r.sent, got: r.lat, missing: r.missing });
    }
    // Through the broker sink to meshcap collect: the default flush, and 10 ms (where the broker
    // path's own share is not hidden in the flush timer's spread).
    const pki = await brokerPki(path.join(dir, 'pki'));
    const brokerCases: Array<{ flush: number; ms: number; gap: number }> = [
      { flush: 250, ms: q ? 3000 : 5000, gap: 20 },
      { flush: 10, ms: q ? 1500 : 2000, gap: 5 },
    ];
    for (const c of brokerCases) {
      const d = path.join(dir, `broker-f${c.flush}`);
      fs.mkdirSync(d);
      const out = path.join(d, 'collect');
      const collect = await CollectProc.start({ pki, dir: out });
      let mc: MeshcapProc | null = null;
      try {
        mc = await MeshcapProc.start({ dir: d, args: ['-w', '-', '--flush-interval', String(c.flush), ...brokerServeArgs(pki, collect, path.join(d, 'spool'))] });
        await waitBrokerConnected(mc, collect);
        const r = await measure(mc.target, () => collectOpenFile(out), c.ms, c.gap, c.flush + 2000);
        const label = `meshcap serve --broker → meshcap collect (mTLS), --flush-interval ${c.flush}${c.flush === 250 ? ' (default)' : ''}`;
        results.push({ label, flushMs: c.flush, background: 0, to: 'broker', sent: r.sent, got: r.lat, missing: r.missing });
      } finally {
        if (mc) await mc.stop();
        await collect.stop();
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const stats = results.map((r) => {
    const s = [...r.got].sort((a, b) => a - b);
    return { ...r, n: s.length, p50: percentile(s, 50), p90: percentile(s, 90), p99: percentile(s, 99), max: s[s.length - 1] ?? NaN, mean: s.reduce((a, b) => a + b, 0) / (s.length || 1) };
  });
  log('\n## Event sent → packet visible in the capture file (ms): serve\'s file, or (--broker) the file meshcap collect writes');
  log(table([['server', 'samples', 'missing', 'p50', 'p90', 'p99', 'max', 'mean', 'target p99'], ...stats.map((s) => [s.label, String(s.n), String(s.missing), fmt(s.p50, 1), fmt(s.p90, 1), fmt(s.p99, 1), fmt(s.max, 1), fmt(s.mean, 1), s.flushMs === null || s.to === 'broker' ? '' : `≤ ${s.flushMs + 10}`])]));
  const base = stats[0]!;
  const summary: SummaryRow[] = [];
  for (const s of stats.slice(1)) {
    if (s.to === 'broker') continue;
    const bg = s.background ? `, ${s.background / MB} MB/s background` : '';
    summary.push({ bench: 'latency', figure: `event → disk p50, flush ${s.flushMs} ms${bg} (ms)`, value: fmt(s.p50, 1), baseline: `null sink ${fmt(base.p50, 1)}`, ratio: '', target: '' });
    summary.push({ bench: 'latency', figure: `event → disk p99, flush ${s.flushMs} ms${bg} (ms)`, value: fmt(s.p99, 1), baseline: `null sink ${fmt(base.p99, 1)}`, ratio: s.missing ? `${s.missing} missing` : '', target: `≤ ${s.flushMs! + 10}` });
  }
  // Event → broker, beside event → disk at the same flush interval (no background), same run.
  for (const s of stats.filter((x) => x.to === 'broker')) {
    const disk = stats.find((x) => x.to === 'disk' && x.flushMs === s.flushMs && x.background === 0)!;
    summary.push({ bench: 'latency', figure: `event → broker (collect's file) p50, flush ${s.flushMs} ms (ms)`, value: fmt(s.p50, 1), baseline: `disk ${fmt(disk.p50, 1)}`, ratio: '', target: '' });
    summary.push({ bench: 'latency', figure: `event → broker (collect's file) p99, flush ${s.flushMs} ms (ms)`, value: fmt(s.p99, 1), baseline: `disk ${fmt(disk.p99, 1)}`, ratio: s.missing ? `${s.missing} missing` : '', target: '' });
  }
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
