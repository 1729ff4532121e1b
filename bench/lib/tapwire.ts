/**
 * A small hand-written protobuf encoder for the Envoy tap messages the benchmarks send: fast enough
 * to build hundreds of MB of traffic in a fraction of a second, with exactly one copy of each
 * payload into the output. Field numbers are Envoy's (proto/, shared/reference/envoy-tap.md §1):
 *
 *   StreamTapsRequest { 1 identifier { 1 node { 1 id }, 2 tap_id }, 2 trace_id, 3 trace TraceWrapper }
 *   TraceWrapper      { 4 socket_streamed_trace_segment { 1 trace_id, 2 connection | 3 event } }
 *   Connection        { 1 local_address, 2 remote_address }   Address { 1 socket_address { 2 address, 3 port_value } }
 *   SocketEvent       { 1 timestamp { 1 seconds, 2 nanos }, 2 read { 1 data Body } | 3 write { 1 data Body } | 4 closed {}, 6 seq_num }
 *   Body              { 1 as_bytes }
 *
 * The output is checked against protobufjs and meshcap's own decoder by `selfCheck()` (run by the
 * benchmarks before they send anything).
 */

interface Node {
  size: number;
  write(b: Buffer, o: number): number;
}

function varintSize(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

function writeVarint(b: Buffer, o: number, v: number): number {
  while (v >= 128) {
    b[o++] = (v % 128) | 128;
    v = Math.floor(v / 128);
  }
  b[o++] = v;
  return o;
}

const LEN = 2;
const VARINT = 0;

function varintField(field: number, v: number): Node {
  const tag = (field << 3) | VARINT;
  return { size: varintSize(tag) + varintSize(v), write: (b, o) => writeVarint(b, writeVarint(b, o, tag), v) };
}

function bytesField(field: number, data: Uint8Array): Node {
  const tag = (field << 3) | LEN;
  return {
    size: varintSize(tag) + varintSize(data.length) + data.length,
    write(b, o) {
      o = writeVarint(b, writeVarint(b, o, tag), data.length);
      b.set(data, o);
      return o + data.length;
    },
  };
}

function stringField(field: number, s: string): Node {
  return bytesField(field, Buffer.from(s, 'utf8'));
}

function msgField(field: number, children: Node[]): Node {
  const tag = (field << 3) | LEN;
  let inner = 0;
  for (const c of children) inner += c.size;
  return {
    size: varintSize(tag) + varintSize(inner) + inner,
    write(b, o) {
      o = writeVarint(b, writeVarint(b, o, tag), inner);
      for (const c of children) o = c.write(b, o);
      return o;
    },
  };
}

export type Framing = 'none' | 'grpc' | 'length-delimited';

function encode(children: Node[], framing: Framing): Buffer {
  let inner = 0;
  for (const c of children) inner += c.size;
  const head = framing === 'grpc' ? 5 : framing === 'length-delimited' ? varintSize(inner) : 0;
  const b = Buffer.allocUnsafe(head + inner);
  let o = 0;
  if (framing === 'grpc') {
    b[0] = 0;
    b.writeUInt32BE(inner, 1);
    o = 5;
  } else if (framing === 'length-delimited') o = writeVarint(b, 0, inner);
  for (const c of children) o = c.write(b, o);
  if (o !== b.length) throw new Error(`tapwire: wrote ${o} of ${b.length} bytes`);
  return b;
}

// ---------------------------------------------------------------------------------------------

export interface SockAddr {
  address: string;
  port: number;
}

export type TapEventSpec =
  | { kind: 'connection'; local: SockAddr; remote: SockAddr }
  | { kind: 'read' | 'write'; tsSec: number; tsNsec: number; payload: Uint8Array; seqNum?: number }
  | { kind: 'closed'; tsSec: number; tsNsec: number; seqNum?: number };

function address(field: number, a: SockAddr): Node {
  return msgField(field, [msgField(1, [stringField(2, a.address), varintField(3, a.port)])]);
}

/** socket_streamed_trace_segment (TraceWrapper field 4) for one event of one connection. */
function segment(traceId: number, ev: TapEventSpec): Node {
  const parts: Node[] = [varintField(1, traceId)];
  if (ev.kind === 'connection') {
    parts.push(msgField(2, [address(1, ev.local), address(2, ev.remote)]));
  } else {
    const e: Node[] = [msgField(1, [varintField(1, ev.tsSec), ...(ev.tsNsec ? [varintField(2, ev.tsNsec)] : [])])];
    if (ev.kind === 'closed') e.push(msgField(4, []));
    else e.push(msgField(ev.kind === 'read' ? 2 : 3, [msgField(1, [bytesField(1, ev.payload)])]));
    if (ev.seqNum !== undefined) e.push(varintField(6, ev.seqNum));
    parts.push(msgField(3, e));
  }
  return msgField(4, parts);
}

/** A StreamTapsRequest carrying one streamed segment (gRPC-framed unless told otherwise). */
export function streamTapsRequest(traceId: number, ev: TapEventSpec, framing: Framing = 'grpc'): Buffer {
  return encode([varintField(2, traceId), msgField(3, [segment(traceId, ev)])], framing);
}

/** The first StreamTapsRequest of a stream: the Identifier (Envoy node and tap_id) alone. */
export function identifierRequest(nodeId: string, tapId: string, framing: Framing = 'grpc'): Buffer {
  return encode([msgField(1, [msgField(1, [stringField(1, nodeId)]), stringField(2, tapId)])], framing);
}

/** A TraceWrapper with one streamed segment, as Envoy's file_per_tap PROTO_BINARY_LENGTH_DELIMITED writes it. */
export function traceWrapper(traceId: number, ev: TapEventSpec, framing: Framing = 'length-delimited'): Buffer {
  return encode([segment(traceId, ev)], framing);
}

/** Bytes of gRPC framing around a message. */
export const GRPC_FRAME_HEAD = 5;

/**
 * Packets meshcap makes of one event (IPv4/IPv6, no snaplen cut, no end_stream), given whether
 * the flow already started: a 3-way handshake before the first data (or close) of a connection
 * whose start was seen, one segment per MSS of payload, FIN/ACK + FIN/ACK + ACK on close.
 */
export function packetsFor(ev: TapEventSpec, started: boolean, mss: number): number {
  if (ev.kind === 'connection') return 0;
  const hs = started ? 0 : 3;
  if (ev.kind === 'closed') return hs + 3;
  return hs + Math.ceil(ev.payload.length / mss);
}

/** Checks the encoder against protobufjs (schema from proto/) on a sample of messages. */
export async function selfCheck(): Promise<void> {
  const { loadSchema } = await import('../../src/ingest/proto-schema.js');
  const T = loadSchema().lookupType('envoy.service.tap.v3.StreamTapsRequest');
  const W = loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');
  const payload = Buffer.from('hello, tap');
  const cases: Array<[Buffer, object]> = [
    [identifierRequest('node-a', 'tap-1', 'none'), { identifier: { node: { id: 'node-a' }, tap_id: 'tap-1' } }],
    [
      streamTapsRequest(3_000_000_007, { kind: 'connection', local: { address: '10.0.0.1', port: 8443 }, remote: { address: '10.0.0.2', port: 50000 } }, 'none'),
      {
        trace_id: 3000000007,
        trace: { socket_streamed_trace_segment: { trace_id: 3000000007, connection: { local_address: { socket_address: { address: '10.0.0.1', port_value: 8443 } }, remote_address: { socket_address: { address: '10.0.0.2', port_value: 50000 } } } } },
      },
    ],
    [
      streamTapsRequest(9, { kind: 'write', tsSec: 1_763_900_000, tsNsec: 123_456_789, payload, seqNum: 2 ** 40 + 5 }, 'none'),
      { trace_id: 9, trace: { socket_streamed_trace_segment: { trace_id: 9, event: { timestamp: { seconds: 1763900000, nanos: 123456789 }, write: { data: { as_bytes: payload } }, seq_num: 2 ** 40 + 5 } } } },
    ],
    [
      streamTapsRequest(9, { kind: 'closed', tsSec: 1_763_900_001, tsNsec: 0, seqNum: 12 }, 'none'),
      { trace_id: 9, trace: { socket_streamed_trace_segment: { trace_id: 9, event: { timestamp: { seconds: 1763900001 }, closed: {}, seq_num: 12 } } } },
    ],
  ];
  for (const [bytes, want] of cases) {
    const got = T.toObject(T.decode(bytes), { longs: Number, bytes: Buffer, defaults: false });
    const norm = (x: unknown) => JSON.stringify(x, (_k, v) => (v && v.type === 'Buffer' ? Buffer.from(v.data).toString('hex') : v));
    if (norm(got) !== norm(T.toObject(T.fromObject(want), { longs: Number, bytes: Buffer, defaults: false }))) {
      throw new Error(`tapwire self-check: ${norm(got)} != ${norm(want)}`);
    }
  }
  const tw = traceWrapper(5, { kind: 'read', tsSec: 1, tsNsec: 2, payload }, 'none');
  const got = W.toObject(W.decode(tw), { longs: Number, bytes: Buffer, defaults: false }) as { socket_streamed_trace_segment?: { event?: { read?: { data?: { as_bytes?: Buffer } } } } };
  if (!got.socket_streamed_trace_segment?.event?.read?.data?.as_bytes?.equals(payload)) throw new Error('tapwire self-check: TraceWrapper read payload');
}
