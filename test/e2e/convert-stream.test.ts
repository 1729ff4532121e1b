/**
 * `meshcap convert` reading its inputs a chunk at a time and merging them by time (the real CLI,
 * dist/), on inputs the whole-input sort of old got wrong or that must fail cleanly:
 *  - timestamps going backwards inside a file (also across the boundary between two chunks): each
 *    connection's bytes come out in its file order, every byte once, the flow table counts and
 *    logs each step back (timestamp_backwards) and the capture's time never goes back per flow;
 *  - a truncated length-delimited file: reported (exit 1), its whole messages and the other
 *    files converted;
 *  - a missing or unreadable file: named, exit 1, no capture.
 * Files are built with the benchmarks' encoder (bench/lib/tapwire.ts) and read back with the
 * tests' own capture reader (test/helpers/pcap-read.ts).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { packetsFor, traceWrapper, type SockAddr, type TapEventSpec } from '../../bench/lib/tapwire.js';
import { parseTcp, readCaptureFile } from '../helpers/pcap-read.js';
import { CLI_BUILT, runCli, tempDir } from '../helpers/serve-process.js';

const T0 = 1_763_900_000;
/** convert's read size per file for a few files (tap-merge.ts: the budget shared out, at most 1 MiB). */
const CHUNK = 1024 * 1024;
const MSS = 1460;

const dirs: string[] = [];
afterAll(() => {
  if (!process.env.MESHCAP_E2E_KEEP) for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});
function dir(): string {
  const d = tempDir('meshcap-convert-stream-');
  dirs.push(d);
  return d;
}

interface Conn {
  id: number;
  local: SockAddr;
  remote: SockAddr;
}

interface Ev {
  conn: Conn;
  kind: 'read' | 'write' | 'closed';
  /** Milliseconds after T0. */
  ms: number;
  payload?: Buffer;
}

const payload = (tag: string, n: number): Buffer => {
  const seed = crypto.createHash('sha256').update(tag).digest();
  const out = Buffer.allocUnsafe(n);
  for (let o = 0; o < n; o += seed.length) seed.copy(out, o, 0, Math.min(seed.length, n - o));
  return out;
};

const timeOf = (ms: number): [number, number] => [T0 + Math.floor(ms / 1000), (ms % 1000) * 1_000_000];

/**
 * A length-delimited tap file: each connection's segment before its first event, then the events
 * in the order given, with Envoy's seq_nums (in that order). Returns the frames, and where each
 * event's frame ends in the file.
 */
function writeTapFile(file: string, events: Ev[]): { frames: Buffer[]; ends: number[] } {
  const frames: Buffer[] = [];
  const ends: number[] = [];
  let size = 0;
  const seen = new Set<number>();
  const seq = new Map<number, number>();
  const push = (f: Buffer) => {
    frames.push(f);
    size += f.length;
  };
  for (const e of events) {
    if (!seen.has(e.conn.id)) {
      seen.add(e.conn.id);
      push(traceWrapper(e.conn.id, { kind: 'connection', local: e.conn.local, remote: e.conn.remote }));
    }
    const [tsSec, tsNsec] = timeOf(e.ms);
    const s = seq.get(e.conn.id) ?? 1;
    const spec: TapEventSpec = e.kind === 'closed' ? { kind: 'closed', tsSec, tsNsec, seqNum: s } : { kind: e.kind, tsSec, tsNsec, payload: e.payload!, seqNum: s };
    seq.set(e.conn.id, s + (e.payload?.length ?? 1));
    push(traceWrapper(e.conn.id, spec));
    ends.push(size);
  }
  fs.writeFileSync(file, Buffer.concat(frames));
  return { frames, ends };
}

const ep = (a: SockAddr): string => `${a.address}:${a.port}`;

/** Per TCP direction ("src:port>dst:port"), the payload a connection's events carry, in their order. */
function expectedDirections(events: Ev[]): Map<string, Buffer> {
  const parts = new Map<string, Buffer[]>();
  for (const e of events) {
    if (!e.payload) continue;
    // read: bytes Envoy received from the peer (remote → local); write: local → remote.
    const key = e.kind === 'read' ? `${ep(e.conn.remote)}>${ep(e.conn.local)}` : `${ep(e.conn.local)}>${ep(e.conn.remote)}`;
    parts.set(key, [...(parts.get(key) ?? []), e.payload]);
  }
  return new Map([...parts].map(([k, v]) => [k, Buffer.concat(v)]));
}

/** Packets meshcap makes of a connection's events (handshake, one segment per MSS, teardown). */
function expectedPackets(events: Ev[]): number {
  const started = new Set<Conn>();
  let n = 0;
  for (const e of events) {
    const spec: TapEventSpec = e.kind === 'closed' ? { kind: 'closed', tsSec: 0, tsNsec: 0 } : { kind: e.kind, tsSec: 0, tsNsec: 0, payload: e.payload! };
    n += packetsFor(spec, started.has(e.conn), MSS);
    started.add(e.conn);
  }
  return n;
}

/** The events of each connection that are older than one before them (in file order): what the flow table must count. */
function backwardsSteps(file: string, events: Ev[]): string[] {
  const latest = new Map<number, number>();
  const out: string[] = [];
  for (const e of events) {
    const before = latest.get(e.conn.id) ?? -Infinity;
    if (e.ms < before) {
      const [s, ns] = timeOf(e.ms);
      out.push(`file:${file} trace ${e.conn.id}: event time ${s}.${ns} is before the previous event's; using the previous time`);
    }
    latest.set(e.conn.id, Math.max(before, e.ms));
  }
  return out;
}

interface ReadBack {
  /** Per direction, the TCP payload in capture order. */
  directions: Map<string, Buffer>;
  packets: number;
}

/**
 * Reads a capture back: payload per direction in capture order, checking on the way that each
 * direction's sequence numbers run on without gap or overlap and that no conversation's time
 * goes back.
 */
function readBack(file: string): ReadBack {
  const cap = readCaptureFile(file);
  const parts = new Map<string, Buffer[]>();
  const nextSeq = new Map<string, number>();
  const lastTs = new Map<string, bigint>();
  for (const p of cap.packets) {
    const tcp = parseTcp(p.linkType, p.data);
    expect(tcp).not.toBeNull();
    const key = `${tcp!.src}:${tcp!.srcPort}>${tcp!.dst}:${tcp!.dstPort}`;
    const conv = [`${tcp!.src}:${tcp!.srcPort}`, `${tcp!.dst}:${tcp!.dstPort}`].sort().join(' ');
    expect(p.tsNs >= (lastTs.get(conv) ?? 0n), `${conv}: capture time went back`).toBe(true);
    lastTs.set(conv, p.tsNs);
    if (tcp!.payload.length === 0) continue;
    const want = nextSeq.get(key);
    if (want !== undefined) expect(tcp!.seq, `${key}: sequence numbers do not run on`).toBe(want);
    nextSeq.set(key, (tcp!.seq + tcp!.payload.length) >>> 0);
    parts.set(key, [...(parts.get(key) ?? []), Buffer.from(tcp!.payload)]);
  }
  return { directions: new Map([...parts].map(([k, v]) => [k, Buffer.concat(v)])), packets: cap.packets.length };
}

/** meshcap's JSON log lines on stderr, and the other lines. */
function stderrLines(stderr: string): { logs: Array<Record<string, unknown>>; text: string[] } {
  const logs: Array<Record<string, unknown>> = [];
  const text: string[] = [];
  for (const line of stderr.split('\n')) {
    if (!line) continue;
    try {
      logs.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      text.push(line);
    }
  }
  return { logs, text };
}

const hexMap = (m: Map<string, Buffer>): Record<string, string> =>
  Object.fromEntries([...m].sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => [k, `${v.length}:${crypto.createHash('sha256').update(v).digest('hex')}`]));

describe.skipIf(!CLI_BUILT)('meshcap convert: streamed inputs, end to end', () => {
  it("timestamps going backwards inside a file: each connection's bytes in file order, every step back counted", async () => {
    const d = dir();
    // File a: two connections written into one file (as a recorded stream is), 1.6 MB, so that
    // it is read in two chunks; some events are older than ones before them, two of them right
    // after the chunk boundary.
    const c1: Conn = { id: 1, local: { address: '10.0.0.1', port: 8443 }, remote: { address: '10.0.0.2', port: 40001 } };
    const c2: Conn = { id: 2, local: { address: '10.0.0.1', port: 8443 }, remote: { address: '10.0.0.3', port: 40002 } };
    // File b: another Envoy, whose connection has the same trace id 1, in time order, overlapping a's time.
    const b1: Conn = { id: 1, local: { address: '10.9.0.1', port: 9443 }, remote: { address: '10.9.0.2', port: 50001 } };
    const aEvents: Ev[] = [];
    for (let i = 0; i < 120; i++) {
      const conn = i % 3 === 2 ? c2 : c1;
      aEvents.push({ conn, kind: i % 2 ? 'write' : 'read', ms: i * 10, payload: payload(`a${i}`, 13_000) });
    }
    // The first event whose frame does not fit in the first chunk begins the second batch.
    const a = path.join(d, 'a.pb_length_delimited');
    const firstPast = (ends: number[]) => ends.findIndex((end) => end > CHUNK);
    const boundary = firstPast(writeTapFile(a, aEvents).ends);
    expect(boundary).toBeGreaterThan(60);
    for (const i of [5, 40, 41, boundary, boundary + 1, 100]) aEvents[i]!.ms -= 35;
    aEvents.push({ conn: c1, kind: 'closed', ms: 1200 });
    aEvents.push({ conn: c2, kind: 'closed', ms: 1150 }); // older than c2's last data event
    const bEvents: Ev[] = [];
    for (let i = 0; i < 40; i++) bEvents.push({ conn: b1, kind: i % 2 ? 'read' : 'write', ms: 3 + i * 30, payload: payload(`b${i}`, 2_000 + i) });
    bEvents.push({ conn: b1, kind: 'closed', ms: 1250 });

    const b = path.join(d, 'b.pb_length_delimited');
    expect(firstPast(writeTapFile(a, aEvents).ends)).toBe(boundary);
    writeTapFile(b, bEvents);
    expect(fs.statSync(a).size).toBeGreaterThan(CHUNK);
    const steps = [...backwardsSteps(a, aEvents), ...backwardsSteps(b, bEvents)];
    expect(steps.length).toBeGreaterThanOrEqual(6);
    expect(steps.length).toBeLessThanOrEqual(10); // meshcap logs up to 10 of a kind per second

    const out = path.join(d, 'out.pcapng');
    const r = await runCli(['convert', a, b, '-w', out], { cwd: d });
    const { logs, text } = stderrLines(r.stderr);
    expect(r.code, r.stderr).toBe(0);
    const packets = expectedPackets(aEvents) + expectedPackets(bEvents);
    expect(text).toEqual([`meshcap convert: 2 file(s), 3 connection(s), ${packets} packets → ${out}`]);
    // Only the steps back were worth a warning (no duplicate or lost bytes), each once.
    expect(logs.map((l) => l.reason)).toEqual(steps.map(() => 'timestamp_backwards'));
    expect(logs.map((l) => `${l.node} ${l.msg}`).sort()).toEqual(steps.sort());

    const got = readBack(out);
    expect(got.packets).toBe(packets);
    const want = new Map([...expectedDirections(aEvents), ...expectedDirections(bEvents)]);
    expect(want.size).toBe(6);
    expect(hexMap(got.directions)).toEqual(hexMap(want));
  });

  it('a truncated length-delimited file is reported and exits 1; its whole messages and the other files are converted', async () => {
    const d = dir();
    const conns = [1, 2, 3].map((n): Conn => ({ id: 7, local: { address: `10.1.${n}.1`, port: 443 }, remote: { address: `10.1.${n}.2`, port: 41000 + n } }));
    const conn = (n: number): Conn => conns[n - 1]!;
    const events = (n: number, c: Conn, count: number, last: number): Ev[] => {
      const evs: Ev[] = [];
      for (let i = 0; i < count; i++) evs.push({ conn: c, kind: i % 2 ? 'write' : 'read', ms: n + i * 7, payload: payload(`${n}/${i}`, i === count - 1 ? last : 3_000) });
      return evs;
    };
    const good1 = [...events(1, conn(1), 20, 3_000), { conn: conn(1), kind: 'closed' as const, ms: 500 }];
    const cut = events(2, conn(2), 20, 5_000); // its last event will be cut short, and there is no close
    const good3 = [...events(3, conn(3), 20, 3_000), { conn: conn(3), kind: 'closed' as const, ms: 500 }];
    const files = [path.join(d, 'one.pb_length_delimited'), path.join(d, 'cut.pb_length_delimited'), path.join(d, 'three.pb_length_delimited')];
    writeTapFile(files[0]!, good1);
    const { frames } = writeTapFile(files[1]!, cut);
    writeTapFile(files[2]!, good3);
    fs.truncateSync(files[1]!, fs.statSync(files[1]!).size - 50);

    const out = path.join(d, 'out.pcapng');
    const r = await runCli(['convert', ...files, '-w', out], { cwd: d });
    expect(r.code, r.stderr).toBe(1);
    const { logs, text } = stderrLines(r.stderr);
    expect(logs.map((l) => [l.level, l.reason, l.node, l.msg])).toEqual([
      [40, 'malformed_protobuf', `file:${files[1]}`, `${files[1]}: ${frames.at(-1)!.length - 50} bytes at the end are not a whole length-delimited message`],
    ]);
    const converted = [...good1, ...cut.slice(0, -1), ...good3];
    const packets = expectedPackets(converted);
    expect(text).toEqual([`meshcap convert: 3 file(s), 3 connection(s), ${packets} packets → ${out}, 1 input error(s)`]);
    const got = readBack(out);
    expect(got.packets).toBe(packets);
    expect(hexMap(got.directions)).toEqual(hexMap(expectedDirections(converted)));
  });

  it('a missing file, or a directory, is named and stops the conversion before anything is written (exit 1)', async () => {
    const d = dir();
    const c: Conn = { id: 1, local: { address: '10.2.0.1', port: 80 }, remote: { address: '10.2.0.2', port: 42000 } };
    const good = path.join(d, 'good.pb_length_delimited');
    writeTapFile(good, [{ conn: c, kind: 'read', ms: 0, payload: payload('g', 100) }]);
    const missing = path.join(d, 'missing.pb_length_delimited');
    const sub = path.join(d, 'sub.pb_length_delimited');
    fs.mkdirSync(sub);
    for (const [bad, message] of [
      [missing, `ENOENT: no such file or directory, open '${missing}'`],
      [sub, 'EISDIR: illegal operation on a directory, read'],
    ] as const) {
      const out = path.join(d, `out-${path.basename(bad)}.pcapng`);
      const r = await runCli(['convert', good, bad, good, '-w', out], { cwd: d });
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toEqual([`meshcap convert: ${bad}: ${message}`]);
      expect(fs.existsSync(out)).toBe(false);
      expect(fs.existsSync(`${out}.part`)).toBe(false); // nothing half-written left behind
    }
  });
});
