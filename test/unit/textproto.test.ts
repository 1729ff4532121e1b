import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import protobuf from 'protobufjs';
import { parseTextProto, parseTextStreamTapsRequests, parseTextTraces } from '../../src/ingest/textproto.js';
import { loadSchema, traceWrapperType } from '../../src/ingest/proto-schema.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const fixtures = path.resolve(repoRoot, '..', 'shared', 'fixtures', 'envoy');
const fixture = (name: string) => fs.readFileSync(path.join(fixtures, name));

const TO_OBJECT: protobuf.IConversionOptions = { longs: String, bytes: String, enums: String };
const decoded = (type: protobuf.Type, bytes: Uint8Array) => type.toObject(type.decode(bytes), TO_OBJECT);
const type = (name: string) => loadSchema().lookupType(name);

/** parseTextProto → fromObject → encode → decode → toObject. */
function roundTrip(text: string, typeName: string) {
  const t = type(typeName);
  return decoded(t, t.encode(t.fromObject(parseTextProto(text, t))).finish());
}

describe('Envoy fixtures', () => {
  it('tap2pcap_h2_ipv4.pb_text is the same TraceWrapper as tap2pcap_h2_ipv4.v3.pb', () => {
    const traces = parseTextTraces(fixture('tap2pcap_h2_ipv4.pb_text').toString('utf8'));
    const pb = fixture('tap2pcap_h2_ipv4.v3.pb');
    expect(traces).toHaveLength(1);
    const tw = traceWrapperType();
    const got = decoded(tw, traces[0]!);
    expect(got).toEqual(decoded(tw, pb));
    const events = (got.socket_buffered_trace as { events: { read?: unknown; write?: unknown }[] }).events;
    expect(events.map((e) => (e.read ? 'read' : 'write'))).toEqual(['read', 'write', 'read', 'write', 'write', 'write']);
    // protobufjs writes fields in number order like protoc, so the bytes match exactly too.
    expect(traces[0]!.equals(pb)).toBe(true);
  });

  it('synthetic_streamtaps_requests.textproto gRPC-framed is synthetic_streamtaps_requests.grpc.bin byte for byte', () => {
    const reqs = parseTextStreamTapsRequests(fixture('synthetic_streamtaps_requests.textproto').toString('utf8'));
    expect(reqs).toHaveLength(8);
    const framed = Buffer.concat(
      reqs.flatMap((m) => {
        const h = Buffer.alloc(5); // compressed flag 0, then big-endian length
        h.writeUInt32BE(m.length, 1);
        return [h, m];
      }),
    );
    expect(framed.equals(fixture('synthetic_streamtaps_requests.grpc.bin'))).toBe(true);
    const req = type('envoy.service.tap.v3.StreamTapsRequest');
    const first = decoded(req, reqs[0]!);
    expect(first.identifier).toEqual({ node: { id: 'sidecar~10.0.0.1~synthetic.default~default.svc.cluster.local', cluster: 'synthetic.default' }, tap_id: 'synthetic-tap' });
    const last = decoded(req, reqs[7]!) as { trace: { socket_streamed_trace_segment: { event: unknown } } };
    expect(last.trace.socket_streamed_trace_segment.event).toEqual({ timestamp: { seconds: '1525207293', nanos: 347783371 }, closed: {}, seq_num: '16300' });
  });
});

describe('parseTextProto', () => {
  it('decodes C escapes in bytes and UTF-8 in strings, and concatenates adjacent literals', () => {
    const got = roundTrip(
      String.raw`raw_value: "\000\1\12\177\200\377\x41\x7\xfFz\a\b\f\n\r\t\v\\\'\"\?" 'single "q"' key: "h\303\251llo \u00e9\U0001F642 \uD83D\uDE42 ✓"`,
      'envoy.config.core.v3.HeaderValue',
    );
    const expected = Buffer.concat([
      Buffer.from([0, 1, 0o12, 0o177, 0o200, 0o377, 0x41, 7, 0xff, 0x7a, 7, 8, 12, 10, 13, 9, 11, 0x5c, 0x27, 0x22, 0x3f]),
      Buffer.from('single "q"'),
    ]);
    expect(Buffer.from(got.raw_value as string, 'base64')).toEqual(expected);
    expect(got.key).toBe('héllo é🙂 🙂 ✓');
  });

  it('returns bytes as a Buffer and 64-bit integers as exact decimal strings', () => {
    const obj = parseTextProto('raw_value: "\\001\\002"', type('envoy.config.core.v3.HeaderValue'));
    expect(Buffer.isBuffer(obj.raw_value)).toBe(true);
    const seg = parseTextProto('trace_id: 18446744073709551615', type('envoy.data.tap.v3.SocketStreamedTraceSegment'));
    expect(seg.trace_id).toBe('18446744073709551615');
    expect(roundTrip('trace_id: 0xFFFFFFFFFFFFFFFF', 'envoy.data.tap.v3.SocketStreamedTraceSegment').trace_id).toBe('18446744073709551615');
    expect(roundTrip('trace_id: 0777', 'envoy.data.tap.v3.SocketStreamedTraceSegment').trace_id).toBe('511');
    expect(roundTrip('seconds: -62135596800 nanos: 5', 'google.protobuf.Timestamp')).toEqual({ seconds: '-62135596800', nanos: 5 });
  });

  it('accepts "f {", "f: {", "<...>", one-line Timestamps, comments, separators, enums and bools', () => {
    const text = `
      # a comment
      timestamp { seconds: 1525207293 nanos: 347783371 }   # trailing comment
      write: <
        data: { as_bytes: "x"; truncated: true }
        end_stream: t,
      >
      connection {
        local_address { socket_address { protocol: UDP address: "::1" port_value: 53 } }
        remote_address: { socket_address: { protocol: 0, address: '10.0.0.1', named_port: "dns" ipv4_compat: True } }
      }
      seq_num: 6`;
    expect(roundTrip(text, 'envoy.data.tap.v3.SocketEvent')).toEqual({
      timestamp: { seconds: '1525207293', nanos: 347783371 },
      write: { data: { as_bytes: 'eA==', truncated: true }, end_stream: true },
      connection: {
        local_address: { socket_address: { protocol: 'UDP', address: '::1', port_value: 53 } },
        remote_address: { socket_address: { address: '10.0.0.1', named_port: 'dns', ipv4_compat: true } },
      },
      seq_num: '6',
    });
    expect(roundTrip('protocol: 1', 'envoy.config.core.v3.SocketAddress')).toEqual({ protocol: 'UDP' });
  });

  it('handles repeated fields (repeated lines and [lists]) and maps', () => {
    const text = `
      id: "n"
      client_features: "a"
      client_features: ["b", "c"]
      metadata {
        fields { key: "k1" value { string_value: "v1" } }
        fields: [{ key: "k2" value: { number_value: 2.5 } }, { key: "k3" value { bool_value: false } }]
      }`;
    expect(roundTrip(text, 'envoy.config.core.v3.Node')).toEqual({
      id: 'n',
      client_features: ['a', 'b', 'c'],
      // protobufjs' bundled google.protobuf.Value has camelCase field names; text uses the proto names.
      metadata: { fields: { k1: { stringValue: 'v1' }, k2: { numberValue: 2.5 }, k3: { boolValue: false } } },
    });
    const events = roundTrip('events { seq_num: 1 } events: [{ seq_num: 2 }, < seq_num: 3 >]', 'envoy.data.tap.v3.SocketEvents');
    expect(events).toEqual({ events: [{ seq_num: '1' }, { seq_num: '2' }, { seq_num: '3' }] });
  });

  it('parses floats including inf and nan', () => {
    const v = type('google.protobuf.Value');
    expect(parseTextProto('number_value: -1.5e3', v)).toEqual({ numberValue: -1500 });
    expect(parseTextProto('number_value: .5f', v)).toEqual({ numberValue: 0.5 });
    expect(parseTextProto('number_value: -inf', v)).toEqual({ numberValue: -Infinity });
    expect(parseTextProto('number_value: nan', v).numberValue).toBeNaN();
  });

  const errorCases: Array<[string, string, string, RegExp]> = [
    ['unknown field', 'envoy.data.tap.v3.SocketEvent', 'seq_num: 1\n\n  bogus: 2', /line 3: unknown field "bogus" in envoy\.data\.tap\.v3\.SocketEvent/],
    ['nested unknown field', 'envoy.data.tap.v3.SocketEvent', 'read {\n  data {\n    as_text: "x"\n  }\n}', /line 3: unknown field "as_text" in envoy\.data\.tap\.v3\.Body/],
    ['prototype name', 'envoy.data.tap.v3.SocketEvent', 'constructor: 1', /line 1: unknown field "constructor"/],
    ['uint32 out of range', 'envoy.config.core.v3.SocketAddress', 'port_value: 4294967296', /line 1: field "port_value": 4294967296 is out of range/],
    ['negative uint64', 'envoy.data.tap.v3.SocketEvent', '\nseq_num: -1', /line 2: .*out of range/],
    ['not an integer', 'envoy.data.tap.v3.SocketEvent', 'seq_num: 1.5', /line 1: field "seq_num": expected an integer/],
    ['unknown enum value', 'envoy.config.core.v3.SocketAddress', 'protocol: SCTP', /line 1: unknown value "SCTP" for enum/],
    ['duplicate singular field', 'envoy.data.tap.v3.SocketEvent', 'seq_num: 1\nseq_num: 2', /line 2: field "seq_num" is specified more than once/],
    ['two oneof members', 'envoy.data.tap.v3.SocketEvent', 'read {}\nwrite {}', /line 2: .*"write".*"read".*oneof "event_selector"/],
    ['unterminated string', 'envoy.data.tap.v3.Body', '\n\nas_bytes: "abc\n"', /line 3: unterminated string/],
    ['unclosed message', 'envoy.data.tap.v3.SocketEvent', 'read {\n  data {\n', /line 3: expected "}" to close envoy\.data\.tap\.v3\.Body/],
    ['missing colon', 'envoy.data.tap.v3.SocketEvent', 'seq_num 5', /line 1: expected ":" after field "seq_num"/],
    ['bad escape', 'envoy.data.tap.v3.Body', 'as_bytes: "\\q"', /line 1: unknown escape \\q/],
    ['invalid UTF-8 in a string', 'envoy.data.tap.v3.Body', 'as_string: "\\377"', /line 1: field "as_string": string is not valid UTF-8/],
    ['extension syntax', 'envoy.data.tap.v3.Body', '[foo.bar]: 1', /line 1: extensions/],
  ];
  for (const [name, typeName, text, re] of errorCases) {
    it(`rejects: ${name}, naming the line`, () => {
      expect(() => parseTextProto(text, type(typeName))).toThrow(re);
    });
  }
});

describe('parseTextTraces', () => {
  const tw = traceWrapperType();
  const seg = (id: number, extra = '') => `socket_streamed_trace_segment {\n  trace_id: ${id}\n  ${extra}\n}\n`;

  it('splits concatenated TraceWrappers: each top-level field starts a new one', () => {
    // Envoy's PROTO_TEXT file sink appends traces with no separator.
    const traces = parseTextTraces(seg(1, 'event { closed {} }') + seg(1) + 'socket_buffered_trace { trace_id: 9 }');
    expect(traces.map((b) => decoded(tw, b))).toEqual([
      { socket_streamed_trace_segment: { trace_id: '1', event: { closed: {} } } },
      { socket_streamed_trace_segment: { trace_id: '1' } },
      { socket_buffered_trace: { trace_id: '9' } },
    ]);
  });

  it('splits on --- lines, skipping empty parts, and reports lines of the whole file', () => {
    const text = `${seg(1)}---\n# only a comment\n---\r\n${seg(2)}\n---\n`;
    expect(parseTextTraces(text).map((b) => decoded(tw, b))).toEqual([
      { socket_streamed_trace_segment: { trace_id: '1' } },
      { socket_streamed_trace_segment: { trace_id: '2' } },
    ]);
    // Two 4-line parts and two separators come first.
    const bad = `${seg(1)}---\n${seg(2)}---\nsocket_streamed_trace_segment {\n  oops: 1\n}\n`;
    expect(bad.split('\n')[11]).toBe('  oops: 1');
    expect(() => parseTextTraces(bad)).toThrow(/line 12: unknown field "oops"/);
  });

  it('returns nothing for an empty input', () => {
    expect(parseTextTraces('')).toEqual([]);
    expect(parseTextTraces('\n# nothing\n')).toEqual([]);
    expect(parseTextStreamTapsRequests('\n---\n')).toEqual([]);
  });
});
