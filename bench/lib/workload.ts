/**
 * The traffic the end-to-end benchmarks send: what a busy sidecar's transport-socket tap streams.
 *
 * One stream carries many interleaved connections (`concurrent` open at any time, events picked at
 * random among them): each starts with its `connection` segment, then carries read and write events
 * of 64 KiB or 4 KiB with Envoy's seq_num (>= 1.37: one counter per connection, advanced by the bytes
 * of each event, `closed` = previous + 1), then `closed`; a new connection replaces each one closed.
 * Envoy port 8443 on the listener side for 3 connections in 4, an upstream connection (Envoy on an
 * ephemeral port, peer on 8080) for the fourth. Everything is seeded, so every run and every target
 * receives byte-identical traffic.
 *
 * A script ends with every connection closed, so a load generator can replay it in a loop (trace ids
 * are reused only after their connection closed); it is cut into chunks of whole gRPC-framed
 * messages, each with the exact counts meshcap must show for it (messages, bytes, packets).
 */
import { GRPC_FRAME_HEAD, packetsFor, streamTapsRequest, type TapEventSpec } from './tapwire.js';

export const KIB64 = 65536;
export const KIB4 = 4096;

export interface WorkloadOptions {
  seed: number;
  /** Connections open at once, interleaved. */
  concurrent: number;
  /** Stop opening connections once this much payload was generated. */
  payloadBytes: number;
  /** Share of data events that are 64 KiB (the rest are 4 KiB). */
  bigShare: number;
  /** Data events per connection, uniform in [min, max]. */
  eventsPerConnection: [number, number];
  /** Share of data events that are reads (bytes from the peer). */
  readShare: number;
  mss: number;
  tsBase: number;
  /** Close every open connection once `payloadBytes` is reached (long-lived connections, e.g. one file each). */
  closeAtTarget?: boolean;
}

export const DEFAULT_WORKLOAD: WorkloadOptions = {
  seed: 1,
  concurrent: 32,
  payloadBytes: 48 << 20,
  bigShare: 0.5,
  eventsPerConnection: [2, 24],
  readShare: 0.4,
  mss: 1460,
  tsBase: 1_763_900_000,
};

/** A seeded PRNG (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random bytes (seeded) that event payloads are views of, at varying offsets. */
export function payloadArena(bytes: number, seed: number): Buffer {
  const b = Buffer.allocUnsafeSlow(bytes);
  const r = prng(seed ^ 0x5eed);
  const u32 = new Uint32Array(b.buffer, b.byteOffset, bytes >>> 2);
  for (let i = 0; i < u32.length; i++) u32[i] = (r() * 4294967296) >>> 0;
  return b;
}

export interface GeneratedEvent {
  traceId: number;
  ev: TapEventSpec;
  /** Packets meshcap makes of it. */
  packets: number;
  /** The connection's endpoints (for tools that need them per connection, e.g. text2pcap). */
  local: { address: string; port: number };
  remote: { address: string; port: number };
}

interface Conn {
  traceId: number;
  seq: number;
  started: boolean;
  remaining: number;
  local: { address: string; port: number };
  remote: { address: string; port: number };
}

/** Generates the events of a workload in stream order; every connection is closed at the end. */
export function* generateEvents(o: WorkloadOptions): Generator<GeneratedEvent> {
  const rnd = prng(o.seed);
  const arena = payloadArena(4 << 20, o.seed);
  const open: Conn[] = [];
  let nextTrace = 1;
  let payload = 0;
  let t = 0;
  const ts = () => {
    t += 20_000; // 20 µs between events
    return { tsSec: o.tsBase + Math.floor(t / 1e9), tsNsec: t % 1e9 };
  };
  const openOne = (): GeneratedEvent => {
    const id = nextTrace++;
    const upstream = id % 4 === 0;
    const a = (id >>> 8) & 255;
    const b = id & 255;
    const local = upstream ? { address: `10.1.${a}.${b}`, port: 32768 + (id % 28000) } : { address: `10.1.${a}.${b}`, port: 8443 };
    const remote = upstream ? { address: `10.3.${a}.${b}`, port: 8080 } : { address: `10.2.${a}.${b}`, port: 32768 + (id % 28000) };
    const [lo, hi] = o.eventsPerConnection;
    const c: Conn = { traceId: id, seq: 1, started: false, remaining: lo + Math.floor(rnd() * (hi - lo + 1)), local, remote };
    open.push(c);
    return { traceId: id, ev: { kind: 'connection', local, remote }, packets: 0, local, remote };
  };
  for (;;) {
    const opening = payload < o.payloadBytes;
    if (opening && open.length < o.concurrent) {
      yield openOne();
      continue;
    }
    if (open.length === 0) return;
    const i = Math.floor(rnd() * open.length);
    const c = open[i]!;
    if (!opening && o.closeAtTarget) c.remaining = 0;
    if (c.remaining > 0) {
      const size = rnd() < o.bigShare ? KIB64 : KIB4;
      const off = Math.floor(rnd() * (arena.length - size));
      const ev: TapEventSpec = { kind: rnd() < o.readShare ? 'read' : 'write', ...ts(), payload: arena.subarray(off, off + size), seqNum: c.seq };
      const packets = packetsFor(ev, c.started, o.mss);
      c.started = true;
      c.seq += size;
      c.remaining--;
      payload += size;
      yield { traceId: c.traceId, ev, packets, local: c.local, remote: c.remote };
    } else {
      const ev: TapEventSpec = { kind: 'closed', ...ts(), seqNum: c.seq };
      const packets = packetsFor(ev, c.started, o.mss);
      open.splice(i, 1);
      yield { traceId: c.traceId, ev, packets, local: c.local, remote: c.remote };
    }
  }
}

/** A run of whole gRPC-framed StreamTapsRequests and what meshcap must make of them. */
export interface Chunk {
  buf: Buffer;
  messages: number;
  /** Message bytes without the 5-byte gRPC prefix (what meshcap_ingest_bytes_total counts). */
  msgBytes: number;
  payload: number;
  packets: number;
  dataEvents: number;
  opened: number;
  closed: number;
}

export interface Script {
  chunks: Chunk[];
  total: Omit<Chunk, 'buf'>;
  /** Payload bytes per message byte: converts a server's message-byte rate into payload MB/s. */
  payloadPerMsgByte: number;
  bigShareBytes: number;
}

/** The workload as gRPC-framed chunks of about `chunkBytes` each. */
export function buildScript(o: WorkloadOptions, chunkBytes = 256 * 1024): Script {
  const chunks: Chunk[] = [];
  let parts: Buffer[] = [];
  let cur = { messages: 0, msgBytes: 0, payload: 0, packets: 0, dataEvents: 0, opened: 0, closed: 0 };
  let curBytes = 0;
  let big = 0;
  const total = { ...cur };
  const flush = () => {
    if (parts.length === 0) return;
    chunks.push({ buf: Buffer.concat(parts, curBytes), ...cur });
    for (const k of Object.keys(total) as Array<keyof typeof total>) total[k] += cur[k];
    parts = [];
    curBytes = 0;
    cur = { messages: 0, msgBytes: 0, payload: 0, packets: 0, dataEvents: 0, opened: 0, closed: 0 };
  };
  for (const g of generateEvents(o)) {
    const m = streamTapsRequest(g.traceId, g.ev);
    parts.push(m);
    curBytes += m.length;
    cur.messages++;
    cur.msgBytes += m.length - GRPC_FRAME_HEAD;
    cur.packets += g.packets;
    if (g.ev.kind === 'connection') cur.opened++;
    else if (g.ev.kind === 'closed') cur.closed++;
    else {
      cur.payload += g.ev.payload.length;
      cur.dataEvents++;
      if (g.ev.payload.length === KIB64) big += KIB64;
    }
    if (curBytes >= chunkBytes) flush();
  }
  flush();
  return { chunks, total, payloadPerMsgByte: total.payload / total.msgBytes, bigShareBytes: big / total.payload };
}
