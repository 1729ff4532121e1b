/**
 * Envoy's JSON TraceWrapper (admin /tap, JSON file sinks, UDP sink) → binary TraceWrapper, so the
 * JSON doors share the binary decoder.
 *
 * Envoy prints with preserve_proto_field_names (snake_case keys; lowerCamelCase is accepted too),
 * 64-bit integers as strings, bytes as base64 and google.protobuf.Timestamp as RFC 3339 strings.
 * protobufjs' fromObject knows none of the JSON mappings for well-known types, so Timestamp
 * strings are converted here, found by walking the reflection types (Timestamp is the only
 * well-known type inside a TraceWrapper). Keys we don't know are dropped: a newer Envoy may send
 * fields our proto does not have yet.
 */
import protobuf from 'protobufjs';
import { traceWrapperType } from './proto-schema.js';

type Obj = Record<string, unknown>;

const TIMESTAMP = '.google.protobuf.Timestamp';
// google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
const MIN_SECONDS = -62135596800;
const MAX_SECONDS = 253402300799;

const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d{2}):(\d{2}))$/;

/**
 * `2018-05-01T20:41:33.216737962Z` or `...+02:00` → Timestamp fields, exact to the nanosecond
 * (integer arithmetic only; a Date would round to milliseconds). Leap seconds (:60) are rejected,
 * as protobuf's own JSON parser does.
 */
export function parseRfc3339(s: string): { seconds: number; nanos: number } {
  const m = typeof s === 'string' ? RFC3339.exec(s) : null;
  if (!m) throw new Error(`invalid RFC 3339 timestamp ${JSON.stringify(s)}`);
  const [y, mo, d, h, mi, sec] = m.slice(1, 7).map(Number) as [number, number, number, number, number, number];
  const offH = m[9] === undefined ? 0 : Number(m[9]);
  const offM = m[10] === undefined ? 0 : Number(m[10]);
  if (mo < 1 || mo > 12 || d < 1 || d > daysInMonth(y, mo) || h > 23 || mi > 59 || sec > 59 || offH > 23 || offM > 59) {
    throw new Error(`invalid RFC 3339 timestamp ${JSON.stringify(s)}: field out of range`);
  }
  const offset = (m[8] === '-' ? -1 : 1) * (offH * 3600 + offM * 60);
  const seconds = daysFromCivil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset;
  if (seconds < MIN_SECONDS || seconds > MAX_SECONDS) throw new Error(`timestamp ${JSON.stringify(s)} is outside 0001..9999`);
  const nanos = m[7] === undefined ? 0 : Number(m[7].padEnd(9, '0'));
  return { seconds, nanos };
}

function daysInMonth(y: number, m: number): number {
  if (m === 2) return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0 ? 29 : 28;
  return [4, 6, 9, 11].includes(m) ? 30 : 31;
}

/** Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
function daysFromCivil(y: number, m: number, d: number): number {
  if (m <= 2) y -= 1;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * (m + (m > 2 ? -3 : 9)) + 2) / 5) + d - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}

/** Parsed Envoy JSON TraceWrapper (e.g. the result of JSON.parse) → binary TraceWrapper bytes. */
export function jsonTraceToBinary(obj: unknown): Buffer {
  const type = traceWrapperType();
  const clean = normalise(type, obj, 'TraceWrapper');
  let u8: Uint8Array;
  try {
    u8 = type.encode(type.fromObject(clean)).finish();
  } catch (e) {
    throw new Error(`trace JSON: ${(e as Error).message}`);
  }
  return Buffer.isBuffer(u8) ? u8 : Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

function isObject(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !Buffer.isBuffer(v);
}

function what(v: unknown): string {
  return v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v;
}

const jsonNames = new WeakMap<protobuf.Type, Map<string, protobuf.Field>>();

function lookupField(type: protobuf.Type, key: string): protobuf.Field | undefined {
  if (Object.hasOwn(type.fields, key)) return type.fields[key];
  let byJson = jsonNames.get(type);
  if (!byJson) jsonNames.set(type, (byJson = new Map(type.fieldsArray.map((f) => [f.jsonName, f]))));
  // camelCase fallback: protobufjs' bundled google types have camelCase names whatever keepCase says.
  return byJson.get(key) ?? byJson.get(protobuf.util.camelCase(key));
}

/** A copy of `value` with only known fields, proto names as keys, and JSON-only forms converted. */
function normalise(type: protobuf.Type, value: unknown, path: string): Obj {
  if (!isObject(value)) throw new Error(`trace JSON: ${path}: expected an object, got ${what(value)}`);
  const out: Obj = {};
  for (const key of Object.keys(value)) {
    const field = lookupField(type, key);
    const v = value[key];
    if (!field || v === null || v === undefined) continue; // unknown key, or JSON null = default
    field.resolve();
    const p = `${path}.${field.name}`;
    if (field.map) {
      if (!isObject(v)) throw new Error(`trace JSON: ${p}: expected an object, got ${what(v)}`);
      const entries: Obj = {};
      for (const k of Object.keys(v)) entries[k] = convert(field, v[k], `${p}["${k}"]`);
      out[field.name] = entries;
    } else if (field.repeated) {
      if (!Array.isArray(v)) throw new Error(`trace JSON: ${p}: expected an array, got ${what(v)}`);
      out[field.name] = v.map((e, i) => convert(field, e, `${p}[${i}]`));
    } else {
      out[field.name] = convert(field, v, p);
    }
  }
  return out;
}

const BASE64 = /^[A-Za-z0-9+/\-_]*={0,2}$/;

function convert(field: protobuf.Field, v: unknown, path: string): unknown {
  const rt = field.resolvedType;
  if (rt instanceof protobuf.Type) {
    if (rt.fullName === TIMESTAMP && typeof v === 'string') {
      try {
        return parseRfc3339(v);
      } catch (e) {
        throw new Error(`trace JSON: ${path}: ${(e as Error).message}`);
      }
    }
    return normalise(rt, v, path);
  }
  if (field.type === 'bytes' && typeof v === 'string') {
    // Standard or URL-safe alphabet, padding optional (protobuf JSON accepts both).
    if (!BASE64.test(v)) throw new Error(`trace JSON: ${path}: invalid base64`);
    return Buffer.from(v, 'base64');
  }
  return v; // numbers, 64-bit strings, bools, enum names: fromObject converts them
}
