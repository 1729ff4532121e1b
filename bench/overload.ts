/**
 * Overload (issue 5, benchmark 4): offered load well above capacity for 60 s (20 s with --quick),
 * then a moderate load, against `meshcap serve` with its default settings (32 MiB of output
 * buffer, flush 250 ms) writing pcapng files rotated every 256 MB (-C 256).
 *
 * Offered: 16 emulated sidecars (bench/loadgen.ts) scheduled at 3000 MB/s of messages in total,
 * about twice what the null gRPC sink takes on this machine and four times meshcap's ingest; HTTP/2
 * flow control makes the generator fall behind that schedule (what Envoy would have to buffer),
 * and whatever meshcap takes but cannot write must be dropped and counted.
 *
 * Measured, every second: message MB/s accepted, pcapng MB/s written, drops by cause, RSS, CPU. At the end: peak
 * RSS (VmHWM, the kernel's own high-water mark), drops by cause in the metrics and in the capture
 * (every completed file's ISB isb_ifdrop / isb_ifrecv, summed; files are checked and deleted as
 * they complete so the disk does not fill; the first file with drops and the last one are scanned
 * whole for the packet comments and epb_dropcount meshcap writes where it lost packets), whether
 * meshcap kept running and exits 0 on SIGTERM, how long its buffers take to drain, and recovery:
 * 100 MB/s for 5 s afterwards must be captured whole, with no new drop.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/overload.js [--quick] [--no-json] [--seconds N]
 */
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { fmt, parseArgs, table, type BenchReport, type SummaryRow } from './harness.js';
import { Load } from './lib/load.js';
import { readIsb, scanPcapng, type PcapngScan } from './lib/pcapng-scan.js';
import { MB, MeshcapProc, MemPoller, cpuSplit, memStatus, sleep, tempDir, writeResults, type Metrics } from './lib/procs.js';

export interface OverloadOptions {
  quick?: boolean;
  json?: boolean;
  log?: (line: string) => void;
  seconds?: number;
}

const OFFERED_RATE = 3000 * MB;
const SIDECARS = 16;
const RECOVERY_RATE = 100 * MB;
const RSS_TARGET_MIB = 256;

interface Sample {
  t: number;
  ingestMBps: number;
  writtenMBps: number;
  drops: Record<string, number>;
  rssMiB: number;
  cpuMain: number;
  cpuOthers: number;
}

interface Counters {
  ingestMsgs: number;
  ingestBytes: number;
  payload: number;
  packets: number;
  written: number;
  writtenBytes: number;
  drops: Record<string, number>;
  dropTotal: number;
}

function counters(m: Metrics): Counters {
  const drops: Record<string, number> = {};
  for (const [labels, v] of m.series('meshcap_dropped_packets_total')) drops[/cause="([^"]+)"/.exec(labels)?.[1] ?? labels] = v;
  return {
    ingestMsgs: m.sum('meshcap_ingest_messages_total', 'source="grpc"'),
    ingestBytes: m.sum('meshcap_ingest_bytes_total', 'source="grpc"'),
    payload: m.sum('meshcap_payload_bytes_total'),
    packets: m.sum('meshcap_packets_total'),
    written: m.sum('meshcap_sink_packets_written_total'),
    writtenBytes: m.sum('meshcap_sink_written_bytes_total'),
    drops,
    dropTotal: Object.values(drops).reduce((a, b) => a + b, 0),
  };
}

/** Completed capture files: ISBs summed, each deleted once read; a few scanned whole first. */
class FileTally {
  files = 0;
  isbRecv = 0;
  isbDrop = 0;
  missingIsb = 0;
  scans: Array<{ file: string; scan: PcapngScan }> = [];
  private readonly seen = new Set<string>();
  constructor(
    private readonly dir: string,
    private readonly stem: string,
  ) {}
  poll(scanIfDrops: boolean): void {
    for (const f of fs.readdirSync(this.dir)) {
      if (!f.startsWith(this.stem) || !f.endsWith('.pcapng') || this.seen.has(f)) continue;
      this.seen.add(f);
      const p = path.join(this.dir, f);
      const isb = readIsb(p);
      if (!isb) this.missingIsb++;
      else {
        this.isbRecv += isb.recv;
        this.isbDrop += isb.drop;
        if (scanIfDrops && isb.drop > 0 && this.scans.length === 0) this.scans.push({ file: f, scan: scanPcapng(p, { sampleComments: 3 }) });
      }
      this.files++;
      fs.rmSync(p, { force: true });
    }
  }
}

export async function runOverloadBench(o: OverloadOptions = {}): Promise<BenchReport> {
  const log = o.log ?? ((l: string) => console.log(l));
  const seconds = o.seconds ?? (o.quick ? 20 : 60);
  const recoveryMs = o.quick ? 3000 : 5000;
  const started = Date.now();
  const dir = tempDir('overload');
  const stem = 'ovl';
  try {
    const mc = await MeshcapProc.start({ dir, file: `${stem}.pcapng`, args: ['-C', '256'] });
    await sleep(300);
    const idleRss = memStatus(mc.pid).rss;
    const mem = new MemPoller(mc.pid, 50);
    const tally = new FileTally(dir, stem);
    log(`\n## Overload: ${SIDECARS} sidecars offered ${OFFERED_RATE / MB} MB/s of messages for ${seconds} s; meshcap defaults (32 MiB buffer, flush 250 ms), -C 256`);
    const load = await Load.start({ target: mc.target, sidecars: SIDECARS, rate: OFFERED_RATE, durationMs: seconds * 1000 });
    const samples: Sample[] = [];
    const c0 = counters(await mc.scrape());
    let prev = c0;
    let prevCpu = cpuSplit(mc.pid);
    const t0 = performance.now();
    let tPrev = t0;
    let crashed = false;
    for (let s = 1; s <= seconds; s++) {
      await sleep(Math.max(0, t0 + s * 1000 - performance.now()));
      if (mc.exitedWith) {
        crashed = true;
        break;
      }
      let c: Counters;
      try {
        c = counters(await mc.scrape());
      } catch {
        crashed = mc.exitedWith !== null;
        if (crashed) break;
        continue;
      }
      const now = performance.now();
      const cpu = cpuSplit(mc.pid);
      const dt = (now - tPrev) / 1000;
      const sample: Sample = {
        t: (now - t0) / 1000,
        ingestMBps: (c.ingestBytes - prev.ingestBytes) / dt / MB,
        writtenMBps: (c.writtenBytes - prev.writtenBytes) / dt / MB,
        drops: Object.fromEntries(Object.entries(c.drops).map(([k, v]) => [k, v - (prev.drops[k] ?? 0)])),
        rssMiB: memStatus(mc.pid).rss / 2 ** 20,
        cpuMain: (cpu.main - prevCpu.main) / dt,
        cpuOthers: (cpu.others - prevCpu.others) / dt,
      };
      samples.push(sample);
      prev = c;
      prevCpu = cpu;
      tPrev = now;
      tally.poll(true);
    }
    const loadDone = await load.stop();
    const tEnd = performance.now();
    // Drain: until every packet made is written or counted dropped.
    let drainMs = NaN;
    let after = prev;
    for (let i = 0; i < 200 && !mc.exitedWith; i++) {
      after = counters(await mc.scrape());
      // Packets made are either written or dropped by a sink (no_buffer drops were never made).
      if (after.written + (after.drops.sink_backpressure ?? 0) + (after.drops.sink_error ?? 0) >= after.packets) {
        drainMs = performance.now() - tEnd;
        break;
      }
      await sleep(25);
    }
    const overloadEnd = after;
    const overloadSec = (tEnd - t0) / 1000;
    const peakDuringOverload = memStatus(mc.pid).hwm;

    // Recovery: a moderate load must be captured whole.
    log(`recovery: ${RECOVERY_RATE / MB} MB/s for ${recoveryMs / 1000} s`);
    const rec = await Load.start({ target: mc.target, sidecars: 8, rate: RECOVERY_RATE, durationMs: recoveryMs, nodePrefix: 'recovery' });
    const recDone = await rec.done;
    await sleep(600);
    const recEnd = counters(await mc.scrape());
    tally.poll(false);
    mem.stop();
    const exit = await mc.stop();
    // The last file (completed at shutdown): ISB, and a whole scan.
    const lastFiles = fs.readdirSync(dir).filter((f) => f.startsWith(stem) && f.endsWith('.pcapng'));
    for (const f of lastFiles) tally.scans.push({ file: f, scan: scanPcapng(path.join(dir, f), { sampleComments: 3 }) });
    tally.poll(false);

    const recovery = {
      sent: recDone.sent,
      statusesOk: recDone.statuses.every((s) => s === 0),
      ingested: recEnd.ingestMsgs - overloadEnd.ingestMsgs,
      packets: recEnd.packets - overloadEnd.packets,
      written: recEnd.written - overloadEnd.written,
      newDrops: recEnd.dropTotal - overloadEnd.dropTotal,
    };
    const recoveryOk = recovery.statusesOk && recovery.ingested === recDone.sent.messages && recovery.packets === recDone.sent.packets && recovery.written === recovery.packets && recovery.newDrops === 0;

    const offeredMBps = (loadDone.offeredMsgBytes ?? 0) / overloadSec / MB;
    const acceptedMBps = (overloadEnd.ingestBytes - c0.ingestBytes) / overloadSec / MB;
    const payloadIn = (overloadEnd.payload - c0.payload) / overloadSec / MB;
    const writtenMBps = (overloadEnd.writtenBytes - c0.writtenBytes) / overloadSec / MB;
    // Share of the packets due: those made plus those the slicer could not make (no free block).
    const due = overloadEnd.packets + (overloadEnd.drops.no_buffer ?? 0) + (overloadEnd.drops.flow_table_full ?? 0);
    const dropShare = due > 0 ? overloadEnd.dropTotal / due : 0;
    const peakMiB = Math.max(mem.hwm, peakDuringOverload) / 2 ** 20;
    const commentsSeen = tally.scans.reduce((a, s) => a + s.scan.dropComments, 0);
    const dropCountSeen = tally.scans.reduce((a, s) => a + s.scan.dropCount, 0);

    // Per-second table, compressed to ~12 rows.
    const every = Math.max(1, Math.round(samples.length / 12));
    const rows = [['t (s)', 'accepted MB/s', 'written MB/s', 'new drops (by cause)', 'RSS MiB', 'CPU main', 'CPU other thr']];
    for (let i = 0; i < samples.length; i += every) {
      const grp = samples.slice(i, i + every);
      const avg = (f: (x: Sample) => number) => grp.reduce((a, x) => a + f(x), 0) / grp.length;
      const d: Record<string, number> = {};
      for (const x of grp) for (const [k, v] of Object.entries(x.drops)) d[k] = (d[k] ?? 0) + v;
      rows.push([
        `${fmt(grp[0]!.t - 1, 0)}–${fmt(grp[grp.length - 1]!.t, 0)}`,
        fmt(avg((x) => x.ingestMBps), 0),
        fmt(avg((x) => x.writtenMBps), 0),
        Object.entries(d).filter(([, v]) => v > 0).map(([k, v]) => `${k} ${v}`).join(', ') || '0',
        fmt(Math.max(...grp.map((x) => x.rssMiB)), 0),
        fmt(avg((x) => x.cpuMain), 2),
        fmt(avg((x) => x.cpuOthers), 2),
      ]);
    }
    log(table(rows));
    log(
      `offered ${fmt(offeredMBps, 0)} MB/s of messages, accepted ${fmt(acceptedMBps, 0)} MB/s (the rest was held back by HTTP/2 flow control: the senders' problem); ` +
        `payload sliced into packets ${fmt(payloadIn, 0)} MB/s, pcapng written ${fmt(writtenMBps, 0)} MB/s`,
    );
    log(`drops (metrics): ${JSON.stringify(overloadEnd.drops)} = ${fmt(100 * dropShare, 1)}% of ${due} packets due; drained ${fmt(drainMs, 0)} ms after the load stopped`);
    log(`capture: ${tally.files} files, ISB isb_ifrecv ${tally.isbRecv} (metrics: written ${recEnd.written}), isb_ifdrop ${tally.isbDrop} (metrics: dropped ${recEnd.dropTotal})${tally.missingIsb ? `, ${tally.missingIsb} file(s) without ISB` : ''}`);
    for (const s of tally.scans) log(`  scanned ${s.file}: ${s.scan.packets} packets, ${s.scan.dropComments} drop comments, epb_dropcount total ${s.scan.dropCount}, ISB ifdrop ${s.scan.isbDrop}${s.scan.sampleComments.length ? `; e.g. "${s.scan.sampleComments.find((c) => c.includes('dropped')) ?? s.scan.sampleComments[0]}"` : ''}`);
    log(`peak RSS ${fmt(peakMiB, 0)} MiB (idle ${fmt(idleRss / 2 ** 20, 0)} MiB); meshcap ${crashed ? 'CRASHED' : 'kept running'}, exit on SIGTERM: ${exit.code ?? exit.signal}`);
    log(`recovery at ${RECOVERY_RATE / MB} MB/s: ${recovery.ingested}/${recDone.sent.messages} messages, ${recovery.written}/${recDone.sent.packets} packets written, ${recovery.newDrops} new drops → ${recoveryOk ? 'recovered' : 'NOT RECOVERED'}`);

    const captureAgrees = tally.isbDrop === recEnd.dropTotal && tally.isbRecv === recEnd.written && tally.missingIsb === 0;
    const summary: SummaryRow[] = [
      { bench: 'overload', figure: `peak RSS, ${seconds} s at ${OFFERED_RATE / MB} MB/s offered (MiB)`, value: fmt(peakMiB, 0), baseline: `idle ${fmt(idleRss / 2 ** 20, 0)}`, ratio: '', target: `≤ ${RSS_TARGET_MIB}` },
      { bench: 'overload', figure: 'messages accepted under overload (MB/s)', value: fmt(acceptedMBps, 0), baseline: `offered ${fmt(offeredMBps, 0)}`, ratio: `${fmt((100 * acceptedMBps) / offeredMBps, 0)}%`, target: '' },
      { bench: 'overload', figure: 'pcapng written under overload (MB/s)', value: fmt(writtenMBps, 0), baseline: `messages accepted ${fmt(acceptedMBps, 0)}`, ratio: `${fmt((100 * writtenMBps) / acceptedMBps, 0)}%`, target: '' },
      {
        bench: 'overload',
        figure: 'packets dropped, by cause (metrics)',
        value: Object.entries(overloadEnd.drops).map(([k, v]) => `${k} ${v}`).join(', ') || '0',
        baseline: `of ${due} due`,
        ratio: `${fmt(100 * dropShare, 1)}%`,
        target: 'counted',
      },
      { bench: 'overload', figure: 'drops in the capture: Σ ISB isb_ifdrop', value: String(tally.isbDrop), baseline: `metrics ${recEnd.dropTotal}`, ratio: captureAgrees ? 'equal' : 'DIFFERENT', target: 'equal' },
      { bench: 'overload', figure: 'drop comments / epb_dropcount in scanned files', value: `${commentsSeen} / ${dropCountSeen}`, baseline: `${tally.scans.length} file(s) scanned`, ratio: '', target: '' },
      { bench: 'overload', figure: 'crashes; exit code on SIGTERM', value: `${crashed ? 'CRASHED' : 'none'}; ${exit.code ?? exit.signal}`, baseline: '', ratio: '', target: 'none; 0' },
      { bench: 'overload', figure: 'time to drain buffers after the load stopped (ms)', value: fmt(drainMs, 0), baseline: '', ratio: '', target: '' },
      { bench: 'overload', figure: `recovery: new drops at ${RECOVERY_RATE / MB} MB/s after overload`, value: String(recovery.newDrops), baseline: `${recovery.written}/${recDone.sent.packets} packets written`, ratio: recoveryOk ? 'recovered' : 'NOT RECOVERED', target: '0' },
    ];
    const elapsed = (Date.now() - started) / 1000;
    log(`\n(overload in ${fmt(elapsed, 1)} s)`);
    const report: BenchReport = { name: 'overload', summary };
    if (o.json !== false) {
      report.jsonPath = writeResults('overload', {
        settings: { seconds, offeredRate: OFFERED_RATE, sidecars: SIDECARS, recoveryRate: RECOVERY_RATE, recoveryMs, meshcapArgs: ['-C', '256'] },
        elapsedSeconds: elapsed,
        samples,
        overload: { offeredMBps, acceptedMBps, payloadIn, writtenMBps, drops: overloadEnd.drops, dropShare, drainMs, loadgen: { sent: loadDone.sent, statuses: loadDone.statuses, cpuSeconds: loadDone.cpuSeconds } },
        capture: { files: tally.files, isbRecv: tally.isbRecv, isbDrop: tally.isbDrop, missingIsb: tally.missingIsb, scans: tally.scans },
        memory: { idleRss, peakRss: peakMiB * 2 ** 20, maxPolledRss: mem.maxRss },
        exit,
        crashed,
        recovery: { ...recovery, ok: recoveryOk },
        summary,
      });
      log(`results: ${report.jsonPath}`);
    }
    return report;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = parseArgs(process.argv.slice(2));
  const argv = process.argv.slice(2);
  const seconds = argv.includes('--seconds') ? Number(argv[argv.indexOf('--seconds') + 1]) : undefined;
  const r = await runOverloadBench({ quick: args.quick, json: args.json, ...(seconds ? { seconds } : {}) });
  console.log(`\n${table([['figure', 'value', 'baseline (same run)', 'ratio', 'target'], ...r.summary.map((x) => [x.figure, x.value, x.baseline, x.ratio, x.target])])}`);
}
