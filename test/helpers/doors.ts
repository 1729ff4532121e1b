/**
 * Envoy's side of the three stock-Envoy doors, fed with recast real traffic (recast.ts): the
 * admin /tap streaming sink, the contrib UDP sink and the file_per_tap sink, each emulated the way
 * Envoy writes, plus what the door tests need to watch meshcap's output while it runs.
 *
 *  - Admin: pretty JSON TraceWrappers (JSON_BODY_AS_BYTES, always_print_primitive_fields, via
 *    envoy-tap-emulation.ts) written to an EmulatedEnvoyAdmin's attached response in chunks of
 *    arbitrary sizes (each its own HTTP chunk), optionally ending the stream part-way (at an object
 *    boundary or inside an object) and answering the re-attach with Envoy's 400 "already exists"
 *    once. The segments not yet sent are held for the next attach (a real Envoy would lose the
 *    events of the detached period; holding them lets the test demand a complete capture).
 *  - UDP: contrib/tap_sinks/udp_sink/source/udp_sink_impl.cc (Envoy 1.37): one TraceWrapper per
 *    datagram; a streamed event whose body exceeds 47104 bytes (JSON_BODY_AS_BYTES, PROTO_BINARY)
 *    is sent as several single-event traces: timestamp nanos + 1, 2, …, seq_num advanced by each
 *    piece, an (empty) `connection` set on every piece, end_stream and truncated not copied;
 *    SocketEvents batches over the limit are regrouped (handleSocketStreamedTraceForMultiEvents).
 *    Sending is paced on the receiver's kernel queue (/proc/net/udp), so loopback never drops.
 *  - file_per_tap, PROTO_BINARY_LENGTH_DELIMITED: `<prefix>_<trace_id>.pb_length_delimited`, one
 *    file per connection, each trace written through protobuf's OstreamOutputStream (8 KiB blocks)
 *    into a libstdc++ std::ofstream (8 KiB filebuf; writes of >= 1 KiB, or that don't fit, go to
 *    the file at once with what is buffered; smaller ones wait), flushed when the connection closes.
 */
import crypto from 'node:crypto';
import dgram from 'node:dgram';
import fs from 'node:fs';
import type http from 'node:http';
import type protobuf from 'protobufjs';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { ALREADY_ATTACHED_TEXT, type EmulatedEnvoyAdmin, encodeTrace, envoyJson, varint } from './envoy-tap-emulation.js';
import { parseCapture, parseTcp, type TcpPacket } from './pcap-read.js';
import { seededRandom, type RecastResult } from './recast.js';
import { logUniform, sleep } from './record-traffic.js';

export type TraceObject = Record<string, unknown>;

// ---------------------------------------------------------------------------------------------
// Admin /tap

export interface AdminFeedPlan {
  /** PRNG seed for the chunk sizes. */
  seed: number;
  /** Chunk sizes are log-uniform in [1, maxChunk] (default 16384). */
  maxChunk?: number;
  /**
   * End the stream when object `cutAt` is due: before it (`midObject` false) or after a part of
   * it (true; the client must report the cut object, which is sent again whole on the next attach).
   */
  cutAt?: number;
  midObject?: boolean;
  /** Answer the first re-attach after the cut with Envoy's 400 "already exists". */
  refuseOnce?: boolean;
}

export interface AdminFeedResult {
  /** Streams attached (1, or 2 with a cut). */
  attaches: number;
  /** 400 "already exists" answers given to the client. */
  refused: number;
  chunks: number;
  bytes: number;
}

/**
 * Streams `objects` (Envoy's pretty JSON, one TraceWrapper each) to the client attached to
 * `envoy`, following `plan`. Resolves when everything was written.
 */
export async function feedAdmin(envoy: EmulatedEnvoyAdmin, objects: string[], plan: AdminFeedPlan, attachTimeoutMs = 20_000): Promise<AdminFeedResult> {
  const rnd = seededRandom(plan.seed);
  const result: AdminFeedResult = { attaches: 0, refused: 0, chunks: 0, bytes: 0 };
  const maxChunk = plan.maxChunk ?? 16384;
  let a = await envoy.waitAttached(attachTimeoutMs);
  result.attaches++;
  let from = 0;
  if (plan.cutAt !== undefined && plan.cutAt < objects.length) {
    const cut = objects[plan.cutAt]!;
    const head = Buffer.from(objects.slice(0, plan.cutAt).join('') + (plan.midObject ? cut.slice(0, Math.max(1, Math.floor(cut.length / 2))) : ''));
    await writeChunked(a.res, head, rnd, maxChunk, result);
    // Let the client read what was sent before the end of the stream.
    await sleep(50);
    const before = envoy.rejected.length;
    envoy.endStream();
    if (plan.refuseOnce) {
      // Envoy has not run the detach callback of the ended stream yet: the re-attach races it.
      envoy.attached = { request: {}, res: null as unknown as http.ServerResponse, closed: false };
      const deadline = Date.now() + attachTimeoutMs;
      while (envoy.rejected.length === before) {
        if (Date.now() > deadline) throw new Error('feedAdmin: the client did not re-attach after the stream ended');
        await sleep(5);
      }
      const answers = envoy.rejected.slice(before);
      if (!answers.every((r) => r.status === 400 && r.body === ALREADY_ATTACHED_TEXT)) throw new Error(`feedAdmin: unexpected answers ${JSON.stringify(answers)}`);
      result.refused += answers.length;
      envoy.attached = null;
    }
    a = await envoy.waitAttached(attachTimeoutMs);
    result.attaches++;
    from = plan.cutAt;
  }
  await writeChunked(a.res, Buffer.from(objects.slice(from).join('')), rnd, maxChunk, result);
  return result;
}

/** res.write() in log-uniform chunk sizes (each its own HTTP chunk), with back-pressure. */
async function writeChunked(res: http.ServerResponse, buf: Buffer, rnd: () => number, maxChunk: number, counters: { chunks: number; bytes: number }): Promise<void> {
  let pos = 0;
  let n = 0;
  while (pos < buf.length) {
    const piece = buf.subarray(pos, pos + logUniform(rnd, 1, maxChunk));
    pos += piece.length;
    if (res.destroyed) throw new Error('writeChunked: the client went away');
    if (!res.write(piece)) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          res.off('drain', done);
          res.off('close', done);
          resolve();
        };
        res.on('drain', done);
        res.on('close', done);
      });
    }
    counters.chunks++;
    counters.bytes += piece.length;
    // Give the chunks a chance to reach the client as separate reads now and then.
    if (++n % 8 === 0) await new Promise((r) => setImmediate(r));
    if (n % 64 === 0) await sleep(1);
  }
}

// ---------------------------------------------------------------------------------------------
// UDP sink

/** udp_max_send_msg_size_bytes_ (JSON_BODY_AS_BYTES, PROTO_BINARY, PROTO_TEXT). */
export const UDP_MAX_BODY_BYTES = 47104;
/** The largest UDP payload over IPv4. */
export const UDP_MAX_DATAGRAM = 65507;

let socketEventType: protobuf.Type | null = null;
let wrapperType: protobuf.Type | null = null;

function byteSize(type: protobuf.Type, obj: Record<string, unknown>): number {
  return type.encode(type.fromObject(obj)).finish().length;
}

const traceSize = (t: TraceObject): number => byteSize((wrapperType ??= loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper')), t);
const eventSize = (e: Record<string, unknown>): number => byteSize((socketEventType ??= loadSchema().lookupType('envoy.data.tap.v3.SocketEvent')), e);

interface EventObject {
  timestamp?: { seconds: number; nanos: number };
  read?: { data: { as_bytes: Buffer } };
  write?: { data: { as_bytes: Buffer }; end_stream?: boolean };
  closed?: Record<string, never>;
  connection?: unknown;
  seq_num?: number;
}

interface SegmentObject {
  trace_id: number;
  connection?: unknown;
  event?: EventObject;
  events?: { events: EventObject[] };
}

/** getEventBodysize: the read body, else the write body (0 for closed). */
function bodySize(e: EventObject): number {
  return e.read ? e.read.data.as_bytes.length : (e.write?.data.as_bytes.length ?? 0);
}

export interface UdpSplitCounters {
  /** Events sent as several pieces, and the pieces. */
  splitEvents: number;
  pieces: number;
  /** SocketEvents batches regrouped into several traces. */
  regroupedBatches: number;
}

/**
 * The traces Envoy's UDP sink submits (one datagram each) for one TraceWrapper, in order.
 * Only socket streamed segments are ever split (as in Envoy).
 */
export function udpSinkTraces(trace: TraceObject, counters?: UdpSplitCounters): TraceObject[] {
  const seg = trace.socket_streamed_trace_segment as SegmentObject | undefined;
  if (!seg) return [trace];
  if (seg.events) return multiEvents(seg, counters);
  return singleEvent(trace, seg, counters);
}

function singleEvent(trace: TraceObject, seg: SegmentObject, counters?: UdpSplitCounters): TraceObject[] {
  const ev = seg.event ?? {};
  const total = bodySize(ev);
  if (total <= UDP_MAX_BODY_BYTES) return [trace];
  const src = (ev.read ?? ev.write)!.data.as_bytes;
  const out: TraceObject[] = [];
  let seq = ev.seq_num ?? 0;
  let cnt = 0;
  for (let off = 0; off < total; off += UDP_MAX_BODY_BYTES) {
    cnt++;
    const data = src.subarray(off, Math.min(total, off + UDP_MAX_BODY_BYTES));
    const ts = ev.timestamp ?? { seconds: 0, nanos: 0 };
    const piece: EventObject = {
      timestamp: { seconds: ts.seconds, nanos: ts.nanos + cnt },
      // mutable_connection()->CopyFrom(): set on every piece, empty when the event had none.
      connection: ev.connection ?? {},
      seq_num: seq,
    };
    if (ev.read) piece.read = { data: { as_bytes: data } };
    else piece.write = { data: { as_bytes: data } }; // end_stream is not copied
    if (piece.timestamp!.nanos > 999_999_999) throw new Error('udpSinkTraces: the nanos bump overflowed the second (Envoy would send an invalid Timestamp); change the recast seed');
    seq += data.length;
    out.push({ socket_streamed_trace_segment: { trace_id: seg.trace_id, event: piece } });
  }
  if (counters) {
    counters.splitEvents++;
    counters.pieces += out.length;
  }
  return out;
}

function multiEvents(seg: SegmentObject, counters?: UdpSplitCounters): TraceObject[] {
  const wrap = (events: EventObject[]): TraceObject => ({ socket_streamed_trace_segment: { trace_id: seg.trace_id, events: { events } } });
  const remaining = [...seg.events!.events];
  if (traceSize(wrap(remaining)) <= UDP_MAX_BODY_BYTES) return [wrap(remaining)];
  if (counters) counters.regroupedBatches++;
  const out: TraceObject[] = [];
  let current: EventObject[] | null = null;
  const flush = (): void => {
    if (current) out.push(wrap(current));
    current = null;
  };
  while (remaining.length > 0) {
    const ev = remaining[0]!;
    if (bodySize(ev) > UDP_MAX_BODY_BYTES) {
      flush();
      const single: TraceObject = { socket_streamed_trace_segment: { trace_id: seg.trace_id, event: ev } };
      out.push(...singleEvent(single, single.socket_streamed_trace_segment as SegmentObject, counters));
      remaining.shift();
      if (remaining.length > 0 && traceSize(wrap(remaining)) < UDP_MAX_BODY_BYTES) {
        out.push(wrap(remaining));
        return out;
      }
      continue;
    }
    if (current && traceSize(wrap(current)) + eventSize(ev as Record<string, unknown>) > UDP_MAX_BODY_BYTES) {
      flush();
      if (remaining.length > 0 && traceSize(wrap(remaining)) < UDP_MAX_BODY_BYTES) {
        out.push(wrap(remaining));
        return out;
      }
    }
    (current ??= []).push(ev);
    remaining.shift();
  }
  flush();
  return out;
}

/** The datagram Envoy's UDP sink sends for one trace: pretty JSON without defaults, or binary. */
export function udpDatagram(trace: TraceObject, format: 'json' | 'binary'): Buffer {
  const b = format === 'json' ? Buffer.from(envoyJson(trace, { alwaysPrint: false })) : encodeTrace(trace);
  if (b.length > UDP_MAX_DATAGRAM) throw new Error(`udpDatagram: ${b.length} bytes do not fit in one datagram (Envoy's send would fail: EMSGSIZE)`);
  return b;
}

/** rx_queue (bytes) and drops of the UDP socket bound to 127.0.0.1:port, from /proc/net/udp. */
export function udpSocketQueue(port: number): { rxQueue: number; drops: number } | null {
  let text: string;
  try {
    text = fs.readFileSync('/proc/net/udp', 'utf8');
  } catch {
    return null;
  }
  const want = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  for (const line of text.split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 13 || cols[1] !== want) continue;
    return { rxQueue: parseInt(cols[4]!.split(':')[1]!, 16), drops: Number(cols[12]) };
  }
  return null;
}

/** A free UDP port on 127.0.0.1 right now. */
export function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket('udp4');
    s.once('error', reject);
    s.bind(0, '127.0.0.1', () => {
      const port = s.address().port;
      s.close(() => resolve(port));
    });
  });
}

/**
 * Sends datagrams to 127.0.0.1:port from several sockets (one per emulated Envoy), paced on the
 * receiver: one datagram at a time (each handed to the kernel, which on loopback queues it at the
 * receiver before send() returns), and only when the receiving socket's queue (/proc/net/udp
 * rx_queue, skb memory) leaves room for it under `limitBytes`. The default, 160 KiB, is below
 * even a 208 KiB receive buffer (net.core.rmem_max's usual default), so nothing is lost however
 * slow meshcap is.
 */
export class PacedUdpSender {
  datagrams = 0;
  bytes = 0;
  /** The largest datagram sent. */
  largest = 0;
  /** Times the sender waited for the receiver's queue to drain. */
  waits = 0;
  private turn: Promise<void> = Promise.resolve();
  private readonly sockets: dgram.Socket[] = [];

  constructor(
    readonly port: number,
    readonly limitBytes = 160 * 1024,
  ) {}

  async socket(): Promise<dgram.Socket> {
    const s = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', () => resolve()));
    this.sockets.push(s);
    return s;
  }

  /** Sends when it is this datagram's turn and the receiver has room (skb overhead counted as 4 KiB). */
  send(s: dgram.Socket, buf: Buffer): Promise<void> {
    const mine = this.turn.then(async () => {
      const deadline = Date.now() + 20_000;
      for (;;) {
        const q = udpSocketQueue(this.port);
        if (!q || q.rxQueue === 0 || q.rxQueue + buf.length + 4096 <= this.limitBytes) break;
        if (Date.now() > deadline) throw new Error(`PacedUdpSender: the receiver's queue stayed at ${q.rxQueue} bytes for 20 s`);
        this.waits++;
        await sleep(1);
      }
      await new Promise<void>((resolve, reject) => s.send(buf, this.port, '127.0.0.1', (err) => (err ? reject(err) : resolve())));
      this.datagrams++;
      this.bytes += buf.length;
      this.largest = Math.max(this.largest, buf.length);
    });
    this.turn = mine.catch(() => {});
    return mine;
  }

  close(): void {
    for (const s of this.sockets.splice(0)) s.close();
  }
}

// ---------------------------------------------------------------------------------------------
// file_per_tap

const OSTREAM_BLOCK = 8192; // protobuf CopyingOutputStreamAdaptor's default block size
const FILEBUF_USABLE = 8191; // libstdc++ basic_filebuf: BUFSIZ, one byte kept for overflow
const FILEBUF_CHUNK = 1024; // basic_filebuf::xsputn writes directly from this size on

/** One file of Envoy's file_per_tap sink (PROTO_BINARY_LENGTH_DELIMITED), written as Envoy writes it. */
export class FilePerTapFile {
  private pending: Buffer[] = [];
  private pendingLen = 0;
  /** write(2) calls that reached the file, and their sizes. */
  readonly writes: number[] = [];

  constructor(readonly path: string) {}

  /** submitTrace: varint32 length + message through an OstreamOutputStream into the ofstream. */
  submit(message: Buffer): void {
    const data = Buffer.concat([varint(message.length), message]);
    for (let off = 0; off < data.length; off += OSTREAM_BLOCK) this.xsputn(data.subarray(off, off + OSTREAM_BLOCK));
  }

  /** The connection closed: Envoy destroys the handle and the ofstream flushes. */
  close(): void {
    this.flush([]);
  }

  private xsputn(b: Buffer): void {
    const avail = FILEBUF_USABLE - this.pendingLen;
    if (b.length >= Math.min(FILEBUF_CHUNK, avail)) this.flush([b]);
    else {
      this.pending.push(Buffer.from(b));
      this.pendingLen += b.length;
    }
  }

  private flush(extra: Buffer[]): void {
    const out = Buffer.concat([...this.pending, ...extra]);
    this.pending = [];
    this.pendingLen = 0;
    if (out.length === 0) return;
    fs.appendFileSync(this.path, out);
    this.writes.push(out.length);
  }
}

// ---------------------------------------------------------------------------------------------
// Recasts Wireshark can read

export const HTTP2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

/**
 * Connections whose first client → server event holds only part of the HTTP/2 connection preface.
 * Wireshark 4.0's HTTP/2 dissector can't reassemble a preface split over TCP segments (it takes
 * "PRI * HT…" for a frame header of length 0x505249 and waits for 5 MB), so such a capture shows
 * no client frame at all, and the server's gRPC responses trip a dissector assertion. A real
 * client writes the preface in one go, so the first read holds it whole; a recast cuts anywhere.
 */
export function splitPrefaces(recast: RecastResult): number[] {
  const bad: number[] = [];
  for (const c of recast.connections) {
    const first = c.events.find((e) => e.kind === 'read');
    if (first && first.data.length < HTTP2_PREFACE.length && HTTP2_PREFACE.subarray(0, first.data.length).equals(first.data)) bad.push(c.traceId);
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------
// Watching meshcap's output

/**
 * The TCP packets of a capture that is still being written (meshcap's NAME.part): only the
 * complete pcapng blocks are parsed.
 */
export function readGrowingPcapng(file: string): TcpPacket[] {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch {
    return [];
  }
  let off = 0;
  while (off + 12 <= buf.length) {
    const len = buf.readUInt32LE(off + 4);
    if (len < 12 || off + len > buf.length) break;
    off += len;
  }
  if (off === 0) return [];
  try {
    const cap = parseCapture(buf.subarray(0, off));
    return cap.packets.map((p) => parseTcp(p.linkType, p.data)).filter((p): p is TcpPacket => p !== null);
  } catch {
    return [];
  }
}

/**
 * Waits until meshcap's growing output holds `fins` FIN segments (2 per connection: every
 * connection has been closed and its teardown written), or the timeout. Returns the count seen.
 */
export async function waitForFins(partFile: string, fins: number, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let seen = 0;
  for (;;) {
    seen = readGrowingPcapng(partFile).filter((p) => p.fin).length;
    if (seen >= fins || Date.now() > deadline) return seen;
    await sleep(200);
  }
}

/**
 * Every TCP conversation of a capture as a list of packet signatures in file order, independent
 * of the initial sequence numbers and IP ids meshcap derives from the node id:
 * `dir relSeq relAck flags window len tsNs sha1(payload)`; dir 0 is the SYN's sender.
 */
export function conversationSignatures(packets: Array<TcpPacket & { tsNs: bigint }>): Map<string, string[]> {
  const byConv = new Map<string, { client: string; isn: Map<string, number>; sigs: string[] }>();
  for (const p of packets) {
    const a = `${p.src}|${p.srcPort}`;
    const b = `${p.dst}|${p.dstPort}`;
    const key = [a, b].sort().join(' <-> ');
    let c = byConv.get(key);
    if (!c) byConv.set(key, (c = { client: p.syn && !p.ackFlag ? a : b, isn: new Map(), sigs: [] }));
    if (!c.isn.has(a)) c.isn.set(a, p.seq);
    const dir = a === c.client ? 0 : 1;
    const relSeq = (p.seq - c.isn.get(a)!) >>> 0;
    const relAck = p.ackFlag && c.isn.has(b) ? (p.ack - c.isn.get(b)!) >>> 0 : -1;
    const sha = p.payload.length ? crypto.createHash('sha1').update(p.payload).digest('hex').slice(0, 16) : '-';
    c.sigs.push(`${dir} ${relSeq} ${relAck} 0x${p.flags.toString(16)} ${p.window} ${p.payload.length} ${p.tsNs} ${sha}`);
  }
  return new Map([...byConv].map(([k, v]) => [k, v.sigs]));
}

/** Runs at most `n` of the given async jobs at a time. */
export function limiter(n: number): <T>(job: () => Promise<T>) => Promise<T> {
  let active = 0;
  const queue: Array<() => void> = [];
  const next = (): void => {
    if (active >= n) return;
    const run = queue.shift();
    if (run) {
      active++;
      run();
    }
  };
  return <T>(job: () => Promise<T>) =>
    new Promise<T>((resolve, reject) => {
      queue.push(() => {
        job()
          .then(resolve, reject)
          .finally(() => {
            active--;
            next();
          });
      });
      next();
    });
}
