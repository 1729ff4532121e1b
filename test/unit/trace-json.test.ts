import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { parseAllDocuments } from 'yaml';
import { jsonTraceToBinary, parseRfc3339 } from '../../src/ingest/trace-json.js';
import { traceWrapperType } from '../../src/ingest/proto-schema.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const fixtures = path.resolve(repoRoot, '..', 'shared', 'fixtures', 'envoy');
const fixture = (name: string) => fs.readFileSync(path.join(fixtures, name));

const tw = traceWrapperType();
const decoded = (bytes: Uint8Array) => tw.toObject(tw.decode(bytes), { longs: String, bytes: String, enums: String });

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** RFC 3339 with 9-digit nanos, as Envoy (protobuf's JSON printer) writes when nanos aren't 0. */
function rfc3339(seconds: string, nanos: number): string {
  const iso = new Date(Number(seconds) * 1000).toISOString();
  return iso.replace(/\.000Z$/, `.${String(nanos).padStart(9, '0')}Z`);
}

/**
 * Emulates Envoy's JSON output for a binary TraceWrapper: snake_case, always_print_primitive_fields
 * (defaults: true), uint64 as strings, bytes base64, Timestamps as RFC 3339; unset messages absent.
 */
function envoyJson(pb: Uint8Array): Json {
  const walk = (v: Json): Json => {
    if (Array.isArray(v)) return v.map(walk);
    if (v === null || typeof v !== 'object') return v;
    const out: { [k: string]: Json } = {};
    for (const [k, x] of Object.entries(v)) {
      if (x === null) continue;
      const ts = x as { seconds?: string; nanos?: number };
      out[k] = (k === 'timestamp' || k === 'headers_received_time') ? rfc3339(ts.seconds!, ts.nanos!) : walk(x);
    }
    return out;
  };
  return walk(tw.toObject(tw.decode(pb), { longs: String, bytes: String, defaults: true }) as Json);
}

describe('jsonTraceToBinary', () => {
  const pb = fixture('tap2pcap_h2_ipv4.v3.pb');
  const pretty = JSON.stringify(envoyJson(pb), null, 2);

  it('turns Envoy-style JSON of the fixture back into the fixture', () => {
    expect(pretty).toContain('"timestamp": "2018-05-01T20:41:33.216737962Z"');
    expect(pretty).toContain('"read_truncated": false'); // primitives printed, as Envoy does
    const bin = jsonTraceToBinary(JSON.parse(pretty));
    expect(decoded(bin)).toEqual(decoded(pb));
    // Defaults (trace_id "0", false bools) are not written, so the encoding is canonical.
    expect(bin.equals(pb)).toBe(true);
  });

  it('reads timestamps with UTC offsets and lowercase t/z exactly', () => {
    const shifted = pretty
      .replace('2018-05-01T20:41:33.216737962Z', '2018-05-01T22:41:33.216737962+02:00')
      .replace('2018-05-01T20:41:33.230450657Z', '2018-05-01T15:11:33.230450657-05:30')
      .replace('2018-05-01T20:41:33.230558250Z', '2018-05-01t20:41:33.23055825z');
    expect(shifted).not.toBe(pretty);
    expect(jsonTraceToBinary(JSON.parse(shifted)).equals(pb)).toBe(true);
  });

  it('ignores keys it does not know (a newer Envoy) and JSON nulls', () => {
    const obj = JSON.parse(pretty);
    obj.some_future_trace_kind_metadata = { a: [1, 2, { b: 'c' }] };
    obj.socket_buffered_trace.new_field = '2025-01-01T00:00:00Z';
    obj.socket_buffered_trace.events[0].annotations = [{ key: 'x' }];
    obj.socket_buffered_trace.events[0].read.data.compression = 'none';
    obj.socket_buffered_trace.connection.local_address.socket_address.constructor = 'x';
    obj.socket_buffered_trace.events[1].connection = null;
    expect(jsonTraceToBinary(obj).equals(pb)).toBe(true);
  });

  it('accepts lowerCamelCase keys too', () => {
    const bin = jsonTraceToBinary({ socketStreamedTraceSegment: { traceId: '5', event: { seqNum: 7, closed: {} } } });
    expect(decoded(bin)).toEqual({ socket_streamed_trace_segment: { trace_id: '5', event: { seq_num: '7', closed: {} } } });
  });

  it('converts as_string bodies, URL-safe base64, and 64-bit values without loss', () => {
    const bin = jsonTraceToBinary({
      socket_streamed_trace_segment: {
        trace_id: '18446744073709551615',
        events: {
          events: [
            { timestamp: '2026-01-13T00:00:00Z', write: { data: { as_string: 'héllo 🙂', truncated: true }, end_stream: true }, seq_num: '9007199254740993' },
            { timestamp: '2026-01-13T00:00:00.5Z', read: { data: { as_bytes: '-_8' } } },
          ],
        },
      },
    });
    expect(decoded(bin)).toEqual({
      socket_streamed_trace_segment: {
        trace_id: '18446744073709551615',
        events: {
          events: [
            { timestamp: { seconds: '1768262400' }, write: { data: { as_string: 'héllo 🙂', truncated: true }, end_stream: true }, seq_num: '9007199254740993' },
            { timestamp: { seconds: '1768262400', nanos: 500000000 }, read: { data: { as_bytes: Buffer.from([0xfb, 0xff]).toString('base64') } } },
          ],
        },
      },
    });
  });

  it("converts every TraceWrapper of Envoy's transport-socket tap unit-test expectations (YAML)", () => {
    const docs = parseAllDocuments(fixture('envoy_transport_tap_test_expectations.yaml').toString('utf8'))
      .map((d) => d.toJS() as unknown)
      .filter((d) => d !== null);
    expect(docs.length).toBeGreaterThanOrEqual(6);
    const out = docs.map((d) => decoded(jsonTraceToBinary(d)));
    // StreamingFlow: connection, read "hello" @0s seq 1, write "world" @1s seq 6, closed @2s seq 12.
    const events = out.slice(1, 4).map((o) => (o.socket_streamed_trace_segment as { event: Record<string, unknown> }).event);
    expect(events.map((e) => [e.timestamp, e.seq_num])).toEqual([
      [{}, '1'], // zero seconds and nanos are not encoded (proto3 implicit presence)
      [{ seconds: '1' }, '6'],
      [{ seconds: '2' }, '12'],
    ]);
    expect(events[0]!.read).toEqual({ data: { as_bytes: Buffer.from('hello').toString('base64') } });
    expect(events[2]!.closed).toEqual({});
    expect((out[0]!.socket_streamed_trace_segment as { connection: unknown }).connection).toEqual({
      local_address: { socket_address: { address: '127.0.0.1', port_value: 1000 } },
      remote_address: { socket_address: { address: '10.0.0.3', port_value: 50000 } },
    });
  });

  it('rejects non-objects', () => {
    for (const bad of [null, undefined, 42, 'str', [], [{}]]) {
      expect(() => jsonTraceToBinary(bad), String(bad)).toThrow(/trace JSON: TraceWrapper: expected an object/);
    }
    expect(() => jsonTraceToBinary({ socket_buffered_trace: 'x' })).toThrow(/socket_buffered_trace: expected an object, got string/);
    expect(() => jsonTraceToBinary({ socket_buffered_trace: { events: {} } })).toThrow(/socket_buffered_trace\.events: expected an array/);
  });

  it('rejects bad timestamps and bad base64, naming the field', () => {
    const ev = (timestamp: unknown) => ({ socket_buffered_trace: { events: [{}, { timestamp }] } });
    for (const t of ['yesterday', '2018-05-01 20:41:33Z', '2018-13-01T00:00:00Z', '2018-05-01T20:41:33.1234567891Z', '2018-05-01T20:41:33']) {
      expect(() => jsonTraceToBinary(ev(t)), t).toThrow(/trace JSON: TraceWrapper\.socket_buffered_trace\.events\[1\]\.timestamp: .*timestamp/);
    }
    expect(() => jsonTraceToBinary(ev(12345))).toThrow(/events\[1\]\.timestamp: expected an object, got number/);
    expect(() => jsonTraceToBinary({ socket_streamed_trace_segment: { event: { read: { data: { as_bytes: 'not base64!' } } } } })).toThrow(
      /event\.read\.data\.as_bytes: invalid base64/,
    );
  });
});

describe('parseRfc3339', () => {
  it('parses exactly to the nanosecond', () => {
    expect(parseRfc3339('2018-05-01T20:41:33.216737962Z')).toEqual({ seconds: 1525207293, nanos: 216737962 });
    expect(parseRfc3339('2018-05-01T20:41:33.2Z')).toEqual({ seconds: 1525207293, nanos: 200000000 });
    expect(parseRfc3339('2018-05-01T20:41:33Z')).toEqual({ seconds: 1525207293, nanos: 0 });
    expect(parseRfc3339('2018-05-02T00:41:33.000000001+04:00')).toEqual({ seconds: 1525207293, nanos: 1 });
    expect(parseRfc3339('1970-01-01T00:00:00Z')).toEqual({ seconds: 0, nanos: 0 });
    expect(parseRfc3339('1969-12-31T23:59:59.999999999Z')).toEqual({ seconds: -1, nanos: 999999999 });
    expect(parseRfc3339('2000-02-29T00:00:00Z')).toEqual({ seconds: 951782400, nanos: 0 });
    expect(parseRfc3339('0001-01-01T00:00:00Z')).toEqual({ seconds: -62135596800, nanos: 0 });
    expect(parseRfc3339('9999-12-31T23:59:59.999999999Z')).toEqual({ seconds: 253402300799, nanos: 999999999 });
  });

  it('agrees with Date for millisecond timestamps (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: -62135596800000, max: 253402300799999 }), (ms) => {
        const s = new Date(ms).toISOString();
        const seconds = Math.floor(ms / 1000);
        expect(parseRfc3339(s)).toEqual({ seconds, nanos: (ms - seconds * 1000) * 1e6 });
      }),
      { numRuns: 2000 },
    );
  });

  it('rejects malformed and out-of-range timestamps', () => {
    for (const s of ['', '2018-05-01', '2018-05-01T20:41:33', '2018-05-01T20:41:60Z', '1900-02-29T00:00:00Z', '2018-04-31T00:00:00Z',
      '2018-05-01T24:00:00Z', '2018-05-01T20:41:33+2:00', '2018-05-01T20:41:33.Z', '0001-01-01T00:00:00+00:01', '+2018-05-01T00:00:00Z']) {
      expect(() => parseRfc3339(s), s).toThrow(/timestamp/);
    }
  });
});
