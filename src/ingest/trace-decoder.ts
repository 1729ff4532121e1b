/**
 * Decodes binary Envoy tap messages (TraceWrapper, StreamTapsRequest) into TapEvents.
 *
 * Every door ends here: gRPC and binary files directly, JSON and text format after conversion to
 * binary. Field numbers are Envoy's (see proto/). Decisions that a schema cannot express live here:
 *  - Connection has two layouts: Envoy <= 1.27 wrote local=2, remote=3; >= 1.28 writes local=1,
 *    remote=2. Told apart per message: field 3 means the old layout, field 1 (length-delimited)
 *    the new one; a lone field 2 is read as the new layout's remote address (new Envoys omit the
 *    local address of not-yet-connected upstream sockets; old ones always sent remote = 3).
 *  - A message is walked twice: once without emitting anything, to reject a malformed message
 *    whole (no half-applied trace), then for real. The walk touches tags only, never payload bytes.
 *  - Unknown fields are skipped, so newer Envoys keep working.
 */
import {
  EventKind,
  TraceTruncation,
  newTapEvent,
  resetTapEvent,
  type StreamIdentity,
  type TapAddress,
  type TapConnection,
  type TapEvent,
  type TapEventHandler,
} from './tap-event.js';
import { WireError, WireReader, WireType } from './wire-reader.js';

const LEN = WireType.Len;

/** Per-stream state of a StreamTaps call: the identifier arrives in the first message only. */
export interface StreamState {
  identity: StreamIdentity | null;
  messages: number;
}

export class TraceDecoder {
  private readonly r = new WireReader();
  private readonly ev: TapEvent = newTapEvent();
  private emit = false;
  private stream: StreamIdentity = { nodeId: '', tapId: '', source: '' };
  private lastTsSec = 0;
  private lastTsNsec = 0;

  constructor(private readonly handler: TapEventHandler) {}

  /**
   * One StreamTapsRequest. Returns false (after reporting the error) when it was rejected.
   * `anonymous` names the stream when Envoy sent no identifier (never seen from Envoy; counted).
   */
  decodeStreamTapsRequest(buf: Buffer, state: StreamState, source: string, anonymous: () => StreamIdentity): boolean {
    const r = this.r;
    r.reset(buf);
    const end = buf.length;
    let traceStart = -1;
    let traceEnd = -1;
    let requestTraceId: number | string = 0;
    try {
      while (r.pos < end) {
        const tag = r.uint32(end);
        const field = tag >>> 3;
        if (field === 1 && (tag & 7) === LEN) {
          const stop = r.lenEnd(end);
          if (state.identity === null) state.identity = this.readIdentifier(stop, source);
          r.pos = stop;
        } else if (field === 2 && (tag & 7) === WireType.Varint) {
          requestTraceId = r.uint64Key(end);
        } else if (field === 3 && (tag & 7) === LEN) {
          traceEnd = r.lenEnd(end);
          traceStart = r.pos;
          r.pos = traceEnd;
        } else r.skip(tag & 7, end);
      }
    } catch (err) {
      this.handler.onIngestError(state.identity ?? { nodeId: '', tapId: '', source }, 'malformed_protobuf', describe(err, 'StreamTapsRequest'));
      return false;
    }
    if (state.identity === null) {
      state.identity = anonymous();
      this.handler.onIngestError(state.identity, 'missing_identifier', 'first StreamTapsRequest of the stream has no identifier');
    }
    state.messages++;
    if (traceStart < 0) return true; // identifier-only message
    return this.decodeTraceWrapperRange(buf, traceStart, traceEnd, state.identity, requestTraceId);
  }

  /** One whole binary TraceWrapper (file_per_tap PROTO_BINARY, UDP sink, converted JSON/text). */
  decodeTraceWrapper(buf: Buffer, stream: StreamIdentity): boolean {
    return this.decodeTraceWrapperRange(buf, 0, buf.length, stream, 0);
  }

  private decodeTraceWrapperRange(buf: Buffer, start: number, end: number, stream: StreamIdentity, fallbackTraceId: number | string): boolean {
    this.stream = stream;
    try {
      this.emit = false;
      const kind = this.walkTraceWrapper(buf, start, end, fallbackTraceId);
      if (kind === 'http') {
        this.handler.onIngestError(stream, 'http_trace_unsupported', 'HTTP tap traces are not turned into packets yet (use the transport-socket tap)');
        return false;
      }
      if (kind === 'none') {
        this.handler.onIngestError(stream, 'empty_trace', 'TraceWrapper holds no trace');
        return false;
      }
      this.emit = true;
      this.walkTraceWrapper(buf, start, end, fallbackTraceId);
      return true;
    } catch (err) {
      this.handler.onIngestError(stream, 'malformed_protobuf', describe(err, 'TraceWrapper'));
      return false;
    } finally {
      this.emit = false;
    }
  }

  private walkTraceWrapper(buf: Buffer, start: number, end: number, fallbackTraceId: number | string): 'socket' | 'http' | 'none' {
    const r = this.r;
    r.reset(buf, start);
    let kind: 'socket' | 'http' | 'none' = 'none';
    while (r.pos < end) {
      const tag = r.uint32(end);
      const field = tag >>> 3;
      if ((tag & 7) === LEN && (field === 3 || field === 4)) {
        const stop = r.lenEnd(end);
        if (field === 3) this.bufferedTrace(r.pos, stop, fallbackTraceId);
        else this.streamedSegment(r.pos, stop, fallbackTraceId);
        r.pos = stop;
        kind = 'socket';
      } else if ((tag & 7) === LEN && (field === 1 || field === 2)) {
        r.skip(LEN, end);
        if (kind === 'none') kind = 'http';
      } else r.skip(tag & 7, end);
    }
    return kind;
  }

  /** Finds the uint64 field 1 (trace_id) of a trace message without moving the cursor. */
  private traceIdOf(start: number, end: number, fallback: number | string): number | string {
    const r = this.r;
    const saved = r.pos;
    r.pos = start;
    let id = fallback;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 8) {
        id = r.uint64Key(end);
        break;
      }
      r.skip(tag & 7, end);
    }
    r.pos = saved;
    return id;
  }

  private streamedSegment(start: number, end: number, fallbackTraceId: number | string): void {
    const r = this.r;
    const traceId = this.traceIdOf(start, end, fallbackTraceId);
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      const field = tag >>> 3;
      if ((tag & 7) !== LEN || field < 2 || field > 4) {
        r.skip(tag & 7, end);
        continue;
      }
      const stop = r.lenEnd(end);
      if (field === 2) {
        const conn = this.connection(r.pos, stop);
        if (this.emit) {
          const ev = this.fresh(EventKind.Connection, traceId);
          ev.connection = conn;
          this.handler.onEvent(this.stream, ev);
        }
      } else if (field === 3) {
        this.socketEvent(r.pos, stop, traceId);
      } else {
        // SocketEvents: repeated SocketEvent events = 1
        while (r.pos < stop) {
          const t = r.uint32(stop);
          if (t === 10) {
            const evEnd = r.lenEnd(stop);
            this.socketEvent(r.pos, evEnd, traceId);
            r.pos = evEnd;
          } else r.skip(t & 7, stop);
        }
      }
      r.pos = stop;
    }
  }

  private bufferedTrace(start: number, end: number, fallbackTraceId: number | string): void {
    const r = this.r;
    const traceId = this.traceIdOf(start, end, fallbackTraceId);
    let truncation = TraceTruncation.None;
    // The connection (field 2) must open the flow before its events (field 3), whatever the order
    // of fields on the wire.
    r.pos = start;
    let conn: TapConnection | null = null;
    while (r.pos < end) {
      const tag = r.uint32(end);
      const field = tag >>> 3;
      if (field === 2 && (tag & 7) === LEN) {
        const stop = r.lenEnd(end);
        conn = this.connection(r.pos, stop);
        r.pos = stop;
      } else if (field === 4 && (tag & 7) === WireType.Varint) {
        if (r.uint32(end)) truncation |= TraceTruncation.Read;
      } else if (field === 5 && (tag & 7) === WireType.Varint) {
        if (r.uint32(end)) truncation |= TraceTruncation.Write;
      } else r.skip(tag & 7, end);
    }
    if (this.emit) {
      const ev = this.fresh(EventKind.Connection, traceId);
      ev.connection = conn;
      this.handler.onEvent(this.stream, ev);
    }
    this.lastTsSec = 0;
    this.lastTsNsec = 0;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 26) {
        const stop = r.lenEnd(end);
        this.socketEvent(r.pos, stop, traceId);
        r.pos = stop;
      } else r.skip(tag & 7, end);
    }
    // A buffered trace is submitted when Envoy closes the socket, and carries no closed event.
    if (this.emit) {
      const ev = this.fresh(EventKind.Closed, traceId);
      ev.tsSec = this.lastTsSec;
      ev.tsNsec = this.lastTsNsec;
      ev.hasTimestamp = this.lastTsSec !== 0 || this.lastTsNsec !== 0;
      ev.traceTruncation = truncation;
      this.handler.onEvent(this.stream, ev);
    }
  }

  private socketEvent(start: number, end: number, traceId: number | string): void {
    const r = this.r;
    const ev = this.ev;
    if (this.emit) resetTapEvent(ev);
    ev.traceId = traceId;
    let kind = -1;
    let conn: TapConnection | null = null;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      const field = tag >>> 3;
      const wt = tag & 7;
      if (field === 1 && wt === LEN) {
        const stop = r.lenEnd(end);
        this.timestamp(r.pos, stop);
        r.pos = stop;
      } else if ((field === 2 || field === 3) && wt === LEN) {
        const stop = r.lenEnd(end);
        kind = field === 2 ? EventKind.Read : EventKind.Write;
        this.readWrite(r.pos, stop);
        r.pos = stop;
      } else if (field === 4 && wt === LEN) {
        r.skip(LEN, end);
        kind = EventKind.Closed;
      } else if (field === 5 && wt === LEN) {
        const stop = r.lenEnd(end);
        conn = this.connection(r.pos, stop);
        r.pos = stop;
      } else if (field === 6 && wt === WireType.Varint) {
        ev.seqNum = r.uint64Number(end);
      } else r.skip(wt, end);
    }
    if (kind < 0) throw new WireError(`SocketEvent of trace ${traceId} is neither read, write nor closed`);
    if (!this.emit) return;
    ev.kind = kind as EventKind;
    ev.connection = conn;
    this.lastTsSec = ev.tsSec;
    this.lastTsNsec = ev.tsNsec;
    this.handler.onEvent(this.stream, ev);
  }

  private timestamp(start: number, end: number): void {
    const r = this.r;
    const ev = this.ev;
    let sec = 0;
    let nsec = 0;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 8) sec = r.int64Number(end);
      else if (tag === 16) nsec = r.uint32(end) | 0;
      else r.skip(tag & 7, end);
    }
    if (sec < 0 || nsec < 0 || nsec > 999_999_999) throw new WireError(`invalid timestamp ${sec}s ${nsec}ns`);
    ev.tsSec = sec;
    ev.tsNsec = nsec;
    ev.hasTimestamp = true;
  }

  /** SocketEvent.Read / Write: data (Body) = 1, end_stream = 2. */
  private readWrite(start: number, end: number): void {
    const r = this.r;
    const ev = this.ev;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 10) {
        const stop = r.lenEnd(end);
        this.body(r.pos, stop);
        r.pos = stop;
      } else if (tag === 16) ev.endStream = r.uint32(end) !== 0;
      else r.skip(tag & 7, end);
    }
  }

  /** Body: as_bytes = 1 | as_string = 2 (its UTF-8 bytes are the payload), truncated = 3. */
  private body(start: number, end: number): void {
    const r = this.r;
    const ev = this.ev;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 10 || tag === 18) {
        const stop = r.lenEnd(end);
        if (this.emit) ev.payload = r.buf.subarray(r.pos, stop);
        r.pos = stop;
      } else if (tag === 24) ev.truncated = r.uint32(end) !== 0;
      else r.skip(tag & 7, end);
    }
  }

  private connection(start: number, end: number): TapConnection {
    const r = this.r;
    let f1 = -1, f1End = 0, f2 = -1, f2End = 0, f3 = -1, f3End = 0;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      const field = tag >>> 3;
      if ((tag & 7) === LEN && field >= 1 && field <= 3) {
        const stop = r.lenEnd(end);
        if (field === 1) (f1 = r.pos), (f1End = stop);
        else if (field === 2) (f2 = r.pos), (f2End = stop);
        else (f3 = r.pos), (f3End = stop);
        r.pos = stop;
      } else r.skip(tag & 7, end); // includes the 2018 v2alpha `uint64 id = 1`
    }
    let local: TapAddress = UNKNOWN;
    let remote: TapAddress = UNKNOWN;
    if (f3 >= 0) {
      // Envoy <= 1.27: local_address = 2, remote_address = 3.
      if (f2 >= 0) local = this.address(f2, f2End);
      remote = this.address(f3, f3End);
    } else {
      if (f1 >= 0) local = this.address(f1, f1End);
      if (f2 >= 0) remote = this.address(f2, f2End);
    }
    r.pos = end;
    return { local, remote };
  }

  private address(start: number, end: number): TapAddress {
    const r = this.r;
    r.pos = start;
    let result: TapAddress = UNKNOWN;
    while (r.pos < end) {
      const tag = r.uint32(end);
      const stop = (tag & 7) === LEN ? r.lenEnd(end) : -1;
      if (stop < 0) {
        r.skip(tag & 7, end);
        continue;
      }
      if (tag === 10) result = this.socketAddress(r.pos, stop);
      else if (tag === 18) result = { kind: 'pipe', path: this.stringField(r.pos, stop, 10) };
      else if (tag === 26) {
        const listener = this.stringField(r.pos, stop, 10);
        const endpointId = this.stringField(r.pos, stop, 18);
        result = { kind: 'internal', listener, endpointId };
      }
      r.pos = stop;
    }
    return result;
  }

  private socketAddress(start: number, end: number): TapAddress {
    const r = this.r;
    let address = '';
    let port = 0;
    r.pos = start;
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 18) {
        const stop = r.lenEnd(end);
        address = r.utf8(r.pos, stop);
        r.pos = stop;
      } else if (tag === 24) port = r.uint32(end) & 0xffff;
      else r.skip(tag & 7, end);
    }
    return { kind: 'socket', address, port };
  }

  /** The string at `wantTag` inside [start, end), '' when absent. */
  private stringField(start: number, end: number, wantTag: number): string {
    const r = this.r;
    const saved = r.pos;
    r.pos = start;
    let value = '';
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === wantTag) {
        const stop = r.lenEnd(end);
        value = r.utf8(r.pos, stop);
        r.pos = stop;
      } else r.skip(tag & 7, end);
    }
    r.pos = saved;
    return value;
  }

  private readIdentifier(end: number, source: string): StreamIdentity {
    const r = this.r;
    let nodeId = '';
    let tapId = '';
    while (r.pos < end) {
      const tag = r.uint32(end);
      if (tag === 10) {
        const stop = r.lenEnd(end);
        nodeId = this.stringField(r.pos, stop, 10);
        r.pos = stop;
      } else if (tag === 18) {
        const stop = r.lenEnd(end);
        tapId = r.utf8(r.pos, stop);
        r.pos = stop;
      } else r.skip(tag & 7, end);
    }
    return { nodeId, tapId, source };
  }

  private fresh(kind: EventKind, traceId: number | string): TapEvent {
    const ev = this.ev;
    resetTapEvent(ev);
    ev.kind = kind;
    ev.traceId = traceId;
    return ev;
  }
}

const UNKNOWN: TapAddress = { kind: 'unknown' };

function describe(err: unknown, what: string): string {
  if (err instanceof WireError) return `${what}: ${err.message}`;
  return `${what}: ${err instanceof Error ? err.message : String(err)}`;
}

/**
 * Splits PROTO_BINARY_LENGTH_DELIMITED data (varint length + message, repeated) into messages.
 * Returns the offset of the first byte not consumed (a partial message at the end).
 */
export function splitLengthDelimited(buf: Buffer, onMessage: (msg: Buffer) => void, maxMessageBytes: number): number {
  const r = new WireReader();
  r.reset(buf);
  while (r.pos < buf.length) {
    const start = r.pos;
    let len: number;
    try {
      len = r.uint32(buf.length);
    } catch {
      return start; // the length prefix itself is incomplete
    }
    if (len > maxMessageBytes) throw new WireError(`length-delimited message of ${len} bytes exceeds the ${maxMessageBytes}-byte limit`);
    if (r.pos + len > buf.length) return start;
    onMessage(buf.subarray(r.pos, r.pos + len));
    r.pos += len;
  }
  return r.pos;
}
