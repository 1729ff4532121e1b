/**
 * TapMerge (src/ingest/tap-merge.ts) over real tap files on disk, against the model it replaced:
 * "read every event of every file, then stable-sort them all by time". Files are built with the
 * benchmarks' wire encoder (bench/lib/tapwire.ts) and, for what it cannot write (events without a
 * timestamp, buffered traces, JSON), with protobufjs through test/helpers.
 *
 * The merge is run with tiny chunks and a tiny memory budget, so that files are read in many
 * batches and readers are parked and resumed (their batch read again) all the time, and with a
 * huge budget (every file whole, nothing parked). For files in time order both must give the
 * model's order, event for event (file, stream, kind, trace id, timestamp, payload bytes,
 * seq_num, connection); for files that are not, each connection keeps its file order and parking
 * changes nothing. The bytes held must stay within the budget, and bad input is reported once.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { identifierRequest, streamTapsRequest, traceWrapper, type TapEventSpec } from '../../bench/lib/tapwire.js';
import type { IngestErrorReason, StreamIdentity, TapEvent, TapEventHandler } from '../../src/ingest/tap-event.js';
import type { TapFileFormat } from '../../src/ingest/tap-file.js';
import type { TapFileReader } from '../../src/ingest/tap-file-reader.js';
import { loadTextFormats } from '../../src/ingest/tap-file-source.js';
import { TapFileError, TapMerge, type MergeOptions } from '../../src/ingest/tap-merge.js';
import { encodeTrace, envoyJson, varint } from '../helpers/envoy-tap-emulation.js';

// ReaderState and EventKind are const enums: their values, spelled out.
const BUFFERED = 1;
const PARKED = 2;
const CONNECTION = 0;
const KIND = { read: 1, write: 2, closed: 3 } as const;

const T0 = 1_763_900_000;
const MAX_MESSAGE = 1 << 20;
const HUGE: MergeOptions = { memoryBytes: 1 << 30, maxMessageBytes: MAX_MESSAGE };

let root: string;
let runs = 0;
beforeAll(async () => {
  await loadTextFormats();
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-tap-merge-'));
});
afterAll(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

/** A fresh directory for one run of a property. */
function runDir(): string {
  const d = path.join(root, `run-${++runs}`);
  fs.mkdirSync(d);
  return d;
}

// --- Test inputs ----------------------------------------------------------------------------

type Format = 'pb_length_delimited' | 'grpc' | 'json' | 'pb';
type Kind = 'read' | 'write' | 'closed';

/** One event of a file: its connection (index into the file's traces), kind, time and size. */
interface EvSpec {
  trace: number;
  kind: Kind;
  /** A point on a coarse clock (many ties, both in seconds and nanoseconds); null: no timestamp. */
  tick: number | null;
  size: number;
}

interface FileSpec {
  format: Format;
  traces: number;
  events: EvSpec[];
  /** Per trace, where its connection segment goes, as a fraction of the room before its first event (0: the file's start). */
  connAt: number[];
}

/** Four nanosecond values per second, so that ties and carries are both common. */
const NSEC = [0, 1, 499_999_999, 999_999_999];
const tickTime = (tick: number): [number, number] => [T0 + (tick >> 2), NSEC[tick & 3]!];

/** What a test expects of one event: the comparable key, and where and when it sorts. */
interface Expected {
  key: string;
  file: number;
  trace: number;
  /** Order in its file. */
  order: number;
  /** Merge key of an in-order file: its timestamp, the previous one, or 0 for a connection. */
  sortSec: number;
  sortNsec: number;
  /** Its own timestamp (null: a connection, or an event without one). */
  ts: [number, number] | null;
}

interface BuiltFile {
  path: string;
  format: TapFileFormat;
  expected: Expected[];
  /** Largest frame (prefix + message) in the file. */
  maxFrame: number;
}

const traceIdOf = (k: number): number => 100 + k; // the same ids in every file: each file is its own namespace
const localOf = (f: number, k: number) => ({ address: `10.0.${f}.${k + 1}`, port: 8443 });
const remoteOf = (f: number, k: number) => ({ address: `10.1.${f}.${k + 1}`, port: 40000 + k });

function payloadOf(file: number, i: number, size: number): Buffer {
  const seed = crypto.createHash('sha256').update(`${file}/${i}`).digest();
  const out = Buffer.allocUnsafe(size);
  for (let o = 0; o < size; o += seed.length) seed.copy(out, o, 0, Math.min(seed.length, size - o));
  return out;
}

const digest = (b: Buffer | null): string => (b === null ? '-' : `${b.length}:${crypto.createHash('md5').update(b).digest('hex').slice(0, 12)}`);

function keyOf(file: number, node: string, kind: number, traceId: number | string, ts: [number, number] | null, payload: Buffer | null, seq: number, conn: string): string {
  return `f${file} ${node} k${kind} t${traceId} ${ts ? `${ts[0]}.${ts[1]}` : 'no-ts'} ${digest(payload)} seq${seq}${conn ? ` ${conn}` : ''}`;
}

/** The key of the event a reader hands out, in the same form. */
function gotKey(r: TapFileReader, ev: TapEvent): string {
  let conn = '';
  if (ev.kind === CONNECTION && ev.connection) {
    const a = (x: { kind: string; address?: string; port?: number }) => (x.kind === 'socket' ? `${x.address}:${x.port}` : x.kind);
    conn = `${a(ev.connection.local)}>${a(ev.connection.remote)}`;
  }
  return keyOf(r.index, r.stream.nodeId, ev.kind, ev.traceId, ev.hasTimestamp ? [ev.tsSec, ev.tsNsec] : null, ev.payload, ev.seqNum, conn);
}

const grpcFrame = (msg: Buffer): Buffer => {
  const h = Buffer.alloc(5);
  h.writeUInt32BE(msg.length, 1);
  return Buffer.concat([h, msg]);
};

/**
 * Writes the files of `specs` into `dir` and returns what each must yield. Connection segments
 * carry no timestamp (as Envoy's); events without a tick are written without one.
 */
function buildFiles(dir: string, specs: FileSpec[]): BuiltFile[] {
  return specs.map((spec, f) => {
    const ext = spec.format === 'grpc' ? 'grpc' : spec.format;
    const file = path.join(dir, `f${String(f).padStart(2, '0')}.${ext}`);
    if (spec.format === 'pb') return bufferedTraceFile(file, f, spec);
    const node = spec.format === 'grpc' ? `node-${f}` : `file:${path.resolve(file)}`;
    // File order: every event, with each trace's connection segment inserted before its first event.
    type Item = { conn: number } | { ev: EvSpec; i: number };
    const items: Item[] = spec.events.map((ev, i) => ({ ev, i }));
    const firstOf = (k: number) => {
      const i = items.findIndex((x) => 'ev' in x && x.ev.trace === k);
      return i < 0 ? items.length : i;
    };
    for (let k = spec.traces - 1; k >= 0; k--) items.splice(Math.floor((spec.connAt[k] ?? 0) * (firstOf(k) + 1)), 0, { conn: k });

    const frames: Buffer[] = [];
    const jsons: string[] = [];
    const expected: Expected[] = [];
    if (spec.format === 'grpc') frames.push(identifierRequest(node, `tap-${f}`, 'grpc'));
    const seq = new Map<number, number>();
    let prev: [number, number] = [0, 0];
    for (const it of items) {
      if ('conn' in it) {
        const k = it.conn;
        const id = traceIdOf(k);
        const local = localOf(f, k);
        const remote = remoteOf(f, k);
        const ev: TapEventSpec = { kind: 'connection', local, remote };
        if (spec.format === 'pb_length_delimited') frames.push(traceWrapper(id, ev, 'length-delimited'));
        else if (spec.format === 'grpc') frames.push(streamTapsRequest(id, ev, 'grpc'));
        else {
          const addr = (a: { address: string; port: number }) => ({ socket_address: { address: a.address, port_value: a.port } });
          jsons.push(envoyJson({ socket_streamed_trace_segment: { trace_id: id, connection: { local_address: addr(local), remote_address: addr(remote) } } }, { alwaysPrint: true }));
        }
        const conn = `${local.address}:${local.port}>${remote.address}:${remote.port}`;
        expected.push({ key: keyOf(f, node, CONNECTION, id, null, null, -1, conn), file: f, trace: k, order: expected.length, sortSec: 0, sortNsec: 0, ts: null });
        continue;
      }
      const { ev, i } = it;
      const id = traceIdOf(ev.trace);
      const ts = ev.tick === null ? null : tickTime(ev.tick);
      if (ts) prev = ts;
      const payload = ev.kind === 'closed' ? null : payloadOf(f, i, ev.size);
      const s = seq.get(ev.trace) ?? 1;
      seq.set(ev.trace, s + (payload ? payload.length : 1));
      if (ts && spec.format !== 'json') {
        const te: TapEventSpec = ev.kind === 'closed' ? { kind: 'closed', tsSec: ts[0], tsNsec: ts[1], seqNum: s } : { kind: ev.kind, tsSec: ts[0], tsNsec: ts[1], payload: payload!, seqNum: s };
        frames.push(spec.format === 'grpc' ? streamTapsRequest(id, te, 'grpc') : traceWrapper(id, te, 'length-delimited'));
      } else {
        const event: Record<string, unknown> = { seq_num: s };
        if (ts) event.timestamp = { seconds: ts[0], nanos: ts[1] };
        if (ev.kind === 'closed') event.closed = {};
        else event[ev.kind] = { data: { as_bytes: payload } };
        const tw = { socket_streamed_trace_segment: { trace_id: id, event } };
        if (spec.format === 'json') jsons.push(envoyJson(tw, { alwaysPrint: true }));
        else {
          const bin = encodeTrace(tw);
          if (spec.format === 'pb_length_delimited') frames.push(Buffer.concat([varint(bin.length), bin]));
          // StreamTapsRequest { trace_id = 2, trace = 3 }
          else frames.push(grpcFrame(Buffer.concat([Buffer.from([0x10]), varint(id), Buffer.from([0x1a]), varint(bin.length), bin])));
        }
      }
      expected.push({
        key: keyOf(f, node, KIND[ev.kind], id, ts, payload, s, ''),
        file: f,
        trace: ev.trace,
        order: expected.length,
        sortSec: prev[0],
        sortNsec: prev[1],
        ts,
      });
    }
    const data = spec.format === 'json' ? Buffer.from(jsons.join('\n')) : Buffer.concat(frames);
    fs.writeFileSync(file, data);
    return { path: file, format: spec.format, expected, maxFrame: Math.max(0, ...frames.map((b) => b.length), ...jsons.map((j) => j.length)) };
  });
}

/**
 * A PROTO_BINARY file: one buffered trace (Envoy's file_per_tap for a closed connection) of the
 * spec's timed reads and writes. It yields the connection, the events, and a closed event at the
 * last event's time.
 */
function bufferedTraceFile(file: string, f: number, spec: FileSpec): BuiltFile {
  const node = `file:${path.resolve(file)}`;
  const id = traceIdOf(0);
  const local = localOf(f, 0);
  const remote = remoteOf(f, 0);
  const addr = (a: { address: string; port: number }) => ({ socket_address: { address: a.address, port_value: a.port } });
  const conn = `${local.address}:${local.port}>${remote.address}:${remote.port}`;
  const expected: Expected[] = [{ key: keyOf(f, node, CONNECTION, id, null, null, -1, conn), file: f, trace: 0, order: 0, sortSec: 0, sortNsec: 0, ts: null }];
  const events: Array<Record<string, unknown>> = [];
  let last: [number, number] | null = null;
  spec.events.forEach((ev, i) => {
    if (ev.kind === 'closed' || ev.tick === null) return;
    const ts = tickTime(ev.tick);
    const payload = payloadOf(f, i, ev.size);
    events.push({ timestamp: { seconds: ts[0], nanos: ts[1] }, [ev.kind]: { data: { as_bytes: payload } } });
    expected.push({ key: keyOf(f, node, KIND[ev.kind], id, ts, payload, -1, ''), file: f, trace: 0, order: expected.length, sortSec: ts[0], sortNsec: ts[1], ts });
    last = ts;
  });
  const closedAt: [number, number] = last ?? [0, 0];
  expected.push({ key: keyOf(f, node, KIND.closed, id, last, null, -1, ''), file: f, trace: 0, order: expected.length, sortSec: closedAt[0], sortNsec: closedAt[1], ts: last });
  const data = encodeTrace({ socket_buffered_trace: { trace_id: id, connection: { local_address: addr(local), remote_address: addr(remote) }, events } });
  fs.writeFileSync(file, data);
  return { path: file, format: 'pb', expected, maxFrame: data.length };
}

/** The old semantics: every event of every file, stable-sorted by (time, file, order in file). */
function stableSortModel(files: BuiltFile[]): string[] {
  const all = files.flatMap((f) => f.expected);
  all.sort((a, b) => a.sortSec - b.sortSec || a.sortNsec - b.sortNsec || a.file - b.file || a.order - b.order);
  return all.map((e) => e.key);
}

// --- Running the merge ------------------------------------------------------------------------

interface Report {
  node: string | null;
  reason: IngestErrorReason;
  detail: string;
}

interface MergeRun {
  keys: string[];
  /** Merge key of each event when it was handed out. */
  sortKeys: Array<[number, number]>;
  reports: Report[];
  messages: number;
  parks: number;
  resumes: number;
  /** Most bytes held by all readers together, after add() and after each next(). */
  peakHeld: number;
  /** Largest memory of a single reader seen. */
  peakReader: number;
}

/**
 * Merges `files` and records everything observable. With `checkBudget`, after every step the
 * bytes held by all readers together must fit the budget, unless the only reader holding memory
 * is the one being handed out (a chunk, or one message bigger than that, may exceed a tiny budget).
 */
function runMerge(files: BuiltFile[], opts: MergeOptions, checkBudget = true): MergeRun {
  const reports: Report[] = [];
  let messages = 0;
  const handler: TapEventHandler = {
    onEvent() {
      throw new Error('TapMerge readers hand events out through peek(), never onEvent');
    },
    onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string) {
      reports.push({ node: stream?.nodeId ?? null, reason, detail });
    },
    onIngestMessage() {
      messages++;
    },
  };
  const m = new TapMerge(files.length, handler, opts);
  const run: MergeRun = { keys: [], sortKeys: [], reports, messages: 0, parks: 0, resumes: 0, peakHeld: 0, peakReader: 0 };
  let states: number[] = [];
  const look = (cur: TapFileReader | null): void => {
    let held = 0;
    for (const r of m.readers) {
      held += r.memory;
      run.peakReader = Math.max(run.peakReader, r.memory);
      const before = states[r.index];
      if (before === BUFFERED && r.state === PARKED) run.parks++;
      if (before === PARKED && r.state === BUFFERED) run.resumes++;
    }
    states = m.readers.map((r) => r.state);
    run.peakHeld = Math.max(run.peakHeld, held);
    if (checkBudget && held > opts.memoryBytes) {
      // Over budget only with nothing else left to park.
      expect(cur, `${held} bytes held after add(), budget ${opts.memoryBytes}`).not.toBeNull();
      expect(held, `${held} bytes held, budget ${opts.memoryBytes}, the reader handed out holds ${cur!.memory}`).toBe(cur!.memory);
    }
  };
  for (const f of files) m.add(f.path, f.format);
  look(null);
  for (let r = m.next(); r !== null; r = m.next()) {
    expect(r.state).toBe(BUFFERED);
    look(r);
    run.keys.push(gotKey(r, r.peek()));
    run.sortKeys.push([r.headSec, r.headNsec]);
  }
  expect(m.readers.every((r) => r.state !== BUFFERED && r.memory === 0)).toBe(true);
  run.messages = messages;
  return run;
}

const reportKeys = (rs: Report[]): string[] => rs.map((r) => `${r.node} ${r.reason} ${r.detail}`).sort();

// --- Arbitraries ------------------------------------------------------------------------------

const size = fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: 200 }) }, { weight: 3, arbitrary: fc.integer({ min: 200, max: 1500 }) }, { weight: 1, arbitrary: fc.integer({ min: 1500, max: 5000 }) });
const kind = fc.constantFrom<Kind>('read', 'read', 'write', 'write', 'closed');

/**
 * A file's events. `order`: 'sorted' (Envoy's own files: time order, ties kept), 'jitter' (time
 * order but for some events that go back a little: clock steps, events of several connections
 * written late) or 'random' (no order at all). Some events have no timestamp.
 */
function fileSpec(formats: fc.Arbitrary<Format>, maxEvents: number, order: fc.Arbitrary<'sorted' | 'jitter' | 'random'>): fc.Arbitrary<FileSpec> {
  return fc
    .record({
      format: formats,
      order,
      traces: fc.integer({ min: 0, max: 3 }),
      raw: fc.array(
        fc.record({ trace: fc.nat(), kind, tick: fc.integer({ min: 0, max: 47 }), timed: fc.integer({ min: 0, max: 99 }), back: fc.integer({ min: 0, max: 99 }), jump: fc.integer({ min: 1, max: 12 }), size }),
        { maxLength: maxEvents, size: 'max' },
      ),
      connAt: fc.array(fc.double({ min: 0, max: 0.999, noNaN: true }), { minLength: 3, maxLength: 3 }),
    })
    .map(({ format, order, traces, raw, connAt }) => {
      if (traces === 0) return { format, traces, events: [], connAt };
      let ticks = raw.map((r) => r.tick);
      if (order !== 'random') ticks.sort((a, b) => a - b);
      if (order === 'jitter') ticks = ticks.map((t, i) => (raw[i]!.back < 30 ? Math.max(0, t - raw[i]!.jump) : t));
      const events = raw.map((r, i) => ({ trace: r.trace % traces, kind: r.kind, tick: r.timed < 15 ? null : ticks[i]!, size: r.size }));
      // Connection segments: all at the start of a file in time order, anywhere before their first event otherwise.
      return { format, traces, events, connAt: order === 'sorted' ? [0, 0, 0] : connAt };
    });
}

// --- Tests ------------------------------------------------------------------------------------

describe('TapMerge: files in time order', () => {
  it('yields the stable sort by (time, file, order in file) of every event, with a tiny budget (parking) and a huge one', () => {
    let parks = 0;
    let resumes = 0;
    let multiBatch = 0;
    fc.assert(
      fc.property(
        fc.array(fileSpec(fc.constant<Format>('pb_length_delimited'), 30, fc.constant('sorted')), { minLength: 1, maxLength: 40, size: 'max' }),
        fc.constantFrom(48, 256, 1024, 4096),
        fc.constantFrom(1, 600, 5000),
        (specs, chunkBytes, memoryBytes) => {
          const files = buildFiles(runDir(), specs);
          const want = stableSortModel(files);
          const tiny = runMerge(files, { memoryBytes, maxMessageBytes: MAX_MESSAGE, chunkBytes });
          expect(tiny.keys).toEqual(want);
          const huge = runMerge(files, HUGE);
          expect(huge.keys).toEqual(want);
          expect(huge.parks).toBe(0);
          // Every message was counted once, however often its batch was read.
          expect(tiny.messages).toBe(huge.messages);
          expect(tiny.reports).toEqual([]);
          // A reader holds a chunk, or one frame larger than that.
          expect(tiny.peakReader).toBeLessThanOrEqual(Math.max(chunkBytes, ...files.map((f) => f.maxFrame)));
          // The merge keys handed out never go back.
          for (let i = 1; i < tiny.sortKeys.length; i++) {
            const [a, b] = [tiny.sortKeys[i - 1]!, tiny.sortKeys[i]!];
            expect(a[0] < b[0] || (a[0] === b[0] && a[1] <= b[1])).toBe(true);
          }
          parks += tiny.parks;
          resumes += tiny.resumes;
          if (files.some((f) => fs.statSync(f.path).size > chunkBytes * 2)) multiBatch++;
        },
      ),
      { numRuns: 60, seed: 20251207 },
    );
    // The runs did exercise what they are about.
    expect(parks).toBeGreaterThan(200);
    expect(resumes).toBeGreaterThan(200);
    expect(multiBatch).toBeGreaterThan(20);
  });

  it('the same with recorded gRPC streams, JSON files (replays restart them) and buffered traces (.pb) among them', () => {
    let resumes = 0;
    fc.assert(
      fc.property(
        fc.array(fileSpec(fc.constantFrom<Format>('pb_length_delimited', 'grpc', 'json', 'pb'), 12, fc.constant('sorted')), { minLength: 1, maxLength: 10, size: 'max' }),
        fc.constantFrom(256, 1024),
        fc.constantFrom(1, 3000),
        (specs, chunkBytes, memoryBytes) => {
          const files = buildFiles(runDir(), specs);
          const want = stableSortModel(files);
          const tiny = runMerge(files, { memoryBytes, maxMessageBytes: MAX_MESSAGE, chunkBytes });
          expect(tiny.keys).toEqual(want);
          expect(tiny.reports).toEqual([]);
          const huge = runMerge(files, HUGE);
          expect(huge.keys).toEqual(want);
          expect(tiny.messages).toBe(huge.messages);
          resumes += tiny.resumes;
        },
      ),
      { numRuns: 25, seed: 70707 },
    );
    expect(resumes).toBeGreaterThan(50);
  });
});

describe('TapMerge: memory', () => {
  it('with 300 files and a 12 KiB budget, the bytes held stay within the budget plus the largest chunk or message', () => {
    // Deterministic traffic: 300 connections of 5–40 events each, overlapping in time.
    let seed = 42;
    const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const specs: FileSpec[] = [];
    for (let f = 0; f < 300; f++) {
      const n = 5 + Math.floor(rnd() * 36);
      let tick = Math.floor(rnd() * 200);
      const events: EvSpec[] = [];
      for (let i = 0; i < n; i++) {
        tick += Math.floor(rnd() * 3);
        const r = rnd();
        events.push({ trace: 0, kind: i === n - 1 ? 'closed' : rnd() < 0.5 ? 'read' : 'write', tick, size: r < 0.7 ? 1 + Math.floor(rnd() * 300) : r < 0.95 ? 300 + Math.floor(rnd() * 1500) : 6000 + Math.floor(rnd() * 6000) });
      }
      specs.push({ format: 'pb_length_delimited', traces: 1, events, connAt: [0] });
    }
    const files = buildFiles(runDir(), specs);
    const chunkBytes = 2048;
    const budget = 12 * 1024;
    const largest = Math.max(...files.map((f) => f.maxFrame));
    expect(largest).toBeGreaterThan(chunkBytes); // some messages do not fit a chunk

    const tiny = runMerge(files, { memoryBytes: budget, maxMessageBytes: MAX_MESSAGE, chunkBytes }); // checks the budget at every step
    expect(tiny.peakHeld).toBeLessThanOrEqual(budget + Math.max(chunkBytes, largest));
    expect(tiny.peakReader).toBeLessThanOrEqual(Math.max(chunkBytes, largest));
    expect(tiny.parks).toBeGreaterThan(300);
    expect(tiny.resumes).toBeGreaterThan(300);
    const want = stableSortModel(files);
    expect(tiny.keys).toEqual(want);

    // Unbounded, the same input holds far more at once: the budget is what kept it small.
    const huge = runMerge(files, HUGE, false);
    expect(huge.keys).toEqual(want);
    expect(huge.peakHeld).toBeGreaterThan(20 * budget);
  });
});

describe('TapMerge: files not in time order', () => {
  it("a connection's own events keep their file order; parking changes nothing; every event comes out once", () => {
    let backwards = 0;
    fc.assert(
      fc.property(
        fc.array(fileSpec(fc.constantFrom<Format>('pb_length_delimited', 'pb_length_delimited', 'grpc', 'json'), 25, fc.constantFrom('jitter', 'jitter', 'random')), { minLength: 1, maxLength: 8, size: 'max' }),
        fc.constantFrom(96, 512, 2048),
        (specs, chunkBytes) => {
          const files = buildFiles(runDir(), specs);
          const tiny = runMerge(files, { memoryBytes: 1, maxMessageBytes: MAX_MESSAGE, chunkBytes });
          // The same batches without parking: replays must not change anything.
          const free = runMerge(files, { memoryBytes: 1 << 30, maxMessageBytes: MAX_MESSAGE, chunkBytes });
          expect(tiny.keys).toEqual(free.keys);
          expect(tiny.sortKeys).toEqual(free.sortKeys);
          expect(tiny.messages).toBe(free.messages);
          // Every event exactly once.
          const all = files.flatMap((f) => f.expected);
          expect([...tiny.keys].sort()).toEqual(all.map((e) => e.key).sort());
          // Per connection (file, trace), file order.
          const where = new Map(all.map((e) => [e.key, e]));
          const seen = new Map<string, number>();
          for (const k of tiny.keys) {
            const e = where.get(k)!;
            const conn = `${e.file}/${e.trace}`;
            expect(e.order, `${k} came out before an earlier event of its connection`).toBeGreaterThan(seen.get(conn) ?? -1);
            seen.set(conn, e.order);
          }
          // Merge keys never go back, and no event sorts before its own timestamp.
          for (let i = 1; i < tiny.sortKeys.length; i++) {
            const [a, b] = [tiny.sortKeys[i - 1]!, tiny.sortKeys[i]!];
            expect(a[0] < b[0] || (a[0] === b[0] && a[1] <= b[1])).toBe(true);
          }
          tiny.keys.forEach((k, i) => {
            const ts = where.get(k)!.ts;
            if (ts) {
              const [s, ns] = tiny.sortKeys[i]!;
              expect(s > ts[0] || (s === ts[0] && ns >= ts[1]), `${k} sorted at ${s}.${ns}`).toBe(true);
            }
          });
          for (const f of files) {
            const byTrace = new Map<number, number>();
            for (const e of f.expected) {
              if (!e.ts) continue;
              const t = e.ts[0] * 1e9 + e.ts[1];
              if (t < (byTrace.get(e.trace) ?? 0)) backwards++;
              byTrace.set(e.trace, Math.max(t, byTrace.get(e.trace) ?? 0));
            }
          }
        },
      ),
      { numRuns: 50, seed: 99 },
    );
    expect(backwards).toBeGreaterThan(100); // the inputs did go backwards, often
  });
});

describe('TapMerge: bad input', () => {
  /** Connection 0 of file `f`: a connection segment and `n` events of `size` bytes, one per millisecond from `t`. */
  function connFrames(f: number, n: number, size: number, t: number): { frames: Buffer[]; expected: string[] } {
    const frames: Buffer[] = [traceWrapper(traceIdOf(0), { kind: 'connection', local: localOf(f, 0), remote: remoteOf(f, 0) })];
    const events: Array<[number, number, Buffer]> = [];
    for (let i = 0; i < n; i++) {
      const ns = (t + i) * 1_000_000;
      const p = payloadOf(f, i, size);
      events.push([T0 + Math.floor(ns / 1e9), ns % 1e9, p]);
      frames.push(traceWrapper(traceIdOf(0), { kind: i % 2 ? 'write' : 'read', tsSec: T0 + Math.floor(ns / 1e9), tsNsec: ns % 1e9, payload: p }));
    }
    return { frames, expected: events.map(([s, ns, p]) => `${s}.${ns} ${digest(p)}`) };
  }
  const nodeOf = (file: string): string => `file:${path.resolve(file)}`;

  it('a truncated file, an oversized length, a broken varint and a malformed message: each reported once (however often its batch is replayed), every whole message before it converted, the other files whole', () => {
    const dir = runDir();
    const good = connFrames(0, 40, 700, 0);
    const trunc = connFrames(1, 30, 900, 3);
    const large = connFrames(2, 30, 500, 5);
    const badVarint = connFrames(3, 30, 500, 7);
    const badMsg = connFrames(4, 30, 500, 9);
    const files = {
      good: path.join(dir, 'good.pb_length_delimited'),
      trunc: path.join(dir, 'trunc.pb_length_delimited'),
      large: path.join(dir, 'large.pb_length_delimited'),
      badVarint: path.join(dir, 'badvarint.pb_length_delimited'),
      badMsg: path.join(dir, 'badmsg.pb_length_delimited'),
    };
    fs.writeFileSync(files.good, Buffer.concat(good.frames));
    const t = Buffer.concat(trunc.frames);
    const lastLen = trunc.frames.at(-1)!.length;
    fs.writeFileSync(files.trunc, t.subarray(0, t.length - 50)); // the last message cut short
    // After 20 events: a length above the limit; a varint of 11 bytes; a message that is not a TraceWrapper.
    fs.writeFileSync(files.large, Buffer.concat([...large.frames.slice(0, 21), varint(MAX_MESSAGE + 1), Buffer.alloc(64), ...large.frames.slice(21)]));
    fs.writeFileSync(files.badVarint, Buffer.concat([...badVarint.frames.slice(0, 21), Buffer.alloc(11, 0xff), ...badVarint.frames.slice(21)]));
    fs.writeFileSync(files.badMsg, Buffer.concat([...badMsg.frames.slice(0, 21), Buffer.from([2, 0x0a, 0xff]), ...badMsg.frames.slice(21)]));
    const built: BuiltFile[] = Object.values(files).map((p) => ({ path: p, format: 'pb_length_delimited', expected: [], maxFrame: 0 }));

    // A varint of more than 10 bytes: the framing is lost there, and everything from it on is "not a whole message".
    const afterVarint = 11 + Buffer.concat(badVarint.frames.slice(21)).length;
    const wantReports: Report[] = [
      { node: nodeOf(files.trunc), reason: 'malformed_protobuf', detail: `${files.trunc}: ${lastLen - 50} bytes at the end are not a whole length-delimited message` },
      { node: nodeOf(files.large), reason: 'message_too_large', detail: `${files.large}: length-delimited message of ${MAX_MESSAGE + 1} bytes exceeds the ${MAX_MESSAGE}-byte limit` },
      { node: nodeOf(files.badVarint), reason: 'malformed_protobuf', detail: `${files.badVarint}: ${afterVarint} bytes at the end are not a whole length-delimited message` },
    ];
    for (const opts of [HUGE, { memoryBytes: 1, maxMessageBytes: MAX_MESSAGE, chunkBytes: 1024 }]) {
      const run = runMerge(built, opts);
      // Data events per file, in order.
      const per = new Map<number, string[]>();
      for (const k of run.keys) {
        const m = /^f(\d+) \S+ k[12] t\d+ (\S+ \S+)/.exec(k);
        if (m) per.set(Number(m[1]), [...(per.get(Number(m[1])) ?? []), m[2]!]);
      }
      expect(per.get(0)).toEqual(good.expected);
      expect(per.get(1)).toEqual(trunc.expected.slice(0, -1));
      expect(per.get(2)).toEqual(large.expected.slice(0, 20)); // framing lost: the rest of the file is abandoned
      expect(per.get(3)).toEqual(badVarint.expected.slice(0, 20));
      expect(per.get(4)).toEqual(badMsg.expected); // framing intact: only the bad message is skipped
      const badMsgReports = run.reports.filter((r) => r.node === nodeOf(files.badMsg));
      expect(badMsgReports).toHaveLength(1);
      expect(badMsgReports[0]!.reason).toBe('malformed_protobuf');
      expect(reportKeys(run.reports.filter((r) => r.node !== nodeOf(files.badMsg)))).toEqual(reportKeys(wantReports));
      if (opts !== HUGE) expect(run.resumes).toBeGreaterThan(20);
    }
  });

  it('a file that cannot be read fails add() with a TapFileError naming it, before anything is merged', () => {
    const dir = runDir();
    const ok = path.join(dir, 'ok.pb_length_delimited');
    fs.writeFileSync(ok, Buffer.concat(connFrames(0, 3, 10, 0).frames));
    const missing = path.join(dir, 'missing.pb_length_delimited');
    const m = new TapMerge(3, { onEvent() {}, onIngestError() {}, onIngestMessage() {} }, HUGE);
    m.add(ok, 'pb_length_delimited');
    let err: unknown;
    try {
      m.add(missing, 'pb_length_delimited');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TapFileError);
    expect((err as TapFileError).file).toBe(missing);
    expect((err as TapFileError).message).toBe(`ENOENT: no such file or directory, open '${missing}'`);
    // A directory is not a file either.
    expect(() => m.add(dir, 'pb_length_delimited')).toThrow(TapFileError);
  });
});
