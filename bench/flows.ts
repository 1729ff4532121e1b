/**
 * Many flows (issue 5, benchmark 5): 100,000 concurrent idle flows (each: its connection segment and
 * one 100-byte read, never closed), then 10,000 of them closing at once.
 *
 * Memory per flow, two ways:
 *   in process  exact, in a fresh child process: the production Pipeline (pcapng, 1 MiB blocks as serve uses, flow table,
 *               slicer) fed through TraceDecoder as the gRPC door does, JS heap and external
 *               (ArrayBuffer) memory after forced full GCs, after minus before, per flow. Beside it,
 *               in the same process: the same number of bare TcpFlow objects (the flow state alone)
 *               and a Map of small objects (the least a JS flow table can cost).
 *   meshcap serve   what an operator sees: RSS (VmRSS) of the serve process after minus before the
 *               flows arrived over gRPC (10 sidecars × 10,000 flows), and its V8 heap from
 *               /metrics (not collected, so an upper bound).
 * Closing: 1,000 `closed` events on each of the 10 streams, written at once; the time until
 * meshcap_flows_closed_total counts them all (metrics polled every 10 ms) and until their 30,000
 * packets (FIN/ACK, FIN/ACK, ACK each) are on disk (includes the 250 ms flush interval); beside the
 * same bytes sent to the null gRPC sink (time until it has counted them).
 *
 *   npx tsc -p tsconfig.json && node --expose-gc dist/bench/flows.js [--quick] [--no-json]
 */
import { fork } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import fs from 'node:fs';
import { PipelineStats } from '../src/control/stats.js';
import { silentLogger } from '../src/control/logger.js';
import { resolveEndpoints } from '../src/flow/address.js';
import { TcpFlow } from '../src/flow/tcp-flow.js';
import { pcapngFramer } from '../src/format/pcapng.js';
import { TraceDecoder, type StreamState } from '../src/ingest/trace-decoder.js';
import type { StreamIdentity } from '../src/ingest/tap-event.js';
import type { Block } from '../src/packet/block.js';
import { DEFAULT_PIPELINE, Pipeline } from '../src/pipeline.js';
import type { BlockSink } from '../src/sink/sink.js';
import { fmt, forceGc, parseArgs, table, type BenchReport, type SummaryRow } from './harness.js';
import { TapStream } from './lib/h2client.js';
import { MeshcapProc, NullSinkProc, memStatus, sleep, tempDir, writeResults } from './lib/procs.js';
import { identifierRequest, streamTapsRequest, type Framing } from './lib/tapwire.js';

export interface FlowsOptions {
  quick?: boolean;
  json?: boolean;
  log?: (line: string) => void;
}

const SIDECARS = 10;
const TS = 1_763_900_000;
const SMALL = Buffer.alloc(100, 0x61);

function flowAddrs(node: number, id: number) {
  const n = node * 100_000 + id;
  return {
    local: { address: `10.${1 + (n >>> 16)}.${(n >>> 8) & 255}.${n & 255}`, port: 8443 },
    remote: { address: `10.${100 + (n >>> 16)}.${(n >>> 8) & 255}.${n & 255}`, port: 32768 + (n % 28000) },
  };
}

/** The two messages that open flow `id` of sidecar `node` (connection, one 100-byte read). */
function openMessages(node: number, id: number, framing: Framing): [Buffer, Buffer] {
  const a = flowAddrs(node, id);
  return [
    streamTapsRequest(id, { kind: 'connection', local: a.local, remote: a.remote }, framing),
    streamTapsRequest(id, { kind: 'read', tsSec: TS, tsNsec: id, payload: SMALL, seqNum: 1 }, framing),
  ];
}

function closeMessage(id: number, framing: Framing): Buffer {
  return streamTapsRequest(id, { kind: 'closed', tsSec: TS + 1, tsNsec: id, seqNum: 1 + SMALL.length }, framing);
}

/** A sink that releases every block at once (no disk). */
class NullBlockSink implements BlockSink {
  readonly name = 'null';
  write(block: Block, release: (b: Block) => void): void {
    release(block);
  }
  async close(): Promise<void> {}
}

interface Mem {
  heap: number;
  external: number;
  rss: number;
}

/**
 * Heap and external memory after full GCs, repeated until both are stable: ArrayBuffer backing
 * stores are freed after the GC that finds them dead (earlier benchmarks in the same process leave
 * hundreds of MB of them), so one forced GC is not enough for `external`.
 */
async function settle(): Promise<Mem> {
  let prev: Mem | null = null;
  for (let i = 0; i < 20; i++) {
    forceGc();
    await sleep(20);
    const m = process.memoryUsage();
    const cur = { heap: m.heapUsed, external: m.external, rss: m.rss };
    if (prev && Math.abs(cur.heap - prev.heap) < 64 * 1024 && Math.abs(cur.external - prev.external) < 64 * 1024) return cur;
    prev = cur;
  }
  return prev!;
}

const perFlow = (a: Mem, b: Mem, n: number) => ({ heap: (b.heap - a.heap) / n, external: (b.external - a.external) / n, rss: (b.rss - a.rss) / n });

/** The production pipeline holding `n` idle flows; returns bytes per flow. */
async function inProcessPipeline(nodes: number, perNode: number): Promise<{ heap: number; external: number; rss: number; flows: number }> {
  const stats = new PipelineStats();
  const pipeline = new Pipeline({ ...DEFAULT_PIPELINE, framer: pcapngFramer, blockSize: 1 << 20, blockCount: 32 }, stats, silentLogger());
  pipeline.addSink(new NullBlockSink());
  const decoder = new TraceDecoder(pipeline);
  const states: StreamState[] = [];
  for (let i = 0; i < nodes; i++) {
    const st: StreamState = { identity: null, messages: 0 };
    decoder.decodeStreamTapsRequest(identifierRequest(`flows-${i}`, 'bench', 'none'), st, 'grpc', () => ({ nodeId: '?', tapId: '', source: 'grpc' }));
    states.push(st);
  }
  const anon = (): StreamIdentity => ({ nodeId: '?', tapId: '', source: 'grpc' });
  const before = await settle();
  for (let id = 1; id <= perNode; id++) {
    for (let i = 0; i < nodes; i++) {
      const [c, r] = openMessages(i, id, 'none');
      pipeline.onIngestMessage('grpc', c.length);
      decoder.decodeStreamTapsRequest(c, states[i]!, 'grpc', anon);
      pipeline.onIngestMessage('grpc', r.length);
      decoder.decodeStreamTapsRequest(r, states[i]!, 'grpc', anon);
    }
  }
  pipeline.flush();
  const after = await settle();
  const flows = stats.flowsActive;
  if (flows !== nodes * perNode || stats.packets !== 4 * flows) throw new Error(`in-process pipeline: ${flows} flows, ${stats.packets} packets`);
  const r = { ...perFlow(before, after, flows), flows };
  // Keep everything alive until measured.
  if (pipeline.flows.size !== flows) throw new Error('flows vanished');
  return r;
}

/** `n` bare TcpFlow objects as the flow table makes them (endpoints, intro comment), in an array. */
async function inProcessTcpFlows(nodes: number, perNode: number): Promise<{ heap: number; external: number; rss: number }> {
  const before = await settle();
  const keep: TcpFlow[] = [];
  for (let id = 1; id <= perNode; id++) {
    for (let i = 0; i < nodes; i++) {
      const a = flowAddrs(i, id);
      const { local, remote } = resolveEndpoints({ kind: 'socket', ...a.local }, { kind: 'socket', ...a.remote }, id);
      const intro = `meshcap: envoy node=flows-${i} tap_id=bench trace_id=${id} local=${a.local.address}:${a.local.port} remote=${a.remote.address}:${a.remote.port} via=grpc`;
      const f = new TcpFlow(keep.length + 1, `flows-${i}`, id, local, remote, 1460, true, intro);
      f.intro = ''; // said on the first packet, then dropped (as after the flow's first event)
      keep.push(f);
    }
  }
  const after = await settle();
  const r = perFlow(before, after, keep.length);
  if (keep.length !== nodes * perNode) throw new Error('lost flows');
  return r;
}

/** The least a JS flow table can cost: Map<number, small object>. */
async function inProcessMap(n: number): Promise<{ heap: number; external: number; rss: number }> {
  const before = await settle();
  const m = new Map<number, { seq: number; ack: number; ts: number }>();
  for (let i = 0; i < n; i++) m.set(i * 7 + 1, { seq: i, ack: i + 1, ts: i + 2 });
  const after = await settle();
  if (m.size !== n) throw new Error('map');
  return perFlow(before, after, n);
}

// ---------------------------------------------------------------------------------------------

interface Wire {
  opens: Buffer[];
  closes: Buffer[];
  openMsgs: number;
  closeMsgs: number;
}

function wire(perNode: number, closingPerNode: number): Wire {
  const opens: Buffer[] = [];
  const closes: Buffer[] = [];
  for (let i = 0; i < SIDECARS; i++) {
    const parts: Buffer[] = [identifierRequest(`flows-${i}`, 'bench')];
    for (let id = 1; id <= perNode; id++) parts.push(...openMessages(i, id, 'grpc'));
    opens.push(Buffer.concat(parts));
    const cl: Buffer[] = [];
    for (let id = 1; id <= closingPerNode; id++) cl.push(closeMessage(id, 'grpc'));
    closes.push(Buffer.concat(cl));
  }
  return { opens, closes, openMsgs: SIDECARS * (1 + 2 * perNode), closeMsgs: SIDECARS * closingPerNode };
}

async function waitFor(cond: () => Promise<boolean>, everyMs: number, timeoutMs: number): Promise<number> {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 > timeoutMs) return NaN;
    await sleep(everyMs);
  }
  return performance.now() - t0;
}

async function sendAll(streams: TapStream[], bufs: Buffer[]): Promise<void> {
  await Promise.all(streams.map((s, i) => s.write(bufs[i]!)));
}

interface ServeResult {
  flows: number;
  rss0: number;
  rss1: number;
  heap0: number;
  heap1: number;
  openMs: number;
  closeMs: number;
  closeWrittenMs: number;
  closePackets: number;
  closed: number;
  activeAfter: number;
  exit: string;
}

async function serveRun(w: Wire, flows: number, closing: number): Promise<ServeResult> {
  const dir = tempDir('flows');
  try {
    const mc = await MeshcapProc.start({ dir });
    await sleep(500);
    const m0 = await mc.scrape();
    const rss0 = memStatus(mc.pid).rss;
    const heap0 = m0.sum('meshcap_nodejs_heap_size_used_bytes');
    const streams = await Promise.all(Array.from({ length: SIDECARS }, () => TapStream.open(mc.target)));
    const t0 = performance.now();
    await sendAll(streams, w.opens);
    const opened = await waitFor(async () => (await mc.scrape()).sum('meshcap_flows_active') >= flows, 20, 60_000);
    const openMs = performance.now() - t0;
    void opened;
    await waitFor(async () => (await mc.scrape()).sum('meshcap_sink_packets_written_total') >= 4 * flows, 50, 10_000);
    await sleep(1000);
    const rss1 = memStatus(mc.pid).rss;
    const m1 = await mc.scrape();
    const heap1 = m1.sum('meshcap_nodejs_heap_size_used_bytes');
    const written0 = m1.sum('meshcap_sink_packets_written_total');
    const closed0 = m1.sum('meshcap_flows_closed_total');
    const c0 = performance.now();
    await sendAll(streams, w.closes);
    const closeMs = await waitFor(async () => (await mc.scrape()).sum('meshcap_flows_closed_total') - closed0 >= closing, 10, 30_000);
    const closeWrittenMs = await waitFor(async () => (await mc.scrape()).sum('meshcap_sink_packets_written_total') - written0 >= 3 * closing, 10, 30_000);
    void c0;
    const m2 = await mc.scrape();
    for (const s of streams) await s.end();
    const e = await mc.stop();
    return {
      flows,
      rss0,
      rss1,
      heap0,
      heap1,
      openMs,
      closeMs,
      closeWrittenMs: closeMs + closeWrittenMs,
      closePackets: m2.sum('meshcap_sink_packets_written_total') - written0,
      closed: m2.sum('meshcap_flows_closed_total') - closed0,
      activeAfter: m2.sum('meshcap_flows_active'),
      exit: e.code === 0 ? 'exit 0' : `exit ${e.code ?? e.signal}`,
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function nullRun(w: Wire): Promise<{ openMs: number; closeMs: number }> {
  const dir = tempDir('flows-null');
  try {
    const ns = await NullSinkProc.start(dir);
    const streams = await Promise.all(Array.from({ length: SIDECARS }, () => TapStream.open(ns.target)));
    const t0 = performance.now();
    await sendAll(streams, w.opens);
    await waitFor(async () => (await ns.stats()).messages >= w.openMsgs, 2, 60_000);
    const openMs = performance.now() - t0;
    const c0 = performance.now();
    await sendAll(streams, w.closes);
    await waitFor(async () => (await ns.stats()).messages >= w.openMsgs + w.closeMsgs, 2, 30_000);
    const closeMs = performance.now() - c0;
    for (const s of streams) await s.end();
    await ns.stop();
    return { openMs, closeMs };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

type PerFlow = { heap: number; external: number; rss: number };

/** The in-process measurements, in a fresh child (other benchmarks' garbage would skew them). */
async function memoryInChild(flows: number): Promise<{ map: PerFlow; bare: PerFlow; pipe: PerFlow }> {
  const child = fork(fileURLToPath(import.meta.url), ['--memory-child', String(flows)], { execArgv: ['--expose-gc'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return await new Promise((resolve, reject) => {
    child.once('message', (m) => resolve(m as { map: PerFlow; bare: PerFlow; pipe: PerFlow }));
    child.once('exit', (code) => reject(new Error(`memory child exited ${code}`)));
  });
}

async function memoryChildMain(flows: number): Promise<void> {
  await settle();
  const map = await inProcessMap(flows);
  const bare = await inProcessTcpFlows(SIDECARS, flows / SIDECARS);
  const pipe = await inProcessPipeline(SIDECARS, flows / SIDECARS);
  process.send!({ map, bare, pipe }, () => process.exit(0));
}

export async function runFlowsBench(o: FlowsOptions = {}): Promise<BenchReport> {
  const log = o.log ?? ((l: string) => console.log(l));
  const flows = o.quick ? 20_000 : 100_000;
  const closing = flows / 10;
  const perNode = flows / SIDECARS;
  const started = Date.now();

  log(`\n## Memory per idle flow, in a fresh process (${flows} flows over ${SIDECARS} nodes; full GCs until heap and external memory are stable, before and after)`);
  const { map, bare, pipe } = await memoryInChild(flows);
  const B = (x: number) => fmt(x, 0);
  log(
    table([
      ['what', 'JS heap B/flow', 'external (ArrayBuffers) B/flow', 'total B/flow', 'RSS B/flow'],
      ['Map<number, {3 numbers}> (floor of a JS table)', B(map.heap), B(map.external), B(map.heap + map.external), B(map.rss)],
      ['TcpFlow objects alone (flow state)', B(bare.heap), B(bare.external), B(bare.heap + bare.external), B(bare.rss)],
      ['production pipeline: FlowTable + TcpFlow, via TraceDecoder', B(pipe.heap), B(pipe.external), B(pipe.heap + pipe.external), B(pipe.rss)],
    ]),
  );

  log(`\n## meshcap serve: ${flows} flows over gRPC (${SIDECARS} sidecars), then ${closing} closing at once; null gRPC sink as baseline`);
  const w = wire(perNode, closing / SIDECARS);
  const nul = await nullRun(w);
  const srv = await serveRun(w, flows, closing);
  const rssPer = (srv.rss1 - srv.rss0) / flows;
  const heapPer = (srv.heap1 - srv.heap0) / flows;
  log(
    table([
      ['', 'meshcap serve', 'null gRPC sink'],
      [`open ${flows} flows (${w.openMsgs} messages): time until counted (ms)`, fmt(srv.openMs, 0), fmt(nul.openMs, 0)],
      ['RSS before → after (MiB)', `${fmt(srv.rss0 / 2 ** 20, 0)} → ${fmt(srv.rss1 / 2 ** 20, 0)}`, ''],
      ['RSS per flow (B)', fmt(rssPer, 0), ''],
      ['V8 heap used per flow, uncollected (B)', fmt(heapPer, 0), ''],
      [`close ${closing} at once: time until all processed (ms)`, fmt(srv.closeMs, 0), fmt(nul.closeMs, 0)],
      ['… until their packets are on disk (ms, flush 250 ms)', fmt(srv.closeWrittenMs, 0), ''],
      ['packets written for the closes', String(srv.closePackets), ''],
      ['flows closed / still open', `${srv.closed} / ${srv.activeAfter}`, ''],
      ['exit', srv.exit, ''],
    ]),
  );
  const inproc = pipe.heap + pipe.external;
  const summary: SummaryRow[] = [
    { bench: 'flows', figure: `memory per idle flow, in process (JS heap + external, B)`, value: `${B(inproc)} (${B(pipe.heap)} + ${B(pipe.external)})`, baseline: `bare Map entry ${B(map.heap + map.external)}`, ratio: `${fmt(inproc / (map.heap + map.external), 1)}×`, target: '≤ 1024' },
    { bench: 'flows', figure: '… of which TcpFlow objects alone (B)', value: B(bare.heap + bare.external), baseline: '', ratio: '', target: '' },
    { bench: 'flows', figure: `memory per idle flow, meshcap serve RSS (B)`, value: B(rssPer), baseline: `RSS idle ${fmt(srv.rss0 / 2 ** 20, 0)} MiB`, ratio: '', target: '≤ 1024' },
    { bench: 'flows', figure: `open ${flows} flows over gRPC (ms)`, value: fmt(srv.openMs, 0), baseline: `null sink ${fmt(nul.openMs, 0)}`, ratio: `${fmt(srv.openMs / nul.openMs, 1)}×`, target: '' },
    { bench: 'flows', figure: `${closing} flows closing at once: processed (ms)`, value: fmt(srv.closeMs, 0), baseline: `null sink ${fmt(nul.closeMs, 0)}`, ratio: `${fmt(srv.closeMs / nul.closeMs, 1)}×`, target: '' },
    { bench: 'flows', figure: `${closing} closing: packets on disk (ms) / packets`, value: `${fmt(srv.closeWrittenMs, 0)} / ${srv.closePackets}`, baseline: `expected ${3 * closing}`, ratio: srv.closePackets === 3 * closing ? 'all' : 'MISSING', target: '' },
  ];
  const elapsed = (Date.now() - started) / 1000;
  log(`\n(flows in ${fmt(elapsed, 1)} s)`);
  const report: BenchReport = { name: 'flows', summary };
  if (o.json !== false) {
    report.jsonPath = writeResults('flows', { flows, closing, sidecars: SIDECARS, inProcess: { map, tcpFlow: bare, pipeline: pipe }, serve: { ...srv, rssPerFlow: rssPer, heapPerFlow: heapPer }, nullSink: nul, elapsedSeconds: elapsed, summary });
    log(`results: ${report.jsonPath}`);
  }
  return report;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.argv[2] === '--memory-child') {
  await memoryChildMain(Number(process.argv[3]));
} else if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = parseArgs(process.argv.slice(2));
  const r = await runFlowsBench({ quick: args.quick, json: args.json });
  console.log(`\n${table([['figure', 'value', 'baseline (same run)', 'ratio', 'target'], ...r.summary.map((x) => [x.figure, x.value, x.baseline, x.ratio, x.target])])}`);
}
