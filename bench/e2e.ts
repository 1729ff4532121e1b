/**
 * End to end (issue 5, benchmark 2): emulated Envoy sidecars → `meshcap serve` → pcapng on disk, and
 * → broker sink → `meshcap collect` over mutual TLS, against a null grpc-js sink that receives the
 * same streams and only counts bytes.
 *
 * Processes: the load generator (bench/loadgen.ts: N sidecars, one HTTP/2 connection and one
 * StreamTaps stream each, over a Unix socket, replaying a seeded mix of many interleaved
 * connections with 64 KiB and 4 KiB events and seq_num) and the server under test, each a child of
 * this process. In every repetition both servers get the same offered load (as fast as HTTP/2 flow
 * control admits), one after the other, the order alternating between repetitions.
 *
 *   saturated   figures over a window after a warm-up: payload MB/s ingested (message bytes counted
 *               by the server × the script's payload share, the same measure for both), payload MB/s
 *               captured (ingested × packets written / packets due), drops by cause, CPU of
 *               each process (main thread and other threads), peak RSS. meshcap writes a ring
 *               (-C 256 -W 2) so the disk never fills.
 *   null+disk   the null sink also writing what it receives to disk as a capture writer at its best
 *               would (writev of everything pending, one write in flight, ring of 256 MB files, 16 MiB
 *               bound): the ceiling of gRPC ingest + this machine's disk, for the captured figure.
 *   complete    moderate load (100 MB/s, no ring), run first, on a quiet disk: every message sent is
 *               ingested, every packet the script implies is made and written (metrics), the file
 *               holds exactly that many EPBs, its ISB agrees, and nothing was dropped.
 *   broker      the same saturating load into `meshcap serve --broker tls://127.0.0.1:PORT` (mutual TLS,
 *               certificates made for the run with openssl: bench/lib/pki.ts), its own disk capture
 *               off (-w - into /dev/null) and no spool (--spool-max 0), default broker format
 *               (classic pcap) and queue (64 MiB), forwarding to a local `meshcap collect` child
 *               (acknowledged, exactly-once protocol) that writes a ring (-C 256 -W 2): payload MB/s
 *               delivered = ingested × packets collect wrote (its /metrics) / packets due, the
 *               measure of the disk case with collect's files in place of serve's. One disk writer
 *               (collect), as in the disk case (serve's file sink); what the broker sink cannot
 *               send is dropped when its queue is full, as the file sink drops what the disk cannot
 *               take. Drops of the broker sink are reported apart from the file sink's (/dev/null).
 *   broker complete  the moderate load through the same path (with the default 1 GB spool, which
 *               stays empty when nothing falls behind) into collect without a ring: once the broker
 *               sink reports nothing undelivered, collect's files (completed by SIGTERM) are read back
 *               (bench/lib/pcap-scan.ts: records, and TCP payload from the headers) and must hold
 *               every packet serve made and every payload byte sent, with 0 drops, 0 gaps, 0
 *               duplicates.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/e2e.js [--quick] [--no-json] [--profile DIR] [--hand-off] [--raw-h2]
 * --profile DIR adds one saturated meshcap run under `node --cpu-prof` and prints where its main
 * thread's time goes (bench/tools/cpuprofile-categories.ts). --hand-off adds the null sink handing
 * every message to a second thread (null-sink.ts): the ceiling of a two-thread meshcap. --raw-h2
 * adds the null sink on node:http2 without grpc-js: what the library costs.
 */
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { fmt, parseArgs, table, type BenchReport, type SummaryRow } from './harness.js';
import { Load, type LoadDone } from './lib/load.js';
import { scanPcapng } from './lib/pcapng-scan.js';
import { MB, MeshcapProc, NullSinkProc, cpuSplit, memStatus, sleep, tempDir, writeResults, type Metrics } from './lib/procs.js';
import { selfCheck } from './lib/tapwire.js';
import { brokerPki, brokerServeArgs, collectedFiles, CollectProc, waitBrokerConnected, type BenchPki } from './lib/broker.js';
import { scanPcaps } from './lib/pcap-scan.js';
import { categorize } from './tools/cpuprofile-categories.js';

export interface E2eOptions {
  quick?: boolean;
  json?: boolean;
  log?: (line: string) => void;
  profileDir?: string | null;
  sidecars?: number;
  /**
   * Also run the null sink handing every message to a second thread (null-sink.ts --hand-off): the
   * ceiling of a meshcap whose capture pipeline ran beside the gRPC thread. Not in `npm run bench`.
   */
  handOff?: boolean;
  /**
   * Also run the null sink on node:http2 without grpc-js (null-sink.ts --raw-h2): what gRPC ingest
   * costs without the library. Not in `npm run bench`.
   */
  rawH2?: boolean;
  /** Also run meshcap serve with the experimental node:http2 door (MESHCAP_INGEST_H2=1). Not in `npm run bench`. */
  h2Door?: boolean;
  /** Also run the null sink writing what it receives by direct I/O (null-sink.ts --direct). Not in `npm run bench`. */
  directSink?: boolean;
  /** Saturated repetitions (default: 2, or 1 with quick): more for an A/B series on a noisy host. */
  reps?: number;
  /** Run only these kinds of saturated runs (e.g. null, meshcap, meshcap-h2); default all. */
  only?: string[];
}

interface Settings {
  reps: number;
  warmMs: number;
  measureMs: number;
  sidecars: number;
  moderateRate: number;
  moderateMs: number;
}

type Kind = 'null' | 'null-disk' | 'null-direct' | 'null-hand-off' | 'null-raw-h2' | 'meshcap' | 'meshcap-h2' | 'broker';

interface SatRun {
  kind: Kind;
  rep: number;
  seconds: number;
  /** Payload MB/s through gRPC into the server. */
  ingestMBps: number;
  /** Payload MB/s that reached the capture file (the null sink writes nothing: its ingest). */
  capturedMBps: number;
  msgMBps: number;
  cpu: { serverMain: number; serverOthers: number; loadgen: number; collect?: number };
  dropShare: number;
  drops: Record<string, number>;
  peakRssMiB: number;
  streamsOk: boolean;
  exit: string;
  /** Broker runs: what collect wrote in the window, and the sink's state when the load stopped. */
  broker?: {
    collectPackets: number;
    collectRecordMBps: number;
    sentMBps: number;
    queueMiB: number;
    undelivered: number;
    /** Packets the broker sink dropped (meshcap_broker_dropped_packets_total), and the rest of the pipeline's drops (serve's file sink, writing to /dev/null). */
    brokerDrops: number;
    otherDrops: number;
    /** Every drop of the pipeline by cause, and the broker connection's history (metrics). */
    dropsByCause: Record<string, number>;
    connections: number;
    disconnects: number;
    connectFailures: number;
  };
}

/** serve's ring, plus any extra serve flags for an A/B (MESHCAP_BENCH_SERVE_ARGS="--buffer-size 128"). */
const RING = ['-C', '256', '-W', '2', ...(process.env.MESHCAP_BENCH_SERVE_ARGS?.split(' ').filter(Boolean) ?? [])];
/** null-sink.ts options of the optional baselines. */
const NULL_FLAGS: Partial<Record<Kind, string[]>> = { 'null-direct': ['--direct'], 'null-hand-off': ['--hand-off'], 'null-raw-h2': ['--raw-h2'] };
const LABEL: Record<Kind, string> = { null: 'null gRPC sink', 'null-disk': 'null sink + disk writer', 'null-direct': 'null sink + direct-I/O writer', 'null-hand-off': 'null sink + hand-off thread', 'null-raw-h2': 'null sink on node:http2 alone', meshcap: 'meshcap serve', 'meshcap-h2': 'meshcap serve, node:http2 door', broker: 'meshcap serve → broker → collect' };

function settings(quick: boolean, sidecars?: number): Settings {
  return quick
    ? { reps: 1, warmMs: 1000, measureMs: 1500, sidecars: sidecars ?? 8, moderateRate: 100 * MB, moderateMs: 2000 }
    : { reps: 2, warmMs: 1500, measureMs: 3000, sidecars: sidecars ?? 8, moderateRate: 100 * MB, moderateMs: 4000 };
}

async function saturated(kind: Kind, rep: number, s: Settings, profileDir?: string, pki?: BenchPki): Promise<SatRun> {
  const runDir = tempDir(`e2e-${kind}`);
  let collect: CollectProc | null = null;
  let server: MeshcapProc | NullSinkProc | null = null;
  try {
    if (kind === 'broker') {
      if (!pki) throw new Error('broker run without certificates');
      collect = await CollectProc.start({ pki, dir: path.join(runDir, 'collect'), args: RING });
      // -w - : serve's own capture goes to standard output, which is /dev/null here (disk off).
      // --spool-max 0: no spool, so that one disk is written (collect's), as in the disk case; a
      // broker sink that falls behind drops the newest packets when its 64 MiB queue is full (as
      // the file sink drops blocks), instead of detouring everything through its spool on disk.
      server = await MeshcapProc.start({ dir: runDir, args: ['-w', '-', ...brokerServeArgs(pki, collect, path.join(runDir, 'spool'), ['--spool-max', '0'])] });
      await waitBrokerConnected(server, collect);
    } else {
      server =
        kind === 'meshcap' || kind === 'meshcap-h2'
          ? await MeshcapProc.start({ dir: runDir, args: RING, ...(profileDir ? { cpuProfDir: profileDir } : {}), ...(kind === 'meshcap-h2' ? { env: { MESHCAP_INGEST_H2: '1' } } : {}) })
          : await NullSinkProc.start(runDir, undefined, kind === 'null-disk' || kind === 'null-direct' ? runDir : undefined, NULL_FLAGS[kind] ?? []);
    }
    const srv = server;
    const load = await Load.start({ target: srv.target, sidecars: s.sidecars, durationMs: s.warmMs + s.measureMs + 5000 });
    const read = async () => {
      if (srv instanceof NullSinkProc) {
        const st = await srv.stats();
        // For the disk-writing null sink, "packets" are message bytes and "written" bytes on disk.
        // With --hand-off, "written" is what the second thread has copied.
        return { msg: st.bytes, packets: st.bytes, written: kind === 'null-hand-off' ? st.handedOffBytes : st.writtenBytes, notMade: 0, drops: {} as Record<string, number>, droppedBytes: st.droppedBytes, collectBytes: 0, brokerSentBytes: 0, brokerDrops: 0 };
      }
      const [m, c] = await Promise.all([srv.scrape(), collect ? collect.scrape() : Promise.resolve(null)]);
      const drops: Record<string, number> = {};
      for (const [labels, v] of m.series('meshcap_dropped_packets_total')) drops[/cause="([^"]+)"/.exec(labels)?.[1] ?? labels] = v;
      // Packets the slicer could not even make (no free block) are not in meshcap_packets_total.
      const notMade = (drops.no_buffer ?? 0) + (drops.flow_table_full ?? 0);
      // Written: to serve's file, or (broker) into collect's files.
      const written = c ? c.sum('meshcap_collect_packets_total') : m.sum('meshcap_sink_packets_written_total');
      return {
        msg: m.sum('meshcap_ingest_bytes_total', 'source="grpc"'),
        packets: m.sum('meshcap_packets_total'),
        written,
        notMade,
        drops,
        droppedBytes: 0,
        collectBytes: c ? c.sum('meshcap_collect_written_bytes_total') : 0,
        brokerSentBytes: m.sum('meshcap_broker_sent_bytes_total'),
        brokerDrops: m.sum('meshcap_broker_dropped_packets_total'),
      };
    };
    await sleep(s.warmMs);
    const a = await read();
    const ca = cpuSplit(server.pid);
    const cca = collect ? cpuSplit(collect.pid).total : 0;
    const la = load.pids.map((p) => cpuSplit(p).total);
    const ta = performance.now();
    await sleep(s.measureMs);
    const b = await read();
    const tb = performance.now();
    const cb = cpuSplit(server.pid);
    const ccb = collect ? cpuSplit(collect.pid).total : 0;
    const lb = load.pids.map((p) => cpuSplit(p).total);
    const done: LoadDone = await load.stop();
    const sec = (tb - ta) / 1000;
    let exit = 'running';
    let peak = memStatus(server.pid).hwm;
    let drops: Record<string, number> = {};
    let dropShare = 0;
    let broker: SatRun['broker'];
    const dPackets = b.packets - a.packets + (b.notMade - a.notMade);
    const dWritten = b.written - a.written;
    if (server instanceof MeshcapProc) {
      if (collect) {
        const m = await server.scrape();
        broker = {
          collectPackets: dWritten,
          collectRecordMBps: (b.collectBytes - a.collectBytes) / sec / MB,
          sentMBps: (b.brokerSentBytes - a.brokerSentBytes) / sec / MB,
          queueMiB: m.sum('meshcap_broker_queue_bytes') / 2 ** 20,
          undelivered: m.sum('meshcap_broker_undelivered_packets'),
          brokerDrops: 0,
          otherDrops: 0,
          dropsByCause: {},
          connections: m.sum('meshcap_broker_connections_total'),
          disconnects: m.sum('meshcap_broker_disconnects_total'),
          connectFailures: m.sum('meshcap_broker_connect_failures_total'),
        };
      }
      await sleep(300);
      const end = await read();
      drops = end.drops;
      const total = Object.values(drops).reduce((x, y) => x + y, 0);
      dropShare = end.packets + end.notMade > 0 ? total / (end.packets + end.notMade) : 0;
      if (broker) {
        // Only what the broker path lost counts here; the file sink's own drops (its capture goes
        // to /dev/null in this run) are kept apart.
        broker.brokerDrops = end.brokerDrops;
        broker.otherDrops = total - end.brokerDrops;
        broker.dropsByCause = { ...end.drops };
        drops = end.brokerDrops > 0 ? { broker_sink: end.brokerDrops } : {};
        dropShare = end.packets + end.notMade > 0 ? end.brokerDrops / (end.packets + end.notMade) : 0;
      }
      peak = memStatus(server.pid).hwm;
      const e = await server.stop();
      exit = e.code === 0 ? 'exit 0' : `exit ${e.code ?? e.signal}: ${server.log.slice(-500)}`;
      if (collect) {
        const ce = await collect.stop();
        exit += ce.code === 0 ? ', collect exit 0' : `, collect exit ${ce.code ?? ce.signal}: ${collect.log.slice(-500)}`;
        // Nothing delivered in the window is a failure of the run, not a figure: say why.
        if (dWritten <= 0) exit += `; NOTHING DELIVERED (${JSON.stringify(broker)}); serve log: ${server.log.slice(-1500)}; collect log: ${collect.log.slice(-1000)}`;
      }
    } else {
      if (kind === 'null-disk' || kind === 'null-direct') {
        const end = await read();
        dropShare = end.msg > 0 ? end.droppedBytes / end.msg : 0;
        if (end.droppedBytes > 0) drops = { disk_behind: end.droppedBytes };
      }
      await server.stop();
      exit = 'stopped';
    }
    // Payload ingested: message bytes × the script's payload share (the same measure for both servers).
    const ingest = ((b.msg - a.msg) * load.info.payloadPerMsgByte) / sec / MB;
    return {
      kind,
      rep,
      seconds: sec,
      ingestMBps: ingest,
      capturedMBps: kind === 'null' || kind === 'null-raw-h2' ? ingest : dPackets > 0 ? ingest * Math.min(1, dWritten / dPackets) : 0,
      msgMBps: (b.msg - a.msg) / sec / MB,
      cpu: {
        serverMain: (cb.main - ca.main) / sec,
        serverOthers: (cb.others - ca.others) / sec,
        loadgen: lb.reduce((x, y, i) => x + y - la[i]!, 0) / sec,
        ...(collect ? { collect: (ccb - cca) / sec } : {}),
      },
      dropShare,
      drops,
      peakRssMiB: peak / 2 ** 20,
      streamsOk: done.statuses.every((st) => st === 0) && done.errors.length === 0,
      exit,
      ...(broker ? { broker } : {}),
    };
  } finally {
    // After a failure: nothing of this run may outlive it.
    if (server instanceof MeshcapProc && !server.exitedWith) await server.stop(2000);
    if (collect && !collect.exitedWith) await collect.stop(2000);
    fs.rmSync(runDir, { recursive: true, force: true });
  }
}

/** What both completeness checks report of the load and of serve's counters. */
interface LoadCounts {
  rateMBps: number;
  seconds: number;
  sent: LoadDone['sent'];
  ingested: number;
  packets: number;
  drops: number;
}

function loadCounts(s: Settings, done: LoadDone, m: Metrics): LoadCounts {
  return {
    rateMBps: s.moderateRate / MB,
    seconds: done.wallMs / 1000,
    sent: done.sent,
    ingested: m.sum('meshcap_ingest_messages_total', 'source="grpc"'),
    packets: m.sum('meshcap_packets_total'),
    drops: m.sum('meshcap_dropped_packets_total'),
  };
}

/** What both checks require of the load: clean streams, every message ingested, every packet made. */
function loadProblems(done: LoadDone, r: LoadCounts): string[] {
  const p: string[] = [];
  if (!done.statuses.every((st) => st === 0)) p.push(`stream statuses ${JSON.stringify(done.statuses)} ${done.messages.join('; ')}`);
  if (r.ingested !== done.sent.messages) p.push(`messages: sent ${done.sent.messages}, ingested ${r.ingested}`);
  if (r.packets !== done.sent.packets) p.push(`packets: expected ${done.sent.packets}, made ${r.packets}`);
  return p;
}

interface Completeness extends LoadCounts {
  written: number;
  filePackets: number;
  isbRecv: number | null;
  isbDrop: number | null;
  ok: boolean;
  problems: string[];
}

async function complete(s: Settings): Promise<Completeness> {
  const dir = tempDir('e2e-complete');
  try {
    const server = await MeshcapProc.start({ dir });
    const load = await Load.start({ target: server.target, sidecars: s.sidecars, durationMs: s.moderateMs, rate: s.moderateRate });
    const done = await load.done;
    await sleep(600); // two flush intervals
    const m = await server.scrape();
    const e = await server.stop();
    const scan = scanPcapng(server.capture);
    const r: Completeness = {
      ...loadCounts(s, done, m),
      written: m.sum('meshcap_sink_packets_written_total'),
      filePackets: scan.packets,
      isbRecv: scan.isbRecv,
      isbDrop: scan.isbDrop,
      ok: false,
      problems: [],
    };
    const p = r.problems;
    p.push(...loadProblems(done, r));
    if (r.written !== r.packets) p.push(`packets made ${r.packets}, written ${r.written}`);
    if (r.drops !== 0) p.push(`drops ${r.drops}: ${JSON.stringify(m.series('meshcap_dropped_packets_total'))}`);
    if (r.filePackets !== r.packets) p.push(`file holds ${r.filePackets} packets, meshcap made ${r.packets}`);
    if (r.isbRecv !== r.filePackets || r.isbDrop !== 0) p.push(`ISB ifrecv ${r.isbRecv} ifdrop ${r.isbDrop}`);
    if (e.code !== 0) p.push(`meshcap exit ${e.code ?? e.signal}`);
    const errs = m.series('meshcap_ingest_errors_total').filter(([, v]) => v > 0);
    if (errs.length) p.push(`ingest errors ${JSON.stringify(errs)}`);
    r.ok = p.length === 0;
    return r;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

interface BrokerCompleteness extends LoadCounts {
  /** Packets the broker sink accepted / collect acknowledged (serve's view). */
  accepted: number;
  delivered: number;
  resent: number;
  /** collect's own counts. */
  collectPackets: number;
  duplicates: number;
  gaps: number;
  /** Read back from collect's files. */
  files: number;
  filePackets: number;
  filePayload: number;
  partFiles: number;
  trailing: number;
  /** From the end of the load until the broker sink had nothing undelivered. */
  drainMs: number;
  ok: boolean;
  problems: string[];
}

async function completeBroker(s: Settings, pki: BenchPki): Promise<BrokerCompleteness> {
  const dir = tempDir('e2e-broker-complete');
  let collect: CollectProc | null = null;
  let server: MeshcapProc | null = null;
  try {
    const out = path.join(dir, 'collect');
    collect = await CollectProc.start({ pki, dir: out });
    server = await MeshcapProc.start({ dir, args: ['-w', '-', ...brokerServeArgs(pki, collect, path.join(dir, 'spool'))] });
    await waitBrokerConnected(server, collect);
    const load = await Load.start({ target: server.target, sidecars: s.sidecars, durationMs: s.moderateMs, rate: s.moderateRate });
    const done = await load.done;
    const t0 = performance.now();
    // Until every packet is made (the last ones reach the sinks at the next flush, ≤ 250 ms), the
    // broker sink holds nothing undelivered and collect acknowledged them all; at most 15 s.
    let m = await server.scrape();
    let drainMs = NaN;
    const deadline = t0 + 15_000;
    for (;;) {
      const made = m.sum('meshcap_packets_total');
      if (m.sum('meshcap_broker_undelivered_packets') === 0 && m.sum('meshcap_broker_delivered_packets_total') >= made && made >= done.sent.packets) {
        drainMs = performance.now() - t0;
        break;
      }
      if (performance.now() > deadline) break;
      await sleep(20);
      m = await server.scrape();
    }
    const c = await collect.scrape();
    const e = await server.stop();
    const ce = await collect.stop();
    const files = collectedFiles(out);
    const scan = scanPcaps(files);
    const r: BrokerCompleteness = {
      ...loadCounts(s, done, m),
      accepted: m.sum('meshcap_broker_accepted_packets_total'),
      delivered: m.sum('meshcap_broker_delivered_packets_total'),
      resent: m.sum('meshcap_broker_resent_packets_total'),
      collectPackets: c.sum('meshcap_collect_packets_total'),
      duplicates: c.sum('meshcap_collect_duplicate_packets_total'),
      gaps: c.sum('meshcap_collect_gap_packets_total'),
      files: files.length,
      filePackets: scan.packets,
      filePayload: scan.payload,
      partFiles: files.filter((f) => f.endsWith('.part')).length,
      trailing: scan.trailing,
      drainMs,
      ok: false,
      problems: [],
    };
    const p = r.problems;
    p.push(...loadProblems(done, r));
    if (Number.isNaN(drainMs)) p.push(`not delivered within 15 s: ${m.sum('meshcap_broker_undelivered_packets')} undelivered`);
    if (r.accepted !== r.packets || r.delivered !== r.packets) p.push(`packets made ${r.packets}, accepted by the broker sink ${r.accepted}, delivered ${r.delivered}`);
    if (r.drops !== 0) p.push(`drops ${r.drops}: ${JSON.stringify(m.series('meshcap_dropped_packets_total'))}`);
    if (r.collectPackets !== r.packets) p.push(`collect wrote ${r.collectPackets} packets, meshcap made ${r.packets}`);
    if (r.duplicates !== 0 || r.gaps !== 0) p.push(`collect: ${r.duplicates} duplicates skipped, ${r.gaps} packets missing (gaps)`);
    if (r.filePackets !== r.packets) p.push(`collect's files hold ${r.filePackets} packets, meshcap made ${r.packets}`);
    if (r.filePayload !== done.sent.payload) p.push(`collect's files hold ${r.filePayload} payload bytes, sent ${done.sent.payload}`);
    if (r.partFiles !== 0 || r.trailing !== 0) p.push(`${r.partFiles} .part files, ${r.trailing} trailing bytes after SIGTERM`);
    if (scan.other !== 0 || scan.truncated !== 0) p.push(`${scan.other} frames not TCP, ${scan.truncated} truncated`);
    if (e.code !== 0) p.push(`meshcap exit ${e.code ?? e.signal}`);
    if (ce.code !== 0) p.push(`collect exit ${ce.code ?? ce.signal}`);
    const errs = m.series('meshcap_ingest_errors_total').filter(([, v]) => v > 0);
    if (errs.length) p.push(`ingest errors ${JSON.stringify(errs)}`);
    const fails = m.series('meshcap_broker_connect_failures_total').filter(([, v]) => v > 0);
    if (fails.length || m.sum('meshcap_broker_disconnects_total') > 0) p.push(`broker connection trouble: ${JSON.stringify(fails)}, ${m.sum('meshcap_broker_disconnects_total')} disconnects`);
    r.ok = p.length === 0;
    return r;
  } finally {
    if (server && !server.exitedWith) await server.stop(2000);
    if (collect && !collect.exitedWith) await collect.stop(2000);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const med = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

export async function runE2eBench(o: E2eOptions = {}): Promise<BenchReport> {
  const log = o.log ?? ((l: string) => console.log(l));
  const s = settings(o.quick ?? false, o.sidecars);
  if (o.reps) s.reps = o.reps;
  await selfCheck();
  const started = Date.now();
  const runs: SatRun[] = [];
  // Certificates for the broker cases (CA, collect's and the sidecar's), removed at the end.
  const pkiDir = tempDir('e2e-pki');
  let bc: BrokerCompleteness;
  let c: Completeness;
  try {
    const pki = await brokerPki(pkiDir);
    log(`\n## Capture complete at moderate load (${s.moderateRate / MB} MB/s of messages, ${s.moderateMs / 1000} s, one file, no ring)`);
    c = await complete(s);
    log(
      table([
        ['messages sent', 'ingested', 'packets expected', 'made', 'written', 'EPBs in file', 'ISB ifrecv/ifdrop', 'dropped', 'verdict'],
        [String(c.sent.messages), String(c.ingested), String(c.sent.packets), String(c.packets), String(c.written), String(c.filePackets), `${c.isbRecv}/${c.isbDrop}`, String(c.drops), c.ok ? 'complete' : `INCOMPLETE: ${c.problems.join('; ')}`],
      ]),
    );
    log(`\n## Delivered complete through the broker sink to meshcap collect at moderate load (same load; serve's disk capture off, collect: no ring)`);
    bc = await completeBroker(s, pki);
    log(
      table([
        ['messages sent', 'ingested', 'packets expected', 'made', 'accepted/delivered (serve)', 'written (collect)', 'in collect\'s files', 'payload in files / sent', 'dropped', 'dup/gaps', 'drained after load (ms)', 'verdict'],
        [
          String(bc.sent.messages),
          String(bc.ingested),
          String(bc.sent.packets),
          String(bc.packets),
          `${bc.accepted}/${bc.delivered}`,
          String(bc.collectPackets),
          `${bc.filePackets} (${bc.files} file${bc.files === 1 ? '' : 's'})`,
          `${bc.filePayload}/${bc.sent.payload}`,
          String(bc.drops),
          `${bc.duplicates}/${bc.gaps}`,
          fmt(bc.drainMs, 0),
          bc.ok ? 'complete' : `INCOMPLETE: ${bc.problems.join('; ')}`,
        ],
      ]),
    );

    log(`\n## Saturated: ${s.sidecars} sidecars, as fast as HTTP/2 flow control admits; ${fmt(s.warmMs / 1000, 1)} s warm-up, ${fmt(s.measureMs / 1000, 1)} s measured; ${s.reps} repetition(s), order alternating`);
    log('(captured: into serve\'s capture file; for the broker run, into collect\'s files; for the hand-off run, copied by the second thread. CPU collect: all threads of meshcap collect)');
    const rows = [['run', 'ingest MB/s', 'captured MB/s', 'msg MB/s', 'CPU main', 'CPU other thr', 'CPU loadgen', 'CPU collect', 'dropped', 'peak RSS MiB', 'streams', 'exit']];
    const row = (r: SatRun) => [
      `${LABEL[r.kind]} #${r.rep + 1}`,
      fmt(r.ingestMBps, 0),
      r.kind === 'null' || r.kind === 'null-raw-h2' ? '-' : fmt(r.capturedMBps, 0),
      fmt(r.msgMBps, 0),
      fmt(r.cpu.serverMain, 2),
      fmt(r.cpu.serverOthers, 2),
      fmt(r.cpu.loadgen, 2),
      r.cpu.collect === undefined ? '-' : fmt(r.cpu.collect, 2),
      r.kind === 'null' || r.kind === 'null-hand-off' || r.kind === 'null-raw-h2' ? '-' : `${fmt(100 * r.dropShare, 1)}% ${Object.keys(r.drops).join(',')}`.trim(),
      fmt(r.peakRssMiB, 0),
      r.streamsOk ? 'ok' : 'FAILED',
      r.exit,
    ];
    for (let rep = 0; rep < s.reps; rep++) {
      const kinds = (['null', ...(o.handOff ? (['null-hand-off'] as Kind[]) : []), ...(o.rawH2 ? (['null-raw-h2'] as Kind[]) : []), 'null-disk', ...(o.directSink ? (['null-direct'] as Kind[]) : []), 'meshcap', ...(o.h2Door ? (['meshcap-h2'] as Kind[]) : []), 'broker'] as Kind[]).filter(
        (k) => !o.only || o.only.includes(k),
      );
      const order = rep % 2 === 0 ? kinds : [...kinds].reverse();
      for (const kind of order) {
        const r = await saturated(kind, rep, s, undefined, pki);
        runs.push(r);
        rows.push(row(r));
      }
    }
    log(table(rows));
    const brokerRuns = runs.filter((r) => r.broker);
    if (brokerRuns.length) {
      log('\nBroker runs, measured window: what serve sent (record bytes, TLS and framing excluded), what collect wrote, and the broker sink when the load stopped');
      log(
        table([
          ['run', 'sent by serve MB/s', 'written by collect MB/s', 'collect packets', 'memory queue MiB', 'undelivered packets', 'dropped: broker sink', 'dropped: other (file sink → /dev/null)', 'connections / lost / failed'],
          ...brokerRuns.map((r) => {
            const b = r.broker!;
            const other = Object.entries(b.dropsByCause).filter(([k]) => k !== 'broker_spool_full');
            return [
              `#${r.rep + 1}`,
              fmt(b.sentMBps, 0),
              fmt(b.collectRecordMBps, 0),
              String(b.collectPackets),
              fmt(b.queueMiB, 1),
              String(b.undelivered),
              String(b.brokerDrops),
              b.otherDrops > 0 ? `${b.otherDrops} (${other.map(([k, v]) => `${k} ${v}`).join(', ')})` : '0',
              `${b.connections} / ${b.disconnects} / ${b.connectFailures}`,
            ];
          }),
        ]),
      );
    }
  } finally {
    fs.rmSync(pkiDir, { recursive: true, force: true });
  }


  let profile: { file: string; shares: Array<[string, number]>; run: SatRun } | null = null;
  if (o.profileDir) {
    fs.mkdirSync(o.profileDir, { recursive: true });
    const before = new Set(fs.readdirSync(o.profileDir));
    const r = await saturated('meshcap', s.reps, s, o.profileDir);
    const file = fs.readdirSync(o.profileDir).find((f) => f.endsWith('.cpuprofile') && !before.has(f));
    if (file) {
      const cat = categorize(path.join(o.profileDir, file));
      profile = { file: path.join(o.profileDir, file), shares: cat.shares, run: r };
      const busy = cat.shares.filter(([k]) => k !== 'idle').reduce((a, [, v]) => a + v, 0);
      log(`\n## Profile of a saturated meshcap run (main thread; ${path.join(o.profileDir, file)}), ingest ${fmt(r.ingestMBps, 0)} MB/s under the profiler`);
      log(`(the profile spans the process's life: start-up and shutdown are the idle share; shares below are of the busy samples)`);
      log(table([['category', 'share of busy'], ...cat.shares.filter(([k]) => k !== 'idle').map(([k, v]) => [k, `${fmt((100 * v) / busy, 1)}%`])]));
      log(`CPU: main thread ${fmt(r.cpu.serverMain, 2)} cores, other threads (libuv pool: file writes; GC helpers) ${fmt(r.cpu.serverOthers, 2)} cores`);
    }
  }

  const nulls = runs.filter((r) => r.kind === 'null');
  const disks = runs.filter((r) => r.kind === 'null-disk');
  const directs = runs.filter((r) => r.kind === 'null-direct');
  const handOffs = runs.filter((r) => r.kind === 'null-hand-off');
  const raws = runs.filter((r) => r.kind === 'null-raw-h2');
  const mc = runs.filter((r) => r.kind === 'meshcap');
  const h2 = runs.filter((r) => r.kind === 'meshcap-h2');
  const br = runs.filter((r) => r.kind === 'broker');
  const delivered = med(br.map((r) => r.capturedMBps));
  const nullMBps = med(nulls.map((r) => r.ingestMBps));
  const diskMBps = med(disks.map((r) => r.capturedMBps));
  const ingest = med(mc.map((r) => r.ingestMBps));
  const captured = med(mc.map((r) => r.capturedMBps));
  const pct = (a: number, b: number) => `${fmt((100 * a) / b, 0)}%`;
  /** Milliseconds of the server's main thread per MB of payload ingested (median of the runs). */
  const msPerMB = (rs: SatRun[]) => med(rs.map((r) => (1000 * r.cpu.serverMain) / r.ingestMBps));
  const summary: SummaryRow[] = [
    { bench: 'e2e', figure: `payload captured to disk, ${s.sidecars} sidecars saturating (MB/s)`, value: fmt(captured, 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(captured, nullMBps), target: '≥ 80%' },
    { bench: 'e2e', figure: 'payload ingested by meshcap, saturating (MB/s)', value: fmt(ingest, 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(ingest, nullMBps), target: '' },
    { bench: 'e2e', figure: 'payload captured vs null sink writing to disk (MB/s)', value: fmt(captured, 0), baseline: `null+disk ${fmt(diskMBps, 0)}`, ratio: pct(captured, diskMBps), target: '' },
    { bench: 'e2e', figure: 'null sink writing to disk: written (MB/s)', value: fmt(diskMBps, 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(diskMBps, nullMBps), target: '' },
    ...(directs.length
      ? [{ bench: 'e2e', figure: 'null sink writing to disk by direct I/O: written (MB/s)', value: fmt(med(directs.map((r) => r.capturedMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(directs.map((r) => r.capturedMBps)), nullMBps), target: '' }]
      : []),
    ...(handOffs.length
      ? [{ bench: 'e2e', figure: 'null sink handing every message to a second thread (MB/s)', value: fmt(med(handOffs.map((r) => r.ingestMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(handOffs.map((r) => r.ingestMBps)), nullMBps), target: '' }]
      : []),
    ...(raws.length
      ? [
          { bench: 'e2e', figure: 'null sink on node:http2 without grpc-js (MB/s)', value: fmt(med(raws.map((r) => r.ingestMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(raws.map((r) => r.ingestMBps)), nullMBps), target: '' },
          {
            bench: 'e2e',
            figure: 'main thread per MB: grpc-js null sink, node:http2 null sink, meshcap (ms)',
            value: `${fmt(msPerMB(nulls), 2)} / ${fmt(msPerMB(raws), 2)} / ${fmt(msPerMB(mc), 2)}`,
            baseline: '',
            ratio: '',
            target: '',
          },
        ]
      : []),
    ...(h2.length
      ? [
          { bench: 'e2e', figure: 'experimental node:http2 door: payload ingested (MB/s)', value: fmt(med(h2.map((r) => r.ingestMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(h2.map((r) => r.ingestMBps)), nullMBps), target: '' },
          { bench: 'e2e', figure: 'experimental node:http2 door: payload captured to disk (MB/s)', value: fmt(med(h2.map((r) => r.capturedMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(h2.map((r) => r.capturedMBps)), nullMBps), target: '' },
          { bench: 'e2e', figure: 'main thread per MB: meshcap on grpc-js, on node:http2 (ms)', value: `${fmt(msPerMB(mc), 2)} / ${fmt(msPerMB(h2), 2)}`, baseline: `null gRPC sink ${fmt(msPerMB(nulls), 2)}`, ratio: '', target: '' },
        ]
      : []),
    { bench: 'e2e', figure: 'packets dropped at saturation (share)', value: `${fmt(100 * med(mc.map((r) => r.dropShare)), 1)}%`, baseline: '', ratio: '', target: '' },
    {
      bench: 'e2e',
      figure: 'CPU cores at saturation: server main thread',
      value: fmt(med(mc.map((r) => r.cpu.serverMain)), 2),
      baseline: `null sink ${fmt(med(nulls.map((r) => r.cpu.serverMain)), 2)}`,
      ratio: '',
      target: '',
    },
    { bench: 'e2e', figure: 'CPU cores at saturation: load generator', value: fmt(med(mc.map((r) => r.cpu.loadgen)), 2), baseline: `null sink run ${fmt(med(nulls.map((r) => r.cpu.loadgen)), 2)}`, ratio: '', target: '' },
    { bench: 'e2e', figure: 'CPU cores at saturation: meshcap other threads', value: fmt(med(mc.map((r) => r.cpu.serverOthers)), 2), baseline: `null sink ${fmt(med(nulls.map((r) => r.cpu.serverOthers)), 2)}`, ratio: '', target: '' },
    { bench: 'e2e', figure: 'peak RSS at saturation (MiB)', value: fmt(Math.max(...mc.map((r) => r.peakRssMiB)), 0), baseline: `null sink ${fmt(Math.max(...nulls.map((r) => r.peakRssMiB)), 0)}`, ratio: '', target: '' },
    {
      bench: 'e2e',
      figure: `capture complete at ${s.moderateRate / MB} MB/s (packets in file / sent)`,
      value: `${c.filePackets}/${c.sent.packets}`,
      baseline: '',
      ratio: c.ok ? 'complete' : 'INCOMPLETE',
      target: 'all, 0 drops',
    },
    { bench: 'e2e', figure: `payload delivered to meshcap collect (mTLS), ${s.sidecars} sidecars saturating (MB/s)`, value: fmt(delivered, 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(delivered, nullMBps), target: '≥ 80%' },
    { bench: 'e2e', figure: 'payload ingested by meshcap with the broker sink, saturating (MB/s)', value: fmt(med(br.map((r) => r.ingestMBps)), 0), baseline: `null gRPC sink ${fmt(nullMBps, 0)}`, ratio: pct(med(br.map((r) => r.ingestMBps)), nullMBps), target: '' },
    { bench: 'e2e', figure: 'packets dropped by the broker sink at saturation (share)', value: `${fmt(100 * med(br.map((r) => r.dropShare)), 1)}%`, baseline: '', ratio: '', target: '' },
    {
      bench: 'e2e',
      figure: `delivered to collect at ${s.moderateRate / MB} MB/s (packets in its files / sent)`,
      value: `${bc.filePackets}/${bc.sent.packets}`,
      baseline: '',
      ratio: bc.ok ? 'complete' : 'INCOMPLETE',
      target: 'all, 0 drops',
    },
  ];
  const elapsed = (Date.now() - started) / 1000;
  log(`\n(e2e in ${fmt(elapsed, 1)} s)`);
  const report: BenchReport = { name: 'e2e', summary };
  if (o.json !== false) {
    report.jsonPath = writeResults('e2e', { settings: s, elapsedSeconds: elapsed, runs, complete: c, brokerComplete: bc, profile, summary });
    log(`results: ${report.jsonPath}`);
  }
  return report;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = parseArgs(process.argv.slice(2));
  const argv = process.argv.slice(2);
  const profileDir = argv.includes('--profile') ? argv[argv.indexOf('--profile') + 1]! : null;
  const r = await runE2eBench({ quick: args.quick, json: args.json, profileDir, handOff: argv.includes('--hand-off'), rawH2: argv.includes('--raw-h2'), h2Door: argv.includes('--h2-door'),
    directSink: argv.includes('--direct-sink'),
    reps: argv.includes('--reps') ? Number(argv[argv.indexOf('--reps') + 1]) : undefined,
    only: argv.includes('--only') ? argv[argv.indexOf('--only') + 1]!.split(',') : undefined,
  });
  console.log(`\n${table([['figure', 'value', 'baseline (same run)', 'ratio', 'target'], ...r.summary.map((x) => [x.figure, x.value, x.baseline, x.ratio, x.target])])}`);
}
