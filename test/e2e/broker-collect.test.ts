/**
 * The broker sink with `meshcap collect` as the far side (acknowledged delivery, ALPN
 * meshcap-capture/1): exactly once.
 *
 *  - collect SIGKILLed and restarted several times mid-stream: the captures it wrote, merged,
 *    equal the capture on disk record for record (no loss, no duplicate), per-direction payload
 *    identical under tshark; SIGTERM completes every file and exits 0;
 *  - collect refuses a sidecar outside its allowlist, a foreign-CA and an expired client
 *    certificate (logged, counted) and keeps serving the allowed one;
 *  - certificates replaced on disk mid-stream: the next connection presents the new one, nothing
 *    lost, nothing doubled;
 *  - broker down: packets go to the on-disk spool and are replayed in order when it comes up,
 *    then live traffic; the spool empties;
 *  - spool full: the newest packets are dropped, counted, and marked on the next packet that gets
 *    through (pcapng epb_dropcount and comment);
 *  - a sidecar restarted with its spool continues its stream exactly once;
 *  - spread mode keeps every flow on one collector; failover moves to the next and back.
 */
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Collector } from '../../src/cli/collect.js';
import { TestPki, brokerPki, INTRUDER_SPIFFE, SIDECAR_A_SPIFFE, type BrokerPki } from '../helpers/pki.js';
import { followTcpRaw, tsharkFields } from '../helpers/tshark.js';
import {
  captureLog,
  collectedFiles,
  ensureBuilt,
  firstDifference,
  frameOf,
  freePort,
  inProcessCollector,
  makeRig,
  readRecords,
  sleep,
  startCollect,
  tempDir,
  Traffic,
  waitFor,
  writeCapture,
  type CollectProcess,
  type Rig,
} from './broker-harness.js';

let P: BrokerPki;
const cleanup: Array<() => Promise<void> | void> = [];
const dirs: string[] = [];
const ALLOW = 'spiffe://test.example/ns/capture/**';

beforeAll(async () => {
  P = await brokerPki();
  ensureBuilt();
});
afterAll(() => P?.pki.remove());
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
  if (!process.env.MESHCAP_E2E_KEEP) for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function dir(prefix: string): string {
  const d = tempDir(prefix);
  dirs.push(d);
  return d;
}

function rig(o: Parameters<typeof makeRig>[0]): Rig {
  const r = makeRig(o);
  cleanup.push(() => r.close());
  return r;
}

async function collector(port: number, out: string, allow = [ALLOW]): Promise<Collector> {
  const { collector: c } = await inProcessCollector({ port, dir: out, cert: P.broker.cert, key: P.broker.key, ca: P.ca.cert, allow });
  cleanup.push(() => c.close());
  return c;
}

function collectArgs(port: number, out: string): string[] {
  return ['--listen', `127.0.0.1:${port}`, '--tls-cert', P.broker.cert, '--tls-key', P.broker.key, '--tls-ca', P.ca.cert, '-w', out, '--allow', ALLOW, '--log-level', 'debug'];
}

async function spawnCollect(port: number, out: string, extra: string[] = []): Promise<CollectProcess> {
  const c = await startCollect([...collectArgs(port, out), ...extra]);
  cleanup.push(() => {
    if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill('SIGKILL');
  });
  return c;
}

/** Every record collect wrote for one sidecar directory, in order. */
function collected(out: string): { header: Buffer; recs: Buffer[]; files: string[] } {
  const files = collectedFiles(out);
  const parts = files.map((f) => readRecords(f));
  for (const p of parts) expect(p.trailing).toBe(0); // collect never leaves half a record
  return { header: parts[0]?.header ?? Buffer.alloc(0), recs: parts.flatMap((p) => p.recs), files };
}

const lane = (r: Rig) => r.broker.lanes[0]!;

describe('broker sink → meshcap collect (acknowledged: exactly once)', () => {
  it('collect SIGKILLed and restarted mid-stream: merged captures equal the disk capture, no loss, no duplicate', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    let c = await spawnCollect(port, out);
    const d = dir('meshcap-bc-');
    const r = rig({ dir: d, diskFormat: 'pcap', brokers: [`tls://localhost:${port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    const t = new Traffic(8, 30, 48 * 1024, 51);
    await waitFor('connected', () => lane(r).connected);
    const kills = new Set([5, 12, 19]);
    await r.feed(t, 0, t.rounds.length, 40, async (round) => {
      if (!kills.has(round)) return;
      c.child.kill('SIGKILL');
      await c.exited;
      await sleep(100);
      c = await spawnCollect(port, out);
    });
    await waitFor('everything acknowledged', () => lane(r).ackedSeq === lane(r).nextSeq, 15_000);
    await r.close();
    c.child.kill('SIGTERM');
    expect(await c.exited).toEqual({ code: 0, signal: null });

    const got = collected(out);
    const disk = readRecords(r.diskFile);
    expect(got.files.every((f) => !f.endsWith('.part'))).toBe(true);
    expect(path.basename(path.dirname(got.files[0]!))).toBe('test.example+ns+capture+sa+sidecar-a');
    expect(got.recs.length).toBe(disk.recs.length);
    expect(firstDifference(got.recs, disk.recs)).toBe(-1);
    expect(lane(r).resentPackets).toBeGreaterThan(0); // the kills did cut deliveries short
    // The restarted collectors recovered the open files and skipped what the sidecar resent.
    const logs = c.logs;
    expect(logs.some((l) => l.msg === 'sidecar stream attached')).toBe(true);
    // Per direction, the payload is the same (tshark follow on the merged capture).
    const merged = path.join(d, 'merged.pcap');
    writeCapture(merged, got.header, got.recs);
    const [fa, fb] = await Promise.all([followTcpRaw(merged), followTcpRaw(r.diskFile)]);
    expect(fa.length).toBe(8);
    expect(fa.map((s) => [s.aToB.toString('hex'), s.bToA.toString('hex')])).toEqual(fb.map((s) => [s.aToB.toString('hex'), s.bToA.toString('hex')]));
    expect(r.stats.totalDrops()).toBe(0);
  });

  it('-C 1 -W 2: collect rotates by size and keeps the newest 2 files of a stream', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-ring-');
    const c = await spawnCollect(port, out, ['-C', '1', '-W', '2']);
    const r = rig({ dir: dir('meshcap-bc-'), diskFormat: 'pcap', brokers: [`tls://localhost:${port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    const t = new Traffic(8, 24, 48 * 1024, 53);
    await waitFor('connected', () => lane(r).connected);
    await r.feed(t, 0, t.rounds.length, 20);
    await waitFor('everything acknowledged', () => lane(r).ackedSeq === lane(r).nextSeq, 15_000);
    await r.close();
    c.child.kill('SIGTERM');
    expect(await c.exited).toEqual({ code: 0, signal: null });
    const completed = c.logs.filter((l) => l.msg === 'capture file completed').map((l) => path.basename(l.file as string));
    expect(completed.length).toBeGreaterThan(3);
    const files = collectedFiles(out).map((f) => path.basename(f));
    expect(files).toEqual(completed.slice(-2));
    for (const f of collectedFiles(out)) expect(readRecords(f).trailing).toBe(0);
  });

  it('refuses a sidecar outside the allowlist, a foreign-CA and an expired certificate, and keeps serving the allowed one', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const clog = captureLog();
    const { collector: c } = await inProcessCollector({ port, dir: out, cert: P.broker.cert, key: P.broker.key, ca: P.ca.cert, allow: [ALLOW], log: clog });
    cleanup.push(() => c.close());
    const good = rig({ dir: dir('meshcap-bc-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    const bad = [P.intruder, P.foreign, P.expired].map((cert) => rig({ dir: dir('meshcap-bc-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${port}`], cert: cert.cert, key: cert.key, ca: P.ca.cert }));
    const t = new Traffic(4, 10, 16 * 1024, 61);
    const tb = new Traffic(2, 4, 8 * 1024, 62);
    await Promise.all([good.feed(t, 0, t.rounds.length, 20), ...bad.map((b) => b.feed(tb, 0, tb.rounds.length, 20))]);
    await waitFor('refusals', () => ['not_allowed', 'client_cert_untrusted', 'client_cert_expired'].every((k) => (c.counters.rejected.get(k) ?? 0) >= 1)).catch((err) => {
      throw new Error(`${(err as Error).message}: ${JSON.stringify([...c.counters.rejected])} ${JSON.stringify(clog.reasons(/rejected/).slice(0, 5))}`);
    });
    await waitFor('good delivered', () => lane(good).ackedSeq === lane(good).nextSeq && lane(good).nextSeq === good.stats.packets);
    // The sidecars see why.
    const intruderErr = bad[0]!.log.reasons(/^rejected_by_broker$/)[0]!;
    expect(String(intruderErr.err)).toMatch(/not_allowed: SPIFFE ID spiffe:\/\/test\.example\/ns\/other\/sa\/intruder is not on the allowlist/);
    expect(bad.every((b) => lane(b).deliveredPackets === 0)).toBe(true);
    // The collector logged and counted each refusal.
    for (const reason of ['collect_rejected_not_allowed', 'collect_rejected_client_cert_untrusted', 'collect_rejected_client_cert_expired']) {
      expect(clog.reasons(new RegExp(`^${reason}$`)).length, reason).toBeGreaterThanOrEqual(1);
    }
    expect(clog.reasons(/^collect_rejected_not_allowed$/)[0]!.spiffe_id).toBe(INTRUDER_SPIFFE);
    await good.close();
    await c.close();
    // Only the allowed sidecar has a directory, holding exactly its capture.
    expect(fs.readdirSync(out)).toEqual(['test.example+ns+capture+sa+sidecar-a']);
    expect(firstDifference(collected(out).recs, readRecords(good.diskFile).recs)).toBe(-1);
  });

  it('certificates replaced on disk mid-stream: the next connection uses them, nothing lost or doubled', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const clog = captureLog();
    let { collector: c } = await inProcessCollector({ port, dir: out, cert: P.broker.cert, key: P.broker.key, ca: P.ca.cert, allow: [ALLOW], log: clog });
    const d = dir('meshcap-bc-');
    const cert = path.join(d, 'tls.crt');
    const key = path.join(d, 'tls.key');
    TestPki.install(P.sidecarA, cert, key);
    const r = rig({ dir: d, diskFormat: 'pcapng', brokers: [`tls://127.0.0.1:${port}`], cert, key, ca: P.ca.cert, broker: { format: 'pcapng' } });
    const t = new Traffic(4, 16, 24 * 1024, 71);
    const serial = (f: string) => new X509Certificate(fs.readFileSync(f)).serialNumber;
    await r.feed(t, 0, 6, 20);
    await waitFor('first connection', () => clog.lines.some((l) => l.msg === 'sidecar connected'));
    expect(clog.lines.find((l) => l.msg === 'sidecar connected')!.serial).toBe(serial(P.sidecarA.cert));
    // cert-manager renews the certificate (same identity, new key and serial) while traffic flows.
    TestPki.install(P.sidecarARenewed, cert, key);
    await waitFor('reload', () => r.tls.current.info.serial === serial(P.sidecarARenewed.cert));
    await r.feed(t, 6, 10, 20);
    // The collector restarts (a rollout): the sidecar reconnects with the renewed certificate.
    await c.close();
    ({ collector: c } = await inProcessCollector({ port, dir: out, cert: P.broker.cert, key: P.broker.key, ca: P.ca.cert, allow: [ALLOW], log: clog }));
    cleanup.push(() => c.close());
    await r.feed(t, 10, 16, 20);
    await waitFor('everything acknowledged', () => lane(r).ackedSeq === lane(r).nextSeq && lane(r).nextSeq === r.stats.packets);
    const conns = clog.lines.filter((l) => l.msg === 'sidecar connected');
    expect(conns.at(-1)!.serial).toBe(serial(P.sidecarARenewed.cert));
    expect(conns.at(-1)!.spiffe_id).toBe(SIDECAR_A_SPIFFE);
    await r.close();
    await c.close();
    expect(r.tls.reloads).toBe(1);
    const got = collected(out);
    expect(firstDifference(got.recs, readRecords(r.diskFile).recs)).toBe(-1);
  });

  it('broker down: packets are spooled on disk, replayed in order when it comes up, then live; the spool empties', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const d = dir('meshcap-bc-');
    const spool = path.join(d, 'spool');
    const r = rig({
      dir: d,
      diskFormat: 'pcap',
      brokers: [`tls://127.0.0.1:${port}`],
      cert: P.sidecarA.cert,
      key: P.sidecarA.key,
      ca: P.ca.cert,
      broker: { spoolDir: spool, spoolMaxBytes: 256 << 20, queueBytes: 1 << 20 },
    });
    const t = new Traffic(8, 20, 96 * 1024, 81);
    await r.feed(t, 0, 12, 5);
    const s = lane(r).spool!;
    await waitFor('spool written', () => s.pendingBytes === 0 && s.bytes > 2 << 20);
    const segs = fs.readdirSync(path.join(spool, 'failover')).filter((n) => n.endsWith('.spool'));
    expect(segs.length).toBeGreaterThan(0);
    expect(lane(r).memBytes).toBeLessThanOrEqual(1 << 20);
    const c = await collector(port, out);
    await r.feed(t, 12, 20, 20); // live traffic continues while the spool drains
    await waitFor('everything acknowledged', () => lane(r).ackedSeq === lane(r).nextSeq && lane(r).nextSeq === r.stats.packets, 20_000);
    await waitFor('spool emptied', () => fs.readdirSync(path.join(spool, 'failover')).filter((n) => n.endsWith('.spool')).length === 0);
    expect(s.bytes).toBe(0);
    await r.close();
    await c.close();
    expect(firstDifference(collected(out).recs, readRecords(r.diskFile).recs)).toBe(-1);
    expect(r.stats.totalDrops()).toBe(0);
  });

  it('spool full: the newest packets are dropped, counted, logged, and marked in-band (pcapng drop count)', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const d = dir('meshcap-bc-');
    const r = rig({
      dir: d,
      diskFormat: 'pcapng',
      brokers: [`tls://127.0.0.1:${port}`],
      cert: P.sidecarA.cert,
      key: P.sidecarA.key,
      ca: P.ca.cert,
      broker: { format: 'pcapng', spoolDir: path.join(d, 'spool'), spoolMaxBytes: 1 << 20, queueBytes: 1 << 20 },
    });
    const t = new Traffic(8, 12, 96 * 1024, 91);
    await r.feed(t, 0, 10, 5);
    const dropped = r.stats.dropsOf('broker_spool_full');
    expect(dropped).toBeGreaterThan(0);
    expect(lane(r).droppedPackets).toBe(dropped);
    expect(r.log.reasons(/^broker_spool_full$/).length).toBeGreaterThanOrEqual(1);
    const c = await collector(port, out);
    await waitFor('backlog delivered', () => lane(r).ackedSeq === lane(r).nextSeq, 15_000);
    await r.feed(t, 10, 12, 5); // the next packet that gets through carries the drop count
    await waitFor('everything acknowledged', () => lane(r).ackedSeq === lane(r).nextSeq);
    await r.close();
    await c.close();
    const got = collected(out);
    const file = got.files[0]!;
    const marked = await tsharkFields(file, ['frame.number', 'frame.drop_count', 'frame.comment'], { filter: 'frame.drop_count > 0' });
    expect(marked.length).toBeGreaterThanOrEqual(1);
    // Every packet after a run of drops says how many went missing just before it.
    const dropBefore = new Map(marked.map((m) => [Number(m[0]) - 1, Number(m[1])]));
    expect([...dropBefore.values()].reduce((a, b) => a + b, 0)).toBe(dropped);
    for (const m of marked) expect(m[2]).toMatch(new RegExp(`${m[1]} packets? dropped before this one by the broker sink`));
    // Everything else is the disk capture minus exactly the dropped packets (same frames).
    const disk = readRecords(r.diskFile).recs.map((x) => frameOf(x, 'pcapng'));
    const frames = got.recs.map((x) => frameOf(x, 'pcapng'));
    expect(frames.length).toBe(disk.length - dropped);
    let di = 0;
    for (let i = 0; i < frames.length; i++, di++) {
      di += dropBefore.get(i) ?? 0;
      if (!frames[i]!.equals(disk[di]!)) throw new Error(`collected packet ${i} is not disk packet ${di}`);
    }
    expect(di).toBe(disk.length);
  });

  it('a sidecar restarted with its spool continues the same stream exactly once', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const d1 = dir('meshcap-bc-');
    const spool = path.join(d1, 'spool');
    const common = { brokers: [`tls://127.0.0.1:${port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, diskFormat: 'pcap' as const };
    // Run 1: the collector is down the whole time; on shutdown the queue goes to the spool.
    const r1 = rig({ ...common, dir: d1, broker: { spoolDir: spool, spoolMaxBytes: 64 << 20, closeTimeoutMs: 200 } });
    const t1 = new Traffic(3, 6, 32 * 1024, 101);
    await r1.feed(t1, 0, 6, 5);
    await r1.close();
    const stream = lane(r1).streamId;
    expect(fs.readdirSync(path.join(spool, 'failover')).some((n) => n.endsWith('.spool'))).toBe(true);
    // Run 2: same spool, collector up: the spooled packets go first, then the new ones.
    const c = await collector(port, out);
    const d2 = dir('meshcap-bc-');
    const r2 = rig({ ...common, dir: d2, broker: { spoolDir: spool, spoolMaxBytes: 64 << 20 } });
    expect(lane(r2).streamId).toBe(stream);
    const t2 = new Traffic(3, 6, 32 * 1024, 102, 100);
    await r2.feed(t2, 0, 6, 5);
    await waitFor('everything acknowledged', () => lane(r2).ackedSeq === lane(r2).nextSeq);
    await r2.close();
    await c.close();
    const got = collected(out);
    expect(got.files).toHaveLength(1); // one stream, one file: it simply continued
    expect(firstDifference(got.recs, [...readRecords(r1.diskFile).recs, ...readRecords(r2.diskFile).recs])).toBe(-1);
  });

  it('spread mode keeps each flow on one collector; failover uses the next broker and fails back', async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    const [o1, o2] = [dir('meshcap-collect-'), dir('meshcap-collect-')];
    const [c1, c2] = [await collector(p1, o1), await collector(p2, o2)];
    const r = rig({ dir: dir('meshcap-bc-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${p1}`, `tls://127.0.0.1:${p2}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { mode: 'spread' } });
    const t = new Traffic(16, 4, 8 * 1024, 111);
    await r.feed(t, 0, t.rounds.length, 10);
    await waitFor('delivered', () => r.broker.lanes.every((l) => l.ackedSeq === l.nextSeq) && r.broker.lanes.reduce((n, l) => n + l.nextSeq, 0) === r.stats.packets);
    await r.close();
    await c1.close();
    await c2.close();
    const a = collected(o1).recs;
    const b = collected(o2).recs;
    expect(a.length).toBeGreaterThan(0);
    expect(b.length).toBeGreaterThan(0);
    const flowOf = (rec: Buffer) => frameOf(rec, 'pcap').subarray(26, 34).toString('hex') + frameOf(rec, 'pcap').subarray(34, 38).toString('hex');
    const key = (rec: Buffer) => [flowOf(rec), flowOf(rec).slice(8, 16) + flowOf(rec).slice(0, 8)].sort().join();
    const fa = new Set(a.map(key));
    expect(b.some((x) => fa.has(key(x)))).toBe(false); // no flow split across brokers
    const disk = readRecords(r.diskFile).recs;
    expect(a.length + b.length).toBe(disk.length);
    const both = new Set([...a, ...b].map((x) => x.toString('hex')));
    expect(disk.every((x) => both.has(x.toString('hex')))).toBe(true);

    // Failover: the first broker is down, the second takes the stream; when the first is back
    // (and the fail-back delay passed) the sidecar returns to it after a graceful handover.
    const [q1, q2] = [await freePort(), await freePort()];
    const [u1, u2] = [dir('meshcap-collect-'), dir('meshcap-collect-')];
    const second = await collector(q2, u2);
    const f = rig({ dir: dir('meshcap-bc-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${q1}`, `tls://127.0.0.1:${q2}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { failbackMs: 600 } });
    const tf = new Traffic(4, 12, 16 * 1024, 112);
    await f.feed(tf, 0, 4, 20);
    await waitFor('on the second broker', () => second.counters.packets > 0);
    const first = await collector(q1, u1);
    await f.feed(tf, 4, 12, 100);
    await waitFor('back on the first broker', () => first.counters.packets > 0 && lane(f).ackedSeq === lane(f).nextSeq && lane(f).nextSeq === f.stats.packets, 10_000);
    await f.close();
    await first.close();
    await second.close();
    const s1 = collected(u2).recs;
    const s2 = collected(u1).recs;
    // Handed over gracefully: together they hold the capture once, in order.
    expect(firstDifference([...s1, ...s2], readRecords(f.diskFile).recs)).toBe(-1);
  });
});

describe('meshcap collect, protocol level', () => {
  /** A hand-driven meshcap-capture/1 client. */
  async function client(port: number): Promise<{ sock: import('node:tls').TLSSocket; frames: Array<{ type: number; body: Buffer }>; next(): Promise<{ type: number; body: Buffer }> }> {
    const tls = await import('node:tls');
    const { FrameReader } = await import('../../src/sink/broker-sink.js');
    const sock = tls.connect({ host: '127.0.0.1', port, cert: fs.readFileSync(P.sidecarA.cert), key: fs.readFileSync(P.sidecarA.key), ca: fs.readFileSync(P.ca.cert), ALPNProtocols: ['meshcap-capture/1'], checkServerIdentity: () => undefined });
    await new Promise<void>((res, rej) => (sock.once('secureConnect', () => res()), sock.once('error', rej)));
    expect(sock.alpnProtocol).toBe('meshcap-capture/1');
    const reader = new FrameReader();
    const frames: Array<{ type: number; body: Buffer }> = [];
    sock.on('data', (d: Buffer) => {
      reader.push(d);
      for (let f = reader.next(); f; f = reader.next()) frames.push(f);
    });
    let seen = 0;
    return {
      sock,
      frames,
      async next() {
        await waitFor('a frame', () => frames.length > seen || sock.destroyed, 5000);
        if (frames.length <= seen) throw new Error('closed');
        return frames[seen++]!;
      },
    };
  }
  const pcapRecords = (first: number, n: number): Buffer =>
    Buffer.concat(
      Array.from({ length: n }, (_, i) => {
        const r = Buffer.alloc(16 + 60, first + i);
        r.writeUInt32LE(1_750_000_000 + first + i, 0);
        r.writeUInt32LE(0, 4);
        r.writeUInt32LE(60, 8);
        r.writeUInt32LE(60, 12);
        return r;
      }),
    );

  it('writes each record once when a sidecar resends overlapping batches, reports gaps, resumes a stream, rejects malformed batches', async () => {
    const { encodeFrame, dataFrameHead, readU64 } = await import('../../src/sink/broker-sink.js');
    const { pcapFramer } = await import('../../src/format/pcap.js');
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const c = await collector(port, out);
    const stream = 'ab'.repeat(16);
    const hello = { v: 1, stream, instance: 'pod-1', format: 'pcap', header: pcapFramer.fileHeader({ snaplen: 262144 }).toString('base64'), first: 0, next: 0 };
    const data = (first: number, n: number) => {
      const recs = pcapRecords(first, n);
      return Buffer.concat([dataFrameHead(first, n, recs.length), recs]);
    };
    const a = await client(port);
    a.sock.write(encodeFrame(1, hello));
    expect(JSON.parse((await a.next()).body.toString())).toEqual({ next: null });
    a.sock.write(data(0, 10));
    expect(readU64((await a.next()).body, 0)).toBe(10);
    a.sock.write(data(5, 10)); // 5..9 again, then 10..14
    expect(readU64((await a.next()).body, 0)).toBe(15);
    a.sock.write(data(20, 5)); // 15..19 never sent: a gap
    expect(readU64((await a.next()).body, 0)).toBe(25);
    expect(c.counters.duplicates).toBe(5);
    expect(c.counters.gaps).toBe(5);
    // The same stream from a new connection resumes where it was.
    a.sock.destroy();
    const b = await client(port);
    b.sock.write(encodeFrame(1, hello));
    expect(JSON.parse((await b.next()).body.toString())).toEqual({ next: 25 });
    const bad = data(25, 3);
    bad.writeUInt32BE(4, 13); // says 4 records, holds 3
    b.sock.write(bad);
    const err = await b.next();
    expect(err.type).toBe(5);
    expect(JSON.parse(err.body.toString()).message).toMatch(/says 4 records, holds 3/);
    expect(c.counters.protocolErrors).toBe(1);
    await c.close();
    const got = collected(out);
    expect(got.recs).toHaveLength(20);
    expect(got.recs.map((r) => r.readUInt32LE(0) - 1_750_000_000)).toEqual([...Array(15).keys(), 20, 21, 22, 23, 24]);
  });

  it('after a crash, cuts an open file back to what was acknowledged and completes it; removes a header-only stray', async () => {
    const port = await freePort();
    const out = dir('meshcap-collect-');
    const side = path.join(out, 'test.example+ns+capture+sa+sidecar-a');
    fs.mkdirSync(path.join(side, '.meshcap-collect'), { recursive: true });
    const { pcapFramer } = await import('../../src/format/pcap.js');
    const header = pcapFramer.fileHeader({ snaplen: 262144 });
    const acked = Buffer.concat([header, pcapRecords(0, 3)]);
    const part = path.join(side, 'pod-1_cdcdcdcdcdcd_00001_20260101000000.pcap.part');
    fs.writeFileSync(part, Buffer.concat([acked, pcapRecords(3, 2).subarray(0, 100)])); // unacknowledged tail, cut mid-record
    const stray = path.join(side, 'pod-1_cdcdcdcdcdcd_00002_20260101000001.pcap.part');
    fs.writeFileSync(stray, header);
    fs.writeFileSync(
      path.join(side, '.meshcap-collect', `${'cd'.repeat(16)}.json`),
      JSON.stringify({ v: 1, stream: 'cd'.repeat(16), spiffe: SIDECAR_A_SPIFFE, instance: 'pod-1', format: 'pcap', header: header.toString('base64'), next: 3, fileSeq: 1, part: path.basename(part), size: acked.length, completed: [] }),
    );
    const c = await collector(port, out);
    expect(fs.existsSync(part)).toBe(false);
    expect(fs.existsSync(stray)).toBe(false);
    const final = part.replace(/\.part$/, '');
    expect(fs.readFileSync(final).equals(acked)).toBe(true);
    await c.close();
  });
});
