/**
 * The slicer benchmark: how fast tap payload becomes pcapng records in memory, against the copy
 * it cannot avoid, in one process and one run.
 *
 * Cases (each: warm-up, then 5 repetitions run round-robin within its group, median reported):
 *   64 KiB events, IPv4 MSS 1460 and IPv6 MSS 1440:
 *     slicer       Slicer.data() → real Block from a BlockPool, pcapng framer, TCP + IPv4
 *                  checksums (always on), minimal BlockOutput that recycles blocks (no disk);
 *                  the packet kernel (src/packet/kernel.wat) does the per-segment work
 *     baseline     copy-once memcpy: TypedArray#set of the same bytes, in MSS pieces, into the same
 *                  record positions of the same blocks, from views preallocated at setup (no
 *                  allocation per piece) — the physical limit of a copy-once design in Node
 *     set alone    the slicer's one copy, nothing else: one set() of the whole event at the first
 *                  segment's payload position (the kernel then moves each later segment to its
 *                  place while summing it, headers and framing included)
 *     JS path      the same Slicer.data() over blocks without the kernel (MESHCAP_NO_WASM=1):
 *                  copyWithin per segment, checksum loop, headers in JavaScript — what the
 *                  kernel replaced, measured in the same run
 *     whole set    (IPv4 only) one set() of the whole 64 KiB event: the memcpy ceiling
 *   4 KiB events, IPv4 MSS 1460: slicer and copy-once baseline
 *   Pipeline (IPv4, 64 KiB and 4 KiB payloads): TraceDecoder.decodeStreamTapsRequest() on
 *     pre-encoded StreamTapsRequest messages (protobufjs, proto-schema.ts) → Pipeline (flow table,
 *     slicer, block pool, no sinks), as the gRPC door calls it, minus gRPC itself.
 *   Re-framing: reframeBlock of a full 4 MiB pcapng block into classic pcap (what a broker lane does
 *     with every block), beside one copy of the same records out of the shared memory.
 *
 * Allocation, three ways, over the timed repetitions: GCs seen by a PerformanceObserver
 * (young-generation scavenges included) per million packets; bytes allocated per packet (heapUsed
 * growth plus what each GC freed, from v8.GCProfiler); and heap retained (heapUsed after forced
 * GCs, after minus before) per million packets. The GC count depends on V8's young-generation size
 * (adaptive, 1–16 MiB per semi-space); bytes per packet do not.
 *
 *   npx tsc -p tsconfig.json && node --expose-gc dist/bench/slicer.js [--filter id] [--quick] [--no-json]
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { PipelineStats } from '../src/control/stats.js';
import { silentLogger } from '../src/control/logger.js';
import { TcpFlow } from '../src/flow/tcp-flow.js';
import type { Endpoint } from '../src/flow/address.js';
import { pcapFramer } from '../src/format/pcap.js';
import { pcapngFramer } from '../src/format/pcapng.js';
import { reframeBlock, reframedSize } from '../src/format/reframe.js';
import type { RecordFramer } from '../src/format/record-framer.js';
import { loadSchema } from '../src/ingest/proto-schema.js';
import type { StreamIdentity } from '../src/ingest/tap-event.js';
import { TraceDecoder, type StreamState } from '../src/ingest/trace-decoder.js';
import { BlockPool, type Block } from '../src/packet/block.js';
import { copyBytes } from '../src/packet/copy-bytes.js';
import { fold, sumBytesLE } from '../src/packet/checksum.js';
import { ETH_LEN, headerLength, tcpOffset } from '../src/packet/frame-template.js';
import { Slicer, type BlockOutput } from '../src/packet/slicer.js';
import { DEFAULT_PIPELINE, Pipeline } from '../src/pipeline.js';
import type { BlockSink } from '../src/sink/sink.js';
import {
  DEFAULT_HARNESS,
  fmt,
  machine,
  measureGroup,
  parseArgs,
  table,
  type BenchReport,
  type Case,
  type HarnessOptions,
  type Measured,
  type SummaryRow,
} from './harness.js';

// ---------------------------------------------------------------------------------------------
// Setup shared by the cases

const BLOCK_SIZE = DEFAULT_PIPELINE.blockSize; // 4 MiB, as in production
/** Blocks per pool: the current one, HOLD held, one spare (the pipeline case uses production's 8). */
const BLOCK_COUNT = 4;
/**
 * Full blocks the output keeps before recycling the oldest, standing in for a sink that is still
 * writing: the working set rotates through HOLD + 1 blocks (12 MiB) instead of re-filling one
 * cache-hot block, as it would in production.
 */
const HOLD = 2;
/** Distinct source events per case, at odd offsets of one arena (payloads are views into gRPC messages). */
const SOURCE_BYTES = 1 << 20;
const TS_SEC = 1_763_900_000;

/** A BlockOutput with no sink: full blocks are held briefly, then returned to the pool. */
class RecyclingOutput implements BlockOutput {
  current: Block | null = null;
  rotations = 0;
  private readonly held: Block[] = [];
  constructor(private readonly pool: BlockPool) {}

  rotate(): Block | null {
    const full = this.current;
    if (full) {
      this.held.push(full);
      if (this.held.length > HOLD) this.pool.release(this.held.shift()!);
    }
    this.current = this.pool.acquire();
    this.rotations++;
    return this.current;
  }
}

/** A sink that writes nothing and releases each block once HOLD newer ones arrived (as RecyclingOutput). */
class HoldingSink implements BlockSink {
  readonly name = 'bench-null';
  private readonly held: Array<[Block, (b: Block) => void]> = [];
  write(block: Block, release: (b: Block) => void): void {
    this.held.push([block, release]);
    if (this.held.length > HOLD) {
      const [b, r] = this.held.shift()!;
      r(b);
    }
  }
  async close(): Promise<void> {
    for (const [b, r] of this.held.splice(0)) r(b);
  }
}

/**
 * The same rotation over ordinary (not shared) buffers of the same size, for the memcpy baselines:
 * the blocks' memory is shared (the capture writer thread writes from it), and V8 copies into shared
 * memory with TypedArray#set element-wise (~10× slower); the baseline stays the plain memcpy limit.
 */
interface PlainBlock {
  readonly buf: Buffer;
  readonly size: number;
  used: number;
}
class PlainOutput {
  current: PlainBlock;
  private readonly blocks: PlainBlock[] = [];
  private next = 0;
  constructor() {
    for (let i = 0; i < BLOCK_COUNT; i++) {
      const buf = Buffer.alloc(BLOCK_SIZE);
      this.blocks.push({ buf, size: BLOCK_SIZE, used: 0 });
    }
    this.current = this.blocks[0]!;
  }
  /** The next block round-robin over HOLD + 1 of them, as RecyclingOutput cycles through its pool. */
  rotate(): PlainBlock {
    this.next = (this.next + 1) % (HOLD + 1);
    this.current = this.blocks[this.next]!;
    this.current.used = 0;
    return this.current;
  }
}

function newOutput(framer: RecordFramer = pcapngFramer, useKernel = true): RecyclingOutput {
  const out = new RecyclingOutput(new BlockPool(BLOCK_COUNT, BLOCK_SIZE, framer, useKernel));
  out.rotate();
  return out;
}

function endpoint(v6: boolean, host: number, port: number): Endpoint {
  const ip = v6 ? Uint8Array.from([0xfd, 0, 0x6d, 0x63, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, host]) : Uint8Array.from([10, 20, 0, host]);
  return { v6, ip, port, synthetic: false };
}

function newFlow(v6: boolean, mss: number, id = 1): TcpFlow {
  // Envoy is the server (port 8443); intro '' so no comment is attached: the steady state.
  return new TcpFlow(id, 'bench-node', id, endpoint(v6, 1, 8443), endpoint(v6, 2, (50000 + id) & 0xffff), mss, true, '');
}

/** `count` views of `size` bytes of random data at odd offsets of one non-pooled arena. */
function sourceEvents(size: number, count: number): { events: Buffer[]; arena: Buffer } {
  const stride = size + 13;
  const arena = Buffer.allocUnsafeSlow(stride * count + 16);
  for (let i = 0; i < arena.length; i++) arena[i] = (Math.random() * 256) | 0;
  const events: Buffer[] = [];
  for (let i = 0; i < count; i++) events.push(arena.subarray(3 + i * stride, 3 + i * stride + size));
  return { events, arena };
}

interface Shape {
  v6: boolean;
  mss: number;
  eventSize: number;
  hdr: number;
  segments: number;
  /** Payload length and pcapng record size of each segment. */
  lens: number[];
  recSizes: number[];
  /** Record bytes of a whole event. */
  eventRecordBytes: number;
}

function shape(v6: boolean, mss: number, eventSize: number, framer: RecordFramer = pcapngFramer): Shape {
  const hdr = headerLength(v6);
  const lens: number[] = [];
  for (let p = 0; p < eventSize; p += mss) lens.push(Math.min(mss, eventSize - p));
  const recSizes = lens.map((l) => framer.recordSize(hdr + l, 0, false));
  return { v6, mss, eventSize, hdr, segments: lens.length, lens, recSizes, eventRecordBytes: recSizes.reduce((a, b) => a + b, 0) };
}

const famLabel = (s: Shape) => `${s.v6 ? 'IPv6' : 'IPv4'} MSS ${s.mss}`;
const sizeLabel = (n: number) => (n >= 1024 ? `${n / 1024} KiB` : `${n} B`);

// ---------------------------------------------------------------------------------------------
// Cases

/**
 * Slicer.data() over `s`'s events. With `flows` > 1 the events go to that many flows in a scrambled
 * round (as 8 Envoys × 32 connections interleave in e2e), so the flow changes at every event.
 */
function slicerCase(id: string, s: Shape, useKernel = true, flows = 1): Case {
  const out = newOutput(pcapngFramer, useKernel);
  const slicer = new Slicer(out, { snaplen: DEFAULT_PIPELINE.snaplen });
  const all = Array.from({ length: flows }, (_, i) => newFlow(s.v6, s.mss, i + 1));
  // A fixed permutation (stride coprime with the count): neighbours in time are far apart in id.
  const order = Array.from({ length: flows }, (_, i) => all[(i * 97) % flows]!);
  let f = 0;
  const { events } = sourceEvents(s.eventSize, Math.max(2, Math.floor(SOURCE_BYTES / s.eventSize)));
  const ne = events.length;
  let e = 0;
  let ns = 0;
  return {
    id,
    label: `slicer${useKernel ? '' : ', JS path (no kernel)'} ${sizeLabel(s.eventSize)} ${famLabel(s)}${flows > 1 ? `, ${flows} flows interleaved` : ''}`,
    packetsPerUnit: s.segments,
    payloadBytesPerUnit: s.eventSize,
    batchUnits: Math.max(8, Math.round(2_000_000 / s.eventSize)),
    batch(n) {
      for (let i = 0; i < n; i++) {
        // Alternate directions, as a request/response conversation does.
        const flow = order[f]!;
        if (++f === flows) f = 0;
        const res = slicer.data(flow, e & 1, events[e]!, TS_SEC, ns, null, 0);
        if (res.packets !== s.segments) throw new Error(`slicer wrote ${res.packets} packets, expected ${s.segments} (dropped ${res.dropped})`);
        ns = (ns + 1000) % 1e9;
        if (++e === ne) e = 0;
      }
    },
  };
}

/** Copy-once memcpy: set() of preallocated MSS-sized views into the slicer's record positions. */
function baselineCase(id: string, s: Shape): Case {
  const out = new PlainOutput();
  const { events } = sourceEvents(s.eventSize, Math.max(2, Math.floor(SOURCE_BYTES / s.eventSize)));
  // The pieces, as views made once: no allocation in the timed loop.
  const pieces: Buffer[][] = events.map((ev) => s.lens.map((len, k) => ev.subarray(k * s.mss, k * s.mss + len)));
  const ne = events.length;
  const seg = s.segments;
  const head = pcapngFramer.head + s.hdr;
  const rec = s.recSizes;
  let e = 0;
  return {
    id,
    label: `memcpy baseline ${sizeLabel(s.eventSize)} ${famLabel(s)}`,
    packetsPerUnit: seg,
    payloadBytesPerUnit: s.eventSize,
    batchUnits: Math.max(8, Math.round(2_000_000 / s.eventSize)),
    batch(n) {
      let block = out.current!;
      for (let i = 0; i < n; i++) {
        const p = pieces[e]!;
        for (let k = 0; k < seg; k++) {
          if (block.used + rec[k]! > block.size) block = out.rotate()!;
          block.buf.set(p[k]!, block.used + head);
          block.used += rec[k]!;
        }
        if (++e === ne) e = 0;
      }
    },
  };
}

/** The slicer's one copy alone: copyBytes() of the event at the first segment's payload position, into the shared blocks. */
function setAloneCase(id: string, s: Shape): Case {
  const out = newOutput();
  const { events } = sourceEvents(s.eventSize, Math.max(2, Math.floor(SOURCE_BYTES / s.eventSize)));
  const ne = events.length;
  const head = pcapngFramer.head + s.hdr;
  let e = 0;
  return {
    id,
    label: `set alone (the one copy) ${sizeLabel(s.eventSize)} ${famLabel(s)}`,
    packetsPerUnit: s.segments,
    payloadBytesPerUnit: s.eventSize,
    batchUnits: Math.max(8, Math.round(2_000_000 / s.eventSize)),
    batch(n) {
      let block = out.current!;
      for (let i = 0; i < n; i++) {
        if (block.used + s.eventRecordBytes > block.size) block = out.rotate()!;
        copyBytes(block.buf, block.used + head, events[e]!);
        block.used += s.eventRecordBytes;
        if (++e === ne) e = 0;
      }
    },
  };
}

/** One set() of the whole event: the memcpy ceiling for this event size. */
function wholeSetCase(id: string, s: Shape): Case {
  const out = new PlainOutput();
  const { events } = sourceEvents(s.eventSize, Math.max(2, Math.floor(SOURCE_BYTES / s.eventSize)));
  const ne = events.length;
  let e = 0;
  return {
    id,
    label: `whole-event set() ${sizeLabel(s.eventSize)} (no pieces)`,
    packetsPerUnit: s.segments,
    payloadBytesPerUnit: s.eventSize,
    batchUnits: Math.max(8, Math.round(2_000_000 / s.eventSize)),
    batch(n) {
      let block = out.current!;
      for (let i = 0; i < n; i++) {
        if (block.used + s.eventRecordBytes > block.size) block = out.rotate()!;
        block.buf.set(events[e]!, block.used + pcapngFramer.head + s.hdr);
        block.used += s.eventRecordBytes;
        if (++e === ne) e = 0;
      }
    },
  };
}

/** Pre-encoded StreamTapsRequest messages: the stream's first message, then data messages. */
function encodeMessages(payloadSize: number): { first: Buffer; data: Buffer[] } {
  const T = loadSchema().lookupType('envoy.service.tap.v3.StreamTapsRequest');
  const enc = (o: object): Buffer => {
    const err = T.verify(o);
    if (err) throw new Error(`StreamTapsRequest: ${err}`);
    const u8 = T.encode(T.fromObject(o)).finish();
    // A copy into a Buffer of its own, as grpc-js hands each message over.
    return Buffer.from(u8);
  };
  const traceId = 7;
  const sock = (address: string, port: number) => ({ socket_address: { address, port_value: port } });
  const first = enc({
    identifier: { node: { id: 'bench-node' }, tap_id: 'bench-tap' },
    trace_id: traceId,
    trace: { socket_streamed_trace_segment: { trace_id: traceId, connection: { local_address: sock('10.20.0.1', 8443), remote_address: sock('10.20.0.2', 50123) } } },
  });
  const count = Math.max(2, Math.floor(SOURCE_BYTES / payloadSize));
  const { events } = sourceEvents(payloadSize, count);
  const data = events.map((payload, i) => {
    const body = { data: { as_bytes: payload } };
    // One fixed timestamp: the messages are replayed in a loop and time must not run backwards.
    const event = { timestamp: { seconds: TS_SEC, nanos: 0 }, ...(i % 2 === 0 ? { read: body } : { write: body }) };
    return enc({ trace_id: traceId, trace: { socket_streamed_trace_segment: { trace_id: traceId, event } } });
  });
  return { first, data };
}

function pipelineCase(id: string, payloadSize: number): Case {
  const stats = new PipelineStats();
  const pipeline = new Pipeline({ ...DEFAULT_PIPELINE, framer: pcapngFramer }, stats, silentLogger());
  pipeline.addSink(new HoldingSink());
  const decoder = new TraceDecoder(pipeline);
  const state: StreamState = { identity: null, messages: 0 };
  const anonymous = (): StreamIdentity => ({ nodeId: 'anonymous', tapId: '', source: 'grpc' });
  const { first, data } = encodeMessages(payloadSize);
  if (!decoder.decodeStreamTapsRequest(first, state, 'grpc', anonymous)) throw new Error('first message rejected');
  // One data message must become a handshake plus the payload's segments.
  if (!decoder.decodeStreamTapsRequest(data[0]!, state, 'grpc', anonymous)) throw new Error('data message rejected');
  const want = 3 + Math.ceil(payloadSize / DEFAULT_PIPELINE.mss4);
  if (stats.packets !== want || stats.payloadBytes !== payloadSize) throw new Error(`pipeline wrote ${stats.packets} packets / ${stats.payloadBytes} bytes, expected ${want} / ${payloadSize}`);
  const packetsPer = Math.ceil(payloadSize / DEFAULT_PIPELINE.mss4);
  const nm = data.length;
  const avgMsg = data.reduce((a, m) => a + m.length, 0) / nm;
  let m = 0;
  return {
    id,
    label: `pipeline decode→flow→slice ${sizeLabel(payloadSize)} msgs`,
    packetsPerUnit: packetsPer,
    payloadBytesPerUnit: payloadSize,
    inputBytesPerUnit: avgMsg,
    batchUnits: Math.max(8, Math.round(2_000_000 / payloadSize)),
    batch(n) {
      for (let i = 0; i < n; i++) {
        const msg = data[m]!;
        // What the gRPC door does per message (grpc-tap-server.ts 'data' handler).
        pipeline.onIngestMessage('grpc', msg.length);
        if (!decoder.decodeStreamTapsRequest(msg, state, 'grpc', anonymous)) throw new Error('message rejected');
        if (++m === nm) m = 0;
      }
      if (stats.totalDrops() !== 0) throw new Error(`pipeline dropped packets: ${JSON.stringify([...stats.drops])}`);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Correctness check before timing: what is measured must be right.

/** Runs one event through a fresh slicer and checks every frame's checksums and payload. */
function verify(s: Shape): void {
  const out = newOutput();
  const slicer = new Slicer(out, { snaplen: DEFAULT_PIPELINE.snaplen });
  const flow = newFlow(s.v6, s.mss);
  const { events } = sourceEvents(s.eventSize, 2);
  for (let rep = 0; rep < 3; rep++) {
    const block = out.current!;
    const first = block.count;
    slicer.data(flow, 0, events[rep & 1]!, TS_SEC, 0, null, 0);
    let pos = 0;
    for (let i = first; i < block.count; i++) {
      const f = block.frame(i);
      const ip = ETH_LEN;
      const tcp = tcpOffset(s.v6);
      if (!s.v6 && fold(sumBytesLE(f, ip, ip + 20)) !== 0xffff) throw new Error(`frame ${i}: bad IPv4 header checksum`);
      const tcpLen = f.length - tcp;
      let pseudo = 0x0600 + (((tcpLen & 0xff) << 8) | (tcpLen >>> 8));
      pseudo += s.v6 ? sumBytesLE(f, ip + 8, ip + 40) : sumBytesLE(f, ip + 12, ip + 20);
      if (fold(pseudo + sumBytesLE(f, tcp, f.length)) !== 0xffff) throw new Error(`frame ${i}: bad TCP checksum`);
      const payload = f.subarray(s.hdr);
      if (!payload.equals(events[rep & 1]!.subarray(pos, pos + payload.length))) throw new Error(`frame ${i}: payload differs`);
      pos += payload.length;
    }
    if (pos !== s.eventSize) throw new Error(`frames carry ${pos} bytes, expected ${s.eventSize}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Running and reporting

interface Group {
  title: string;
  /** Case ids and constructors: cases are built just before their group runs (each owns blocks). */
  cases: Array<[string, () => Case]>;
}

function slicerGroups(v4 = shape(false, 1460, 65536), v6 = shape(true, 1440, 65536), small = shape(false, 1460, 4096)): Group[] {
  return [
    {
      title: '64 KiB events, IPv4, MSS 1460',
      cases: [
        ['memcpy-64k-v4', () => baselineCase('memcpy-64k-v4', v4)],
        ['slicer-64k-v4', () => slicerCase('slicer-64k-v4', v4)],
        ['set-64k-v4', () => setAloneCase('set-64k-v4', v4)],
        ['jsslicer-64k-v4', () => slicerCase('jsslicer-64k-v4', v4, false)],
        ['wholeset-64k', () => wholeSetCase('wholeset-64k', v4)],
      ],
    },
    {
      title: '64 KiB events, IPv6, MSS 1440',
      cases: [
        ['memcpy-64k-v6', () => baselineCase('memcpy-64k-v6', v6)],
        ['slicer-64k-v6', () => slicerCase('slicer-64k-v6', v6)],
        ['set-64k-v6', () => setAloneCase('set-64k-v6', v6)],
        ['jsslicer-64k-v6', () => slicerCase('jsslicer-64k-v6', v6, false)],
      ],
    },
    {
      title: '4 KiB events, IPv4, MSS 1460',
      cases: [
        ['memcpy-4k-v4', () => baselineCase('memcpy-4k-v4', small)],
        ['slicer-4k-v4', () => slicerCase('slicer-4k-v4', small)],
        ['slicer-4k-v4-256flows', () => slicerCase('slicer-4k-v4-256flows', small, true, 256)],
      ],
    },
    {
      title: 'Pipeline: TraceDecoder → FlowTable → Slicer (IPv4, MSS 1460, no sinks)',
      cases: [
        ['pipeline-64k', () => pipelineCase('pipeline-64k', 65536)],
        ['pipeline-4k', () => pipelineCase('pipeline-4k', 4096)],
      ],
    },
    {
      title: 'Re-framing for a sink in another format (a broker lane in classic pcap)',
      cases: [
        ['blockcopy-4m', () => blockCopyCase('blockcopy-4m')],
        ['reframe-4m-pcap', () => reframeCase('reframe-4m-pcap')],
      ],
    },
  ];
}

/**
 * A full 4 MiB pcapng block of 64 KiB IPv4 events (as the slicer leaves it), for the re-framing
 * cases: what a broker lane in classic pcap does with every block.
 */
function fullBlock(): Block {
  const out = newOutput();
  const slicer = new Slicer(out, { snaplen: DEFAULT_PIPELINE.snaplen });
  const flow = newFlow(false, 1460);
  const { events } = sourceEvents(65536, 4);
  const block = out.current!;
  for (let e = 0; block.free > 2 * 65536; e++) slicer.data(flow, e & 1, events[e & 3]!, 1_700_000_000 + e, e, null, 0);
  return block;
}

/** reframeBlock of a whole pcapng block into classic pcap (the broker sink's default stream format). */
function reframeCase(id: string): Case {
  const block = fullBlock();
  const out = Buffer.allocUnsafeSlow(reframedSize(block, pcapFramer).bytes);
  return {
    id,
    label: 'reframeBlock pcapng → pcap, 4 MiB block',
    packetsPerUnit: block.count,
    payloadBytesPerUnit: block.recordBytes,
    batchUnits: 1,
    batch(n) {
      for (let i = 0; i < n; i++) reframeBlock(block, pcapFramer, out);
    },
  };
}

/** Baseline: one copy of the block's records out of the shared memory (copyBytes), nothing else. */
function blockCopyCase(id: string): Case {
  const block = fullBlock();
  const out = Buffer.allocUnsafeSlow(block.recordBytes);
  const records = block.records();
  return {
    id,
    label: 'copy of the block\'s records (one copyBytes)',
    packetsPerUnit: block.count,
    payloadBytesPerUnit: block.recordBytes,
    batchUnits: 1,
    batch(n) {
      for (let i = 0; i < n; i++) copyBytes(out, 0, records);
    },
  };
}

/** One case by id, built fresh (for tools: profilers, allocation tracing). */
export function buildCase(id: string): Case {
  for (const g of slicerGroups()) for (const [cid, make] of g.cases) if (cid === id) return make();
  throw new Error(`no slicer case ${id}; known: ${slicerGroups().flatMap((g) => g.cases.map(([c]) => c)).join(', ')}`);
}

export interface SlicerBenchOptions {
  filter?: string | null;
  harness?: HarnessOptions;
  json?: boolean;
  /** Print this benchmark's own summary table (run-all prints one for every benchmark instead). */
  printSummary?: boolean;
  log?: (line: string) => void;
}

export async function runSlicerBench(opts: SlicerBenchOptions = {}): Promise<BenchReport> {
  const log = opts.log ?? ((l: string) => console.log(l));
  const harness = opts.harness ?? DEFAULT_HARNESS;
  const v4 = shape(false, 1460, 65536);
  const v6 = shape(true, 1440, 65536);
  const small = shape(false, 1460, 4096);
  for (const s of [v4, v6, small]) verify(s);

  const groups = slicerGroups(v4, v6, small);
  const filter = opts.filter ?? null;
  const results = new Map<string, Measured>();
  const started = Date.now();
  for (const g of groups) {
    const cases = (filter ? g.cases.filter(([id]) => id.includes(filter)) : g.cases).map(([, make]) => make());
    if (cases.length === 0) continue;
    log(`\n## ${g.title}`);
    for (const m of await measureGroup(cases, harness)) results.set(m.id, m);
    const rows: string[][] = [['case', 'GB/s', 'Mpps', 'ns/pkt', 'µs/unit', 'MB/s in', 'GC/Mpkt (minor+major)', 'alloc B/pkt', 'retained B/Mpkt', 'reps GB/s']];
    for (const c of cases) {
      const m = results.get(c.id)!;
      rows.push([
        m.label,
        fmt(m.gbps),
        fmt(m.mpps),
        fmt(m.nsPerPacket, 1),
        fmt(m.usPerUnit, 2),
        fmt(m.inputMBps, 0),
        `${fmt(m.gcPerMpkt, 2)} (${fmt(m.minorGcPerMpkt, 2)}+${fmt(m.majorGcPerMpkt, 2)})`,
        fmt(m.allocBytesPerPacket, 1),
        fmt(m.heapGrowthPerMpkt, 0),
        m.reps.map((r) => fmt((r.units * c.payloadBytesPerUnit) / r.seconds / 1e9)).join('/'),
      ]);
    }
    log(table(rows));
  }
  const elapsed = (Date.now() - started) / 1000;

  // Ratios and the cost split (ns per packet: copy + checksum + the rest).
  const get = (id: string) => results.get(id);
  const gcRow = (what: string, m: Measured): SummaryRow => ({
    bench: 'slicer',
    figure: `GCs per Mpkt, ${what} (observed)`,
    value: fmt(m.gcPerMpkt, 2),
    baseline: '',
    ratio: '',
    target: '0',
  });
  const allocRow = (what: string, m: Measured): SummaryRow => ({
    bench: 'slicer',
    figure: `heap alloc B/pkt, ${what}`,
    value: fmt(m.allocBytesPerPacket, 1),
    baseline: '',
    ratio: '',
    target: '0',
  });
  const summary: SummaryRow[] = [];
  const ratio = (a: number, b: number) => `${fmt((100 * a) / b, 0)}%`;
  const splitRows: string[][] = [['per packet (ns)', 'slicer', 'set (the one copy)', 'rest (kernel: move+sum, headers, framing; JS)', 'copy-once memcpy', 'JS path (no kernel)']];
  for (const [tag, s] of [['64k-v4', v4], ['64k-v6', v6]] as const) {
    const sl = get(`slicer-${tag}`);
    const base = get(`memcpy-${tag}`);
    const cp = get(`set-${tag}`);
    const js = get(`jsslicer-${tag}`);
    if (sl && base) {
      summary.push({ bench: 'slicer', figure: `slicer 64 KiB ${famLabel(s)} (GB/s)`, value: fmt(sl.gbps), baseline: `memcpy ${fmt(base.gbps)}`, ratio: ratio(sl.gbps, base.gbps), target: '≥ 50%' });
      summary.push({ bench: 'slicer', figure: `slicer 64 KiB ${famLabel(s)} (Mpps)`, value: fmt(sl.mpps), baseline: '', ratio: '', target: '' });
    }
    if (sl) summary.push(gcRow(`64 KiB ${famLabel(s)}`, sl), allocRow(`64 KiB ${famLabel(s)}`, sl));
    if (sl && cp) {
      splitRows.push([famLabel(s), fmt(sl.nsPerPacket, 1), fmt(cp.nsPerPacket, 1), fmt(sl.nsPerPacket - cp.nsPerPacket, 1), base ? fmt(base.nsPerPacket, 1) : '-', js ? fmt(js.nsPerPacket, 1) : '-']);
    }
    if (sl && js) summary.push({ bench: 'slicer', figure: `slicer ${famLabel(s)}: kernel vs JS path (GB/s)`, value: fmt(sl.gbps), baseline: `JS path ${fmt(js.gbps)}`, ratio: `${fmt(sl.gbps / js.gbps, 1)}×`, target: '' });
  }
  const whole = get('wholeset-64k');
  const base4 = get('memcpy-64k-v4');
  if (whole && base4) summary.push({ bench: 'slicer', figure: 'copy-once memcpy in MSS pieces (GB/s)', value: fmt(base4.gbps), baseline: `whole-event set ${fmt(whole.gbps)}`, ratio: ratio(base4.gbps, whole.gbps), target: '' });
  const cp4 = get('set-64k-v4');
  if (cp4 && base4) summary.push({ bench: 'slicer', figure: "slicer's one copy alone (set), IPv4 (GB/s)", value: fmt(cp4.gbps), baseline: `memcpy ${fmt(base4.gbps)}`, ratio: ratio(cp4.gbps, base4.gbps), target: '' });
  const sm = get('slicer-4k-v4');
  const smBase = get('memcpy-4k-v4');
  if (sm) summary.push({ bench: 'slicer', figure: 'slicer 4 KiB IPv4 (GB/s)', value: fmt(sm.gbps), baseline: smBase ? `memcpy ${fmt(smBase.gbps)}` : '', ratio: smBase ? ratio(sm.gbps, smBase.gbps) : '', target: '' });
  if (sm) summary.push(gcRow('4 KiB IPv4', sm), allocRow('4 KiB IPv4', sm));
  for (const [tag, slId] of [['64k', 'slicer-64k-v4'], ['4k', 'slicer-4k-v4']] as const) {
    const p = get(`pipeline-${tag}`);
    const sl = get(slId);
    if (!p) continue;
    summary.push({ bench: 'slicer', figure: `pipeline ${tag === '64k' ? '64 KiB' : '4 KiB'} msgs (MB/s in)`, value: fmt(p.inputMBps, 0), baseline: sl ? `slicer ${fmt(sl.gbps * 1000, 0)} MB/s payload` : '', ratio: sl ? ratio(p.gbps, sl.gbps) : '', target: '' });
    summary.push({ bench: 'slicer', figure: `pipeline ${tag === '64k' ? '64 KiB' : '4 KiB'} (µs/msg)`, value: fmt(p.usPerUnit, 2), baseline: sl ? `slicer ${fmt(sl.usPerUnit, 2)} µs/event` : '', ratio: '', target: '' });
    summary.push(gcRow(`pipeline ${tag === '64k' ? '64 KiB' : '4 KiB'}`, p), allocRow(`pipeline ${tag === '64k' ? '64 KiB' : '4 KiB'}`, p));
  }

  const rf = get('reframe-4m-pcap');
  const bc = get('blockcopy-4m');
  if (rf) {
    summary.push({ bench: 'slicer', figure: 'reframe pcapng → pcap, 4 MiB block (GB/s of records)', value: fmt(rf.gbps), baseline: bc ? `block copy ${fmt(bc.gbps)}` : '', ratio: bc ? ratio(rf.gbps, bc.gbps) : '', target: '' });
    summary.push(allocRow('reframe pcapng → pcap', rf));
  }

  if (splitRows.length > 1) {
    log('\n## Where a 64 KiB event goes (median ns per packet; rest = slicer − set)');
    log(table(splitRows));
  }
  if (opts.printSummary !== false) {
    log('\n## Slicer summary');
    log(table([['figure', 'value', 'baseline (same run)', 'ratio', 'target'], ...summary.map((r) => [r.figure, r.value, r.baseline, r.ratio, r.target])]));
  }
  log(`\n(${results.size} cases in ${fmt(elapsed, 1)} s; rep ${harness.repMs} ms × ${harness.reps}, warm-up ${harness.warmupMs} ms)`);

  const report: BenchReport = { name: 'slicer', summary };
  if (opts.json !== false && !filter) {
    const m = machine();
    const dir = path.join(packageRoot(), 'bench', 'results');
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, `slicer-${m.date.slice(0, 10)}.json`);
    const json = {
      bench: 'slicer',
      machine: m,
      harness,
      setup: {
        blockSize: BLOCK_SIZE,
        blockCount: BLOCK_COUNT,
        heldBlocks: HOLD,
        framer: 'pcapng',
        snaplen: DEFAULT_PIPELINE.snaplen,
        sourceBytesPerCase: SOURCE_BYTES,
      },
      elapsedSeconds: elapsed,
      cases: [...results.values()].map(({ reps, ...rest }) => ({ ...rest, reps })),
      summary,
    };
    fs.writeFileSync(file, `${JSON.stringify(json, null, 2)}\n`);
    report.jsonPath = path.relative(process.cwd(), file) || file;
    log(`results: ${report.jsonPath}`);
  }
  return report;
}

function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'bench'))) return dir;
    dir = path.dirname(dir);
  }
  return process.cwd();
}

export function harnessFromArgs(args: ReturnType<typeof parseArgs>): HarnessOptions {
  const h = args.quick ? { warmupMs: 150, repMs: 250, reps: 3 } : { ...DEFAULT_HARNESS };
  if (args.repMs) h.repMs = args.repMs;
  if (args.warmupMs) h.warmupMs = args.warmupMs;
  return h;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = parseArgs(process.argv.slice(2));
  await runSlicerBench({ filter: args.filter, harness: harnessFromArgs(args), json: args.json });
}
