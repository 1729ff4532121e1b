import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { EventKind, type IngestErrorReason, type StreamIdentity, type TapEvent, type TapEventHandler } from '../../src/ingest/tap-event.js';
import { TraceDecoder, splitLengthDelimited, type StreamState } from '../../src/ingest/trace-decoder.js';

const fixtures = path.resolve(__dirname, '..', '..', '..', 'shared', 'fixtures', 'envoy');
const root = loadSchema();
const Wrapper = root.lookupType('envoy.data.tap.v3.TraceWrapper');
const Request = root.lookupType('envoy.service.tap.v3.StreamTapsRequest');

interface Seen {
  stream: StreamIdentity;
  kind: EventKind;
  traceId: number | string;
  payload: string | null;
  ts: string;
  seqNum: number;
  truncated: boolean;
  endStream: boolean;
  local?: string;
  remote?: string;
  traceTruncation: number;
}

function collector(): TapEventHandler & { events: Seen[]; errors: Array<{ reason: IngestErrorReason; detail: string }>; } {
  const events: Seen[] = [];
  const errors: Array<{ reason: IngestErrorReason; detail: string }> = [];
  const addr = (a: { kind: string; address?: string; port?: number; path?: string } | undefined): string | undefined =>
    a === undefined ? undefined : a.kind === 'socket' ? `${a.address}:${a.port}` : a.kind === 'pipe' ? `pipe:${a.path}` : a.kind;
  return {
    events,
    errors,
    onEvent(stream: StreamIdentity, ev: TapEvent) {
      events.push({
        stream,
        kind: ev.kind,
        traceId: ev.traceId,
        payload: ev.payload ? ev.payload.toString('latin1') : null,
        ts: `${ev.tsSec}.${String(ev.tsNsec).padStart(9, '0')}`,
        seqNum: ev.seqNum,
        truncated: ev.truncated,
        endStream: ev.endStream,
        local: addr(ev.connection?.local as never),
        remote: addr(ev.connection?.remote as never),
        traceTruncation: ev.traceTruncation,
      });
    },
    onIngestError(_s, reason, detail) {
      errors.push({ reason, detail });
    },
    onIngestMessage() {},
  };
}

const stream: StreamIdentity = { nodeId: 'n', tapId: 't', source: 'test' };

describe('TraceDecoder', () => {
  it('reads both Connection layouts of the real Envoy trace identically', () => {
    const results = ['tap2pcap_h2_ipv4.v3.pb', 'tap2pcap_h2_ipv4.pre1.28.pb'].map((f) => {
      const c = collector();
      expect(new TraceDecoder(c).decodeTraceWrapper(fs.readFileSync(path.join(fixtures, f)), stream)).toBe(true);
      return c.events;
    });
    expect(results[0]).toEqual(results[1]);
    const [conn, ...rest] = results[0]!;
    expect(conn!.kind).toBe(EventKind.Connection);
    expect(conn!.local).toBe('127.0.0.1:10000');
    expect(conn!.remote).toBe('127.0.0.1:53288');
    expect(rest.map((e) => e.kind)).toEqual([1, 2, 1, 2, 2, 2, EventKind.Closed]);
    expect(rest.slice(0, 6).map((e) => e.payload!.length)).toEqual([103, 37, 9, 5532, 7519, 3098]);
    expect(rest[0]!.payload!.startsWith('PRI * HTTP/2.0')).toBe(true);
    expect(rest[0]!.ts).toBe('1525207293.216737962');
    // The buffered trace ends with a synthesised close at the last event's time.
    expect(rest[6]!.ts).toBe(rest[5]!.ts);
  });

  it('reads a length-delimited file message by message', () => {
    const c = collector();
    const d = new TraceDecoder(c);
    const data = fs.readFileSync(path.join(fixtures, 'tap2pcap_h2_ipv4.v3.len_delimited.bin'));
    const rest = splitLengthDelimited(data, (m) => d.decodeTraceWrapper(m, stream), 1 << 20);
    expect(rest).toBe(data.length);
    expect(c.events.length).toBe(8);
  });

  it('takes the identifier from the first StreamTapsRequest only and decodes streamed segments', () => {
    const c = collector();
    const d = new TraceDecoder(c);
    const data = fs.readFileSync(path.join(fixtures, 'synthetic_streamtaps_requests.grpc.bin'));
    const state: StreamState = { identity: null, messages: 0 };
    for (let p = 0; p < data.length; ) {
      const len = data.readUInt32BE(p + 1);
      expect(d.decodeStreamTapsRequest(data.subarray(p + 5, p + 5 + len), state, 'grpc', () => stream)).toBe(true);
      p += 5 + len;
    }
    expect(state.identity).toEqual({ nodeId: 'sidecar~10.0.0.1~synthetic.default~default.svc.cluster.local', tapId: 'synthetic-tap', source: 'grpc' });
    expect(c.events.map((e) => e.seqNum)).toEqual([-1, 1, 104, 141, 150, 5682, 13201, 16300]);
    expect(c.events.at(-1)!.kind).toBe(EventKind.Closed);
    expect(c.errors).toEqual([]);
  });

  it('reads as_string bodies, truncation, end_stream, per-event connection and batched events', () => {
    const msg = Wrapper.encode(
      Wrapper.fromObject({
        socket_streamed_trace_segment: {
          trace_id: '18446744073709551615',
          events: {
            events: [
              { timestamp: { seconds: 5, nanos: 7 }, read: { data: { as_string: 'héllo', truncated: true } }, seq_num: 1, connection: { local_address: { pipe: { path: '/run/x.sock' } } } },
              { timestamp: { seconds: 6 }, write: { data: { as_bytes: Buffer.from([0, 1, 2]) }, end_stream: true }, seq_num: 9 },
              { closed: {}, seq_num: 13 },
            ],
          },
        },
      }),
    ).finish() as Buffer;
    const c = collector();
    expect(new TraceDecoder(c).decodeTraceWrapper(Buffer.from(msg), stream)).toBe(true);
    const [r, w, x] = c.events;
    expect(r!.traceId).toBe('18446744073709551615');
    expect(Buffer.from(r!.payload!, 'latin1').toString('utf8')).toBe('héllo');
    expect(r!.truncated).toBe(true);
    expect(r!.local).toBe('pipe:/run/x.sock');
    expect(r!.ts).toBe('5.000000007');
    expect(w!.endStream).toBe(true);
    expect(w!.payload).toBe('\u0000\u0001\u0002');
    expect(x!.kind).toBe(EventKind.Closed);
    expect(x!.seqNum).toBe(13);
  });

  it('reads a lone Connection field 2 as the new layout remote address', () => {
    const Conn = root.lookupType('envoy.data.tap.v3.Connection');
    const conn = Conn.encode(Conn.fromObject({ remote_address: { socket_address: { address: '10.1.2.3', port_value: 8080 } } })).finish();
    // socket_streamed_trace_segment { trace_id: 3, connection: <conn> }
    const seg = Buffer.concat([Buffer.from([0x08, 3, 0x12, conn.length]), Buffer.from(conn)]);
    const wrapper = Buffer.concat([Buffer.from([0x22, seg.length]), seg]);
    const c = collector();
    new TraceDecoder(c).decodeTraceWrapper(wrapper, stream);
    expect(c.events[0]!.remote).toBe('10.1.2.3:8080');
    expect(c.events[0]!.local).toBe('unknown');
  });

  it('skips unknown fields at every level', () => {
    const good = fs.readFileSync(path.join(fixtures, 'tap2pcap_h2_ipv4.v3.pb'));
    // field 15 (varint) and field 16 (bytes) in front of the TraceWrapper's trace
    const extra = Buffer.from([0x78, 0x01, 0x82, 0x01, 0x03, 0x61, 0x62, 0x63]);
    const c = collector();
    expect(new TraceDecoder(c).decodeTraceWrapper(Buffer.concat([extra, good]), stream)).toBe(true);
    expect(c.events.length).toBe(8);
  });

  it('rejects a malformed message whole: no event of it is emitted', () => {
    const good = fs.readFileSync(path.join(fixtures, 'tap2pcap_h2_ipv4.v3.pb'));
    for (const cut of [good.length - 1, good.length - 200, 5000, 3]) {
      const c = collector();
      expect(new TraceDecoder(c).decodeTraceWrapper(good.subarray(0, cut), stream)).toBe(false);
      expect(c.events).toEqual([]);
      expect(c.errors[0]!.reason).toBe('malformed_protobuf');
      expect(c.errors[0]!.detail).toMatch(/TraceWrapper: (truncated varint|length \d+ at offset \d+ overruns)/);
    }
  });

  it('counts HTTP traces as unsupported and empty wrappers as empty', () => {
    const http = Wrapper.encode(Wrapper.fromObject({ http_buffered_trace: { request: { headers: [{ key: ':path', value: '/' }] } } })).finish() as Buffer;
    const c = collector();
    const d = new TraceDecoder(c);
    expect(d.decodeTraceWrapper(Buffer.from(http), stream)).toBe(false);
    expect(d.decodeTraceWrapper(Buffer.alloc(0), stream)).toBe(false);
    expect(c.errors.map((e) => e.reason)).toEqual(['http_trace_unsupported', 'empty_trace']);
  });

  it('names the stream anonymously, and says so, when the first request has no identifier', () => {
    const req = Request.encode(Request.fromObject({ trace_id: 1, trace: { socket_streamed_trace_segment: { trace_id: 1, event: { closed: {} } } } })).finish() as Buffer;
    const c = collector();
    const state: StreamState = { identity: null, messages: 0 };
    new TraceDecoder(c).decodeStreamTapsRequest(Buffer.from(req), state, 'grpc', () => ({ nodeId: 'anonymous-1', tapId: '', source: 'grpc' }));
    expect(state.identity!.nodeId).toBe('anonymous-1');
    expect(c.errors.map((e) => e.reason)).toEqual(['missing_identifier']);
    expect(c.events.length).toBe(1);
  });
});
