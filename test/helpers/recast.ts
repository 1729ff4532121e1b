/**
 * Recasts a recorded capture into the tap stream a SERVER-SIDE Envoy (transport-socket tap,
 * streaming, Envoy 1.37 semantics) would have sent for every TCP connection in it.
 *
 * - Envoy sits at the server: `local_address` = server ip:port, `remote_address` = client.
 * - `read` = client→server bytes, `write` = server→client bytes, in wire order. Each direction is
 *   reassembled exactly from TCP sequence numbers (SYN/FIN consume one, retransmitted/duplicate
 *   bytes dropped, out-of-order segments held until the gap fills).
 * - Consecutive same-direction bytes form a "run"; runs are re-cut into events of random sizes
 *   (log-uniform 1 B .. 64 KiB, seeded PRNG), so event boundaries do not follow tcpdump's.
 * - `write.end_stream` where the server sent its FIN; a final `closed` event at the last packet.
 * - `seq_num`: one counter per connection for both directions, first event 1, advanced by each
 *   event's payload length, `closed` = counter + 1 (Envoy's unit tests: read "hello" 1,
 *   write "world" 6, closed 12).
 * - Timestamps: capture time (ns) of the packet that carried the event's last byte.
 * - Connections are interleaved in capture order.
 */
import { readTcpPackets, type TcpPacket } from './pcap-read.js';

/** mulberry32: small, fast, seedable PRNG returning floats in [0, 1). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Endpoint {
  addr: string;
  port: number;
}

export type RecastEvent =
  | { kind: 'read'; data: Buffer; seqNum: number; tsNs: bigint; packetIndex: number }
  | { kind: 'write'; data: Buffer; endStream: boolean; seqNum: number; tsNs: bigint; packetIndex: number }
  | { kind: 'closed'; seqNum: number; tsNs: bigint; packetIndex: number };

export interface RecastConnection {
  /** Envoy connection id (trace_id) given to this connection. */
  traceId: number;
  ipVersion: 4 | 6;
  client: Endpoint;
  server: Endpoint;
  /** Exact reassembled payload per direction. */
  clientToServer: Buffer;
  serverToClient: Buffer;
  /** Handshake / teardown as seen on the wire. */
  synSeen: boolean;
  clientFin: boolean;
  serverFin: boolean;
  rst: boolean;
  /** Both FINs, or a RST, were captured. */
  complete: boolean;
  /** Bytes dropped as retransmissions/duplicates, and bytes never received (gaps), per direction. */
  duplicateBytes: { clientToServer: number; serverToClient: number };
  gapBytes: { clientToServer: number; serverToClient: number };
  firstTsNs: bigint;
  lastTsNs: bigint;
  /** Index (in the capture's TCP packet list) of the first packet. */
  firstPacketIndex: number;
  events: RecastEvent[];
}

/** A StreamTapsRequest as a plain object with protobufjs keepCase field names. */
export interface StreamTapsRequestObject {
  identifier?: { node: { id: string; cluster: string }; tap_id: string };
  trace_id?: number;
  trace: { socket_streamed_trace_segment: Record<string, unknown> };
}

export interface RecastMessage {
  traceId: number;
  msg: StreamTapsRequestObject;
  /** Capture packet index this message is anchored to (for merging/ordering). */
  packetIndex: number;
}

export interface RecastOptions {
  /** PRNG seed for chunk sizes (default 1). */
  seed?: number;
  /** Chunk size bounds (default 1 .. 65536). */
  minChunk?: number;
  maxChunk?: number;
  /** Server ports, to orient connections whose SYN was not captured (default: lower port). */
  serverPorts?: number[];
  /** First trace_id (Envoy connection id); following connections count up (default 1). */
  firstTraceId?: number;
  /** Identity carried by the first message. */
  node?: { id: string; cluster?: string };
  tapId?: string;
  /** Also set StreamTapsRequest.trace_id (field 2) on every message (default true). */
  setRequestTraceId?: boolean;
  /**
   * Envoy >= 1.35 `min_streamed_sent_bytes` batching: accumulate events into one
   * `SocketStreamedTraceSegment.events` until >= this many payload bytes (closed flushes).
   * 0 / unset: one segment per event.
   */
  batchMinBytes?: number;
  /** Envoy >= 1.34 `set_connection_per_event`: repeat the connection in every event. */
  connectionPerEvent?: boolean;
  /** Omit seq_num (pre-1.37 Envoy). */
  omitSeqNum?: boolean;
}

export interface RecastResult {
  messages: RecastMessage[];
  connections: RecastConnection[];
}

interface DirState {
  base: number | null; // seq of the first payload byte
  next: number; // relative offset of the next expected byte
  pending: Array<{ start: number; data: Buffer; packetIndex: number }>;
  fin: boolean;
  finPacketIndex: number;
  dup: number;
}

interface Chunk {
  fromClient: boolean;
  data: Buffer;
  packetIndex: number;
}

interface ConnBuild {
  key: string;
  ipVersion: 4 | 6;
  client: Endpoint;
  server: Endpoint;
  synSeen: boolean;
  c2s: DirState;
  s2c: DirState;
  chunks: Chunk[];
  rst: boolean;
  firstPacketIndex: number;
  lastPacketIndex: number;
  serverFinPacketIndex: number;
}

function newDir(): DirState {
  return { base: null, next: 0, pending: [], fin: false, finPacketIndex: -1, dup: 0 };
}

const epKey = (addr: string, port: number) => `${addr}|${port}`;

/** Reassembles every TCP connection of a packet list (see module comment). */
export function reassembleConnections(
  packets: Array<TcpPacket & { tsNs: bigint }>,
  opts: { serverPorts?: number[] } = {},
): Array<Omit<RecastConnection, 'traceId' | 'events'> & { chunks: Chunk[]; serverFinPacketIndex: number; lastPacketIndex: number }> {
  const serverPorts = new Set(opts.serverPorts ?? []);
  const active = new Map<string, ConnBuild>();
  const all: ConnBuild[] = [];

  packets.forEach((p, idx) => {
    const a = epKey(p.src, p.srcPort);
    const b = epKey(p.dst, p.dstPort);
    const key = a < b ? `${a}#${b}` : `${b}#${a}`;
    let c = active.get(key);
    const pureSyn = p.syn && !p.ackFlag;
    if (c && pureSyn) {
      // A new SYN on a tuple whose connection finished (or a SYN retransmission).
      const finished = c.rst || (c.c2s.fin && c.s2c.fin);
      const sameIsn = c.synSeen && c.c2s.base !== null && ((p.seq + 1) >>> 0) === c.c2s.base;
      if (finished && !sameIsn) c = undefined;
    }
    if (!c) {
      let clientIsSrc: boolean;
      if (pureSyn) clientIsSrc = true;
      else if (p.syn && p.ackFlag) clientIsSrc = false;
      else if (serverPorts.has(p.dstPort) && !serverPorts.has(p.srcPort)) clientIsSrc = true;
      else if (serverPorts.has(p.srcPort) && !serverPorts.has(p.dstPort)) clientIsSrc = false;
      else clientIsSrc = p.srcPort > p.dstPort;
      c = {
        key,
        ipVersion: p.ipVersion,
        client: clientIsSrc ? { addr: p.src, port: p.srcPort } : { addr: p.dst, port: p.dstPort },
        server: clientIsSrc ? { addr: p.dst, port: p.dstPort } : { addr: p.src, port: p.srcPort },
        synSeen: false,
        c2s: newDir(),
        s2c: newDir(),
        chunks: [],
        rst: false,
        firstPacketIndex: idx,
        lastPacketIndex: idx,
        serverFinPacketIndex: -1,
      };
      active.set(key, c);
      all.push(c);
    }
    c.lastPacketIndex = idx;
    const fromClient = p.src === c.client.addr && p.srcPort === c.client.port;
    const d = fromClient ? c.c2s : c.s2c;
    if (p.syn) {
      if (fromClient && !p.ackFlag) c.synSeen = true;
      if (d.base === null) d.base = (p.seq + 1) >>> 0;
    }
    if (p.rst) c.rst = true;
    const dataSeq = p.syn ? (p.seq + 1) >>> 0 : p.seq;
    if (p.payload.length > 0 && !p.rst) {
      if (d.base === null) d.base = dataSeq;
      const start = (dataSeq - d.base) | 0; // signed: data just before base (keep-alive probes) is negative
      accept(c, d, fromClient, start, p.payload, idx);
    }
    if (p.fin && !d.fin) {
      d.fin = true;
      d.finPacketIndex = idx;
      if (!fromClient) c.serverFinPacketIndex = idx;
    }
  });

  return all.map((c) => {
    const gap = (d: DirState) => d.pending.reduce((n, s) => n + Math.max(0, s.start + s.data.length - Math.max(s.start, d.next)), 0);
    const c2s = Buffer.concat(c.chunks.filter((x) => x.fromClient).map((x) => x.data));
    const s2c = Buffer.concat(c.chunks.filter((x) => !x.fromClient).map((x) => x.data));
    return {
      ipVersion: c.ipVersion,
      client: c.client,
      server: c.server,
      clientToServer: c2s,
      serverToClient: s2c,
      synSeen: c.synSeen,
      clientFin: c.c2s.fin,
      serverFin: c.s2c.fin,
      rst: c.rst,
      complete: c.rst || (c.c2s.fin && c.s2c.fin),
      duplicateBytes: { clientToServer: c.c2s.dup, serverToClient: c.s2c.dup },
      gapBytes: { clientToServer: gap(c.c2s), serverToClient: gap(c.s2c) },
      firstTsNs: packets[c.firstPacketIndex]!.tsNs,
      lastTsNs: packets[c.lastPacketIndex]!.tsNs,
      firstPacketIndex: c.firstPacketIndex,
      lastPacketIndex: c.lastPacketIndex,
      serverFinPacketIndex: c.serverFinPacketIndex,
      chunks: c.chunks,
    };
  });
}

function accept(c: ConnBuild, d: DirState, fromClient: boolean, start: number, payload: Buffer, idx: number): void {
  const end = start + payload.length;
  if (end <= d.next) {
    d.dup += payload.length;
    return;
  }
  if (start > d.next) {
    d.pending.push({ start, data: Buffer.from(payload), packetIndex: idx });
    return;
  }
  d.dup += d.next - start;
  push(c, fromClient, Buffer.from(payload.subarray(d.next - start)), idx);
  d.next = end;
  // Drain out-of-order segments the new bytes made contiguous.
  for (;;) {
    d.pending.sort((x, y) => x.start - y.start);
    const i = d.pending.findIndex((s) => s.start <= d.next);
    if (i < 0) break;
    const s = d.pending.splice(i, 1)[0]!;
    const sEnd = s.start + s.data.length;
    if (sEnd <= d.next) {
      d.dup += s.data.length;
      continue;
    }
    d.dup += d.next - s.start;
    push(c, fromClient, s.data.subarray(d.next - s.start), idx);
    d.next = sEnd;
  }
}

function push(c: ConnBuild, fromClient: boolean, data: Buffer, idx: number): void {
  if (data.length > 0) c.chunks.push({ fromClient, data, packetIndex: idx });
}

/** Reads a capture and recasts it (see module comment). */
export function recastPcap(file: string, opts: RecastOptions = {}): RecastResult {
  return recastPackets(readTcpPackets(file), opts);
}

export function recastPackets(packets: Array<TcpPacket & { tsNs: bigint }>, opts: RecastOptions = {}): RecastResult {
  const rnd = seededRandom(opts.seed ?? 1);
  const minChunk = Math.max(1, opts.minChunk ?? 1);
  const maxChunk = Math.max(minChunk, opts.maxChunk ?? 65536);
  const chunkSize = () => {
    const lo = Math.log(minChunk);
    const hi = Math.log(maxChunk + 1);
    return Math.min(maxChunk, Math.max(minChunk, Math.floor(Math.exp(lo + rnd() * (hi - lo)))));
  };
  const built = reassembleConnections(packets, opts);
  let nextTraceId = opts.firstTraceId ?? 1;
  const connections: RecastConnection[] = [];
  const anchored: Array<{ conn: RecastConnection; packetIndex: number; order: number; piece: Record<string, unknown>; kind: 'connection' | 'events' }> = [];
  let order = 0;

  for (const b of built) {
    const traceId = nextTraceId++;
    const events: RecastEvent[] = [];
    let seq = 1;
    // Group chunks into runs of one direction, then re-cut each run.
    let i = 0;
    let serverFinDone = b.serverFinPacketIndex < 0;
    const emitServerFin = (beforePacketIndex: number) => {
      // The FIN is placed after every event whose bytes arrived no later than the FIN packet.
      if (serverFinDone || b.serverFinPacketIndex > beforePacketIndex) return;
      serverFinDone = true;
      const last = events[events.length - 1];
      if (last && last.kind === 'write') {
        last.endStream = true;
      } else {
        // Never anchor before the previous event (a gap filled after the FIN packet).
        const pi = Math.max(b.serverFinPacketIndex, last?.packetIndex ?? 0);
        events.push({ kind: 'write', data: Buffer.alloc(0), endStream: true, seqNum: seq, tsNs: packets[pi]!.tsNs, packetIndex: pi });
      }
    };
    while (i < b.chunks.length) {
      const fromClient = b.chunks[i]!.fromClient;
      let j = i;
      while (j < b.chunks.length && b.chunks[j]!.fromClient === fromClient) j++;
      const run = b.chunks.slice(i, j);
      emitServerFin(run[0]!.packetIndex - 1);
      const data = Buffer.concat(run.map((r) => r.data));
      // ends[k] = run offset just past chunk k's bytes.
      const ends: number[] = [];
      let acc = 0;
      for (const r of run) ends.push((acc += r.data.length));
      let off = 0;
      let k = 0;
      while (off < data.length) {
        const n = Math.min(chunkSize(), data.length - off);
        const lastByte = off + n - 1;
        while (ends[k]! <= lastByte) k++;
        const pi = run[k]!.packetIndex;
        const piece = data.subarray(off, off + n);
        const tsNs = packets[pi]!.tsNs;
        if (fromClient) events.push({ kind: 'read', data: piece, seqNum: seq, tsNs, packetIndex: pi });
        else events.push({ kind: 'write', data: piece, endStream: false, seqNum: seq, tsNs, packetIndex: pi });
        seq += n;
        off += n;
      }
      i = j;
    }
    emitServerFin(Number.MAX_SAFE_INTEGER);
    events.push({ kind: 'closed', seqNum: seq + 1, tsNs: packets[b.lastPacketIndex]!.tsNs, packetIndex: b.lastPacketIndex });

    const conn: RecastConnection = {
      traceId,
      ipVersion: b.ipVersion,
      client: b.client,
      server: b.server,
      clientToServer: b.clientToServer,
      serverToClient: b.serverToClient,
      synSeen: b.synSeen,
      clientFin: b.clientFin,
      serverFin: b.serverFin,
      rst: b.rst,
      complete: b.complete,
      duplicateBytes: b.duplicateBytes,
      gapBytes: b.gapBytes,
      firstTsNs: b.firstTsNs,
      lastTsNs: b.lastTsNs,
      firstPacketIndex: b.firstPacketIndex,
      events,
    };
    connections.push(conn);

    const connectionObj = { local_address: socketAddress(b.server), remote_address: socketAddress(b.client) };
    anchored.push({ conn, packetIndex: b.firstPacketIndex, order: order++, kind: 'connection', piece: { connection: connectionObj } });
    const toEventObj = (e: RecastEvent): Record<string, unknown> => {
      const o: Record<string, unknown> = { timestamp: timestamp(e.tsNs) };
      if (e.kind === 'read') o.read = { data: { as_bytes: e.data } };
      else if (e.kind === 'write') o.write = e.endStream ? { data: { as_bytes: e.data }, end_stream: true } : { data: { as_bytes: e.data } };
      else o.closed = {};
      if (opts.connectionPerEvent) o.connection = connectionObj;
      if (!opts.omitSeqNum) o.seq_num = e.seqNum;
      return o;
    };
    const batch = opts.batchMinBytes ?? 0;
    if (batch > 0) {
      let pending: RecastEvent[] = [];
      let bytes = 0;
      for (const e of events) {
        pending.push(e);
        if (e.kind !== 'closed') bytes += e.data.length;
        if (bytes >= batch || e.kind === 'closed') {
          anchored.push({ conn, packetIndex: e.packetIndex, order: order++, kind: 'events', piece: { events: { events: pending.map(toEventObj) } } });
          pending = [];
          bytes = 0;
        }
      }
    } else {
      for (const e of events) anchored.push({ conn, packetIndex: e.packetIndex, order: order++, kind: 'events', piece: { event: toEventObj(e) } });
    }
  }

  // Interleave connections in capture order; within one connection the order is kept (stable).
  anchored.sort((x, y) => x.packetIndex - y.packetIndex || (x.conn === y.conn ? x.order - y.order : x.conn.firstPacketIndex - y.conn.firstPacketIndex));
  const setReqId = opts.setRequestTraceId ?? true;
  const messages: RecastMessage[] = anchored.map((a) => {
    const msg: StreamTapsRequestObject = {
      trace: { socket_streamed_trace_segment: { trace_id: a.conn.traceId, ...a.piece } },
    };
    if (setReqId) msg.trace_id = a.conn.traceId;
    return { traceId: a.conn.traceId, msg, packetIndex: a.packetIndex };
  });
  if (messages.length > 0) {
    messages[0]!.msg = { identifier: identifier(opts.node ?? { id: 'meshcap-test-node' }, opts.tapId ?? 'meshcap-test-tap'), ...messages[0]!.msg };
  }
  return { messages, connections };
}

function identifier(node: { id: string; cluster?: string }, tapId: string) {
  return { node: { id: node.id, cluster: node.cluster ?? 'meshcap-test' }, tap_id: tapId };
}

function socketAddress(e: Endpoint) {
  return { socket_address: { address: e.addr, port_value: e.port } };
}

function timestamp(tsNs: bigint) {
  return { seconds: Number(tsNs / 1_000_000_000n), nanos: Number(tsNs % 1_000_000_000n) };
}

export interface TapStream {
  node: { id: string; cluster: string };
  tapId: string;
  /** Messages of this stream, the first one carrying `identifier`. */
  messages: RecastMessage[];
  /** Connections carried by this stream, with their (possibly renumbered) trace ids. */
  connections: RecastConnection[];
}

/**
 * Splits recast connections over several gRPC streams (one per simulated Envoy), keeping the
 * capture-order interleaving inside each stream. `assign(conn, i)` picks the stream (default
 * round-robin). With `renumberTraceIds` (default true) each stream numbers its connections 1, 2, …
 * like a separate Envoy process would, so trace ids collide ACROSS streams on purpose.
 */
export function splitStreams(
  results: RecastResult | RecastResult[],
  streams: Array<{ nodeId: string; cluster?: string; tapId?: string }>,
  opts: { assign?: (conn: RecastConnection, index: number) => number; renumberTraceIds?: boolean; setRequestTraceId?: boolean } = {},
): TapStream[] {
  const list = Array.isArray(results) ? results : [results];
  const renumber = opts.renumberTraceIds ?? true;
  const setReqId = opts.setRequestTraceId ?? true;
  const out: TapStream[] = streams.map((s) => ({
    node: { id: s.nodeId, cluster: s.cluster ?? 'meshcap-test' },
    tapId: s.tapId ?? 'meshcap-test-tap',
    messages: [],
    connections: [],
  }));
  let n = 0;
  for (const r of list) {
    const streamOf = new Map<RecastConnection, number>();
    const newId = new Map<RecastConnection, number>();
    const byOldId = new Map<number, RecastConnection>();
    for (const c of r.connections) {
      byOldId.set(c.traceId, c);
      const si = opts.assign ? opts.assign(c, n) : n % streams.length;
      n++;
      if (si < 0 || si >= out.length) throw new Error(`splitStreams: stream ${si} out of range`);
      streamOf.set(c, si);
      const s = out[si]!;
      const id = renumber ? s.connections.length + 1 : c.traceId;
      newId.set(c, id);
      s.connections.push({ ...c, traceId: id });
    }
    for (const m of r.messages) {
      const c = byOldId.get(m.traceId)!;
      const id = newId.get(c)!;
      const seg = m.msg.trace.socket_streamed_trace_segment;
      const msg: StreamTapsRequestObject = { trace: { socket_streamed_trace_segment: { ...seg, trace_id: id } } };
      if (setReqId) msg.trace_id = id;
      out[streamOf.get(c)!]!.messages.push({ traceId: id, msg, packetIndex: m.packetIndex });
    }
  }
  for (const s of out) {
    if (s.messages.length > 0) s.messages[0]!.msg = { identifier: identifier(s.node, s.tapId), ...s.messages[0]!.msg };
  }
  return out;
}

/** Concatenated read / write payloads of a connection's events (what a tap consumer would see). */
export function eventBytes(conn: RecastConnection): { read: Buffer; write: Buffer } {
  const r: Buffer[] = [];
  const w: Buffer[] = [];
  for (const e of conn.events) {
    if (e.kind === 'read') r.push(e.data);
    else if (e.kind === 'write') w.push(e.data);
  }
  return { read: Buffer.concat(r), write: Buffer.concat(w) };
}

/** Reassembles the payloads straight from StreamTapsRequest objects, keyed by trace id. */
export function bytesFromMessages(messages: Array<{ msg: StreamTapsRequestObject }>): Map<number, { read: Buffer; write: Buffer; connection?: unknown }> {
  const acc = new Map<number, { read: Buffer[]; write: Buffer[]; connection?: unknown }>();
  for (const { msg } of messages) {
    const seg = msg.trace.socket_streamed_trace_segment as {
      trace_id: number;
      connection?: unknown;
      event?: Record<string, unknown>;
      events?: { events: Array<Record<string, unknown>> };
    };
    let a = acc.get(seg.trace_id);
    if (!a) acc.set(seg.trace_id, (a = { read: [], write: [] }));
    if (seg.connection) a.connection = seg.connection;
    const evs = seg.event ? [seg.event] : (seg.events?.events ?? []);
    for (const e of evs) {
      const r = e.read as { data: { as_bytes: Buffer } } | undefined;
      const w = e.write as { data: { as_bytes: Buffer } } | undefined;
      if (r) a.read.push(r.data.as_bytes);
      if (w) a.write.push(w.data.as_bytes);
    }
  }
  const out = new Map<number, { read: Buffer; write: Buffer; connection?: unknown }>();
  for (const [k, v] of acc) out.set(k, { read: Buffer.concat(v.read), write: Buffer.concat(v.write), connection: v.connection });
  return out;
}

/**
 * The six emulated Envoys of the real-traffic tests: one per HTTP/1.1 and IPv6 scenario, one
 * carrying h2c and gRPC together, three sharing the many-connections scenario. Trace ids restart
 * at 1 per Envoy, so they collide across streams on purpose.
 */
export function sixEnvoyStreams(recast: (name: 'http1-large' | 'h2c' | 'grpc' | 'ipv6' | 'many') => RecastResult): TapStream[] {
  return [
    ...splitStreams(recast('http1-large'), [{ nodeId: 'envoy-http1', cluster: 'web' }]),
    ...splitStreams([recast('h2c'), recast('grpc')], [{ nodeId: 'envoy-h2', cluster: 'api' }]),
    ...splitStreams(recast('ipv6'), [{ nodeId: 'envoy-v6', cluster: 'web6' }]),
    ...splitStreams(recast('many'), [
      { nodeId: 'envoy-many-a', cluster: 'many' },
      { nodeId: 'envoy-many-b', cluster: 'many' },
      { nodeId: 'envoy-many-c', cluster: 'many' },
    ]),
  ];
}
