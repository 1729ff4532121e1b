/**
 * The broker sink against a real plain TLS broker: Debian socat (`OPENSSL-LISTEN … verify=1`)
 * writing every connection to a file, read back by tshark and by an independent record splitter.
 *
 *  - the stream equals the capture written to disk (classic pcap µs, Ethernet, fresh header per
 *    connection; pcapng on request; TLS 1.2 brokers too);
 *  - refusals: a client certificate from another CA, an expired one, a broker with the wrong
 *    SPIFFE ID or host name, a TLS 1.1 broker → refused, logged, counted, nothing delivered; a plain TCP listener
 *    sees a TLS ClientHello and nothing decodable as a capture; fixing the certificate on disk
 *    lets everything through, nothing lost;
 *  - the broker killed (SIGKILL, whole process group) and restarted mid-stream several times:
 *    every packet arrives, duplicates bounded by the replay window (at least once).
 */
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { defaultReplayWindow, parseBrokerUrl } from '../../src/sink/broker-sink.js';
import { TestPki, brokerPki, BROKER_SPIFFE, type BrokerPki } from '../helpers/pki.js';
import { followTcpRaw, tsharkFields } from '../helpers/tshark.js';
import {
  firstDifference,
  freePort,
  frameOf,
  makeRig,
  mergeResent,
  readRecords,
  sleep,
  SocatBroker,
  tempDir,
  Traffic,
  waitFor,
  writeCapture,
  type Rig,
} from './broker-harness.js';

let P: BrokerPki;
const cleanup: Array<() => Promise<void> | void> = [];
const dirs: string[] = [];

beforeAll(async () => {
  P = await brokerPki();
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

async function socat(cert = P.broker, extra = ''): Promise<SocatBroker> {
  const port = await freePort();
  const b = new SocatBroker(port, path.join(dir('meshcap-socat-'), 'out'), cert.cert, cert.key, P.ca.cert, extra);
  await b.start();
  cleanup.push(() => b.kill());
  return b;
}

function rig(o: Parameters<typeof makeRig>[0]): Rig {
  const r = makeRig(o);
  cleanup.push(() => r.close());
  return r;
}

function connectFailures(r: Rig): Map<string, number> {
  const out = new Map<string, number>();
  for (const l of r.broker.lanes) for (const c of l.endpointCounters.values()) for (const [k, v] of c.failures) out.set(k, (out.get(k) ?? 0) + v);
  return out;
}

describe('broker sink → socat (plain TLS broker)', () => {
  it('streams classic pcap (µs, Ethernet) byte-identical to the capture on disk; pcapng on request', async () => {
    const b = await socat();
    const d = dir('meshcap-bs-');
    const r = rig({ dir: d, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${b.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    const t = new Traffic(6, 6, 32 * 1024, 11);
    await waitFor('connected', () => r.broker.lanes[0]!.connected);
    await r.feed(t, 0, t.rounds.length, 10);
    await r.close(); // graceful: close_notify, socat closes, delivery confirmed
    await b.kill('SIGTERM');
    const files = b.files();
    expect(files).toHaveLength(1);
    const disk = fs.readFileSync(r.diskFile);
    const got = fs.readFileSync(files[0]!);
    expect(got.readUInt32LE(0)).toBe(0xa1b2c3d4); // µs magic
    expect(got.readUInt32LE(20)).toBe(1); // LINKTYPE_ETHERNET
    expect(got.length).toBe(disk.length);
    expect(got.equals(disk)).toBe(true);
    // What Wireshark makes of it: the same frames, the same conversations.
    const [a, bb] = await Promise.all([tsharkFields(files[0]!, ['frame.len', 'tcp.stream', 'tcp.seq']), tsharkFields(r.diskFile, ['frame.len', 'tcp.stream', 'tcp.seq'])]);
    expect(a.length).toBe(r.stats.packets);
    expect(a).toEqual(bb);
    expect(r.broker.lanes[0]!.resentPackets).toBe(0);
    expect(r.broker.lanes[0]!.nextSeq - r.broker.lanes[0]!.ackedSeq).toBe(0); // all confirmed by the graceful close

    // pcapng from pcap blocks (re-framed): frames and timestamps kept, directions added.
    const b2 = await socat();
    const d2 = dir('meshcap-bs-');
    const r2 = rig({ dir: d2, diskFormat: 'pcapng', brokers: [`tls://localhost:${b2.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { format: 'pcapng' } });
    await r2.feed(new Traffic(3, 3, 16 * 1024, 12), 0, 3, 10);
    await r2.close();
    await b2.kill('SIGTERM');
    const ng = readRecords(b2.files()[0]!);
    const ngDisk = readRecords(r2.diskFile);
    expect(ng.format).toBe('pcapng');
    expect(ng.recs.length).toBe(ngDisk.recs.length);
    expect(firstDifference(ng.recs, ngDisk.recs)).toBe(-1);
    const dirs2 = await tsharkFields(b2.files()[0]!, ['frame.packet_flags_direction', 'frame.comment'], {});
    expect(new Set(dirs2.map((x) => x[0]))).toEqual(new Set(['0x00000001', '0x00000002']));
    expect(dirs2[0]![1]).toMatch(/node-broker-test/); // the flow's first-packet comment travels too

    // A TLS 1.2 broker is fine (1.3 is preferred, 1.2 the minimum).
    const b3 = await socat(P.broker, 'openssl-max-proto-version=TLS1.2');
    const r3 = rig({ dir: dir('meshcap-bs-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${b3.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    await r3.feed(new Traffic(2, 2, 8192, 13), 0, 2);
    await r3.close();
    await b3.kill('SIGTERM');
    expect(r3.log.lines.find((l) => l.msg === 'connected to broker')!.protocol).toBe('TLSv1.2');
    expect(fs.readFileSync(b3.files()[0]!).equals(fs.readFileSync(r3.diskFile))).toBe(true);
  });

  it('refuses a foreign-CA or expired client certificate and impostor brokers; nothing leaks; a fixed certificate on disk lets everything through', async () => {
    const b = await socat();
    const d = dir('meshcap-bs-');
    // The sidecar's certificate files, replaced on disk later.
    const cert = path.join(d, 'tls.crt');
    const key = path.join(d, 'tls.key');
    const ca = path.join(d, 'ca.crt');
    TestPki.install(P.foreign, cert, key);
    fs.copyFileSync(P.ca.cert, ca);
    const r = rig({ dir: d, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${b.port}`], cert, key, ca });
    const t = new Traffic(4, 8, 16 * 1024, 21);
    await r.feed(t, 0, 3, 10);
    await waitFor('refusals', () => (connectFailures(r).get('rejected_by_broker') ?? 0) >= 2);
    expect(r.log.reasons(/^rejected_by_broker$/).length).toBeGreaterThanOrEqual(2);
    expect(String(r.log.reasons(/^rejected_by_broker$/)[0]!.err)).toMatch(/unknown ca/i);

    // An expired certificate (right CA): refused as well.
    TestPki.install(P.expired, cert, key);
    await waitFor('reload', () => r.tls.current.info.serial === new X509Certificate(fs.readFileSync(P.expired.cert)).serialNumber);
    const before = connectFailures(r).get('rejected_by_broker') ?? 0;
    await waitFor('expired refused', () => r.log.lines.some((l) => /certificate expired/i.test(String(l.err))) && (connectFailures(r).get('rejected_by_broker') ?? 0) > before);
    expect(r.log.reasons(/^tls_cert_expired$/).length).toBeGreaterThanOrEqual(1); // we warned when loading it

    // Nothing reached the broker: no connection got past its certificate check.
    expect(b.files().filter((f) => fs.statSync(f).size > 0)).toEqual([]);
    expect(r.stats.dropsOf('broker_spool_full')).toBe(0);

    // The renewed certificate lands on disk: the next connection uses it, and everything queued arrives.
    TestPki.install(P.sidecarA, cert, key);
    await r.feed(t, 3, 8, 10);
    await waitFor('connected', () => r.broker.lanes[0]!.connected, 10_000);
    await r.close();
    await b.kill('SIGTERM');
    const got = b.files().filter((f) => fs.statSync(f).size > 0);
    expect(got).toHaveLength(1);
    const recs = readRecords(got[0]!);
    const disk = readRecords(r.diskFile);
    expect(recs.recs.length).toBe(disk.recs.length);
    expect(firstDifference(recs.recs, disk.recs)).toBe(-1);
    expect(fs.readFileSync(got[0]!).equals(fs.readFileSync(r.diskFile))).toBe(true);
  });

  it('refuses a broker with the wrong SPIFFE ID or host name, and never speaks plaintext', async () => {
    const d = dir('meshcap-bs-');
    // 1. Pinned SPIFFE ID, broker presents another one (valid chain, right IP SAN).
    const impostor = await socat(P.impostorBroker);
    const r1 = rig({ dir: d, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${impostor.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { brokerSpiffeId: BROKER_SPIFFE } });
    await r1.feed(new Traffic(2, 2, 8192, 31), 0, 2);
    await waitFor('identity refused', () => (connectFailures(r1).get('broker_identity_mismatch') ?? 0) >= 2);
    expect(String(r1.log.reasons(/^broker_identity_mismatch$/)[0]!.err)).toMatch(/spiffe:\/\/test\.example\/not-the-broker.*expected spiffe:\/\/test\.example\/broker/);
    expect(impostor.files().filter((f) => fs.statSync(f).size > 0)).toEqual([]);

    // 2. DNS/IP SAN check (no pin): the broker's certificate names another host.
    const elsewhere = await socat(P.wrongHost);
    const d2 = dir('meshcap-bs-');
    const r2 = rig({ dir: d2, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${elsewhere.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    await r2.feed(new Traffic(2, 2, 8192, 32), 0, 2);
    await waitFor('host refused', () => (connectFailures(r2).get('broker_identity_mismatch') ?? 0) >= 1);
    expect(String(r2.log.reasons(/^broker_identity_mismatch$/)[0]!.err)).toMatch(/IP: 127\.0\.0\.1 is not in the cert's list/);
    // ...while the same certificate passes with the SPIFFE pin (the pin replaces the host check).
    const d3 = dir('meshcap-bs-');
    const r3 = rig({ dir: d3, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${elsewhere.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { brokerSpiffeId: 'spiffe://test.example/*' } });
    await waitFor('pinned connect', () => r3.broker.lanes[0]!.connected);

    // 3. A broker stuck at TLS 1.1: below the minimum, refused.
    const old = await socat(P.broker, 'openssl-max-proto-version=TLS1.1');
    const r5 = rig({ dir: dir('meshcap-bs-'), diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${old.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert });
    await r5.feed(new Traffic(1, 1, 4096, 34), 0, 1);
    await waitFor('old TLS refused', () => [...connectFailures(r5).keys()].some((k) => k === 'tls_error' || k === 'rejected_by_broker'));
    expect(old.files().filter((f) => fs.statSync(f).size > 0)).toEqual([]);

    // 4. A plain TCP listener in place of the broker: all it ever gets is a TLS ClientHello.
    const received: Buffer[] = [];
    const plain = net.createServer((s) => s.on('data', (x) => received.push(x)));
    await new Promise<void>((res) => plain.listen(0, '127.0.0.1', () => res()));
    cleanup.push(() => new Promise<void>((res) => plain.close(() => res())));
    const d4 = dir('meshcap-bs-');
    const r4 = rig({ dir: d4, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${(plain.address() as net.AddressInfo).port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { connectTimeoutMs: 300 } });
    await r4.feed(new Traffic(2, 3, 8192, 33), 0, 3);
    await waitFor('timeouts', () => (connectFailures(r4).get('timeout') ?? 0) >= 2);
    await r4.close();
    const bytes = Buffer.concat(received);
    expect(bytes.length).toBeGreaterThan(0);
    // Only TLS handshake records (content type 22), each a ClientHello (handshake type 1).
    for (let off = 0; off < bytes.length; ) {
      expect(bytes[off]).toBe(0x16);
      expect(bytes[off + 5]).toBe(0x01);
      off += 5 + bytes.readUInt16BE(off + 3);
    }
    for (const magic of [Buffer.from('d4c3b2a1', 'hex'), Buffer.from('0a0d0d0a', 'hex')]) expect(bytes.includes(magic)).toBe(false);
    // No payload byte sequence of the capture appears in the clear either.
    const frames = readRecords(r4.diskFile).recs.map((x) => frameOf(x, 'pcap')).filter((f) => f.length > 100);
    expect(frames.length).toBeGreaterThan(0);
    for (const f of frames) expect(bytes.includes(f.subarray(54, 54 + 32))).toBe(false);
    // And there is no way to ask for plaintext.
    expect(() => parseBrokerUrl('tcp://127.0.0.1:57012')).toThrow(/only tls:\/\//);
  });

  it('broker killed and restarted mid-stream: every packet arrives, duplicates bounded by the replay window', async () => {
    const b = await socat();
    const d = dir('meshcap-bs-');
    // The default window: what the kernels' socket buffers can hold undelivered at a break. A smaller
    // one can lose bytes when the broker reads slowly (a loaded machine), which is the point of it.
    const window = defaultReplayWindow();
    const r = rig({ dir: d, diskFormat: 'pcap', brokers: [`tls://127.0.0.1:${b.port}`], cert: P.sidecarA.cert, key: P.sidecarA.key, ca: P.ca.cert, broker: { replayWindowBytes: window } });
    const t = new Traffic(8, 30, 48 * 1024, 41);
    await waitFor('connected', () => r.broker.lanes[0]!.connected);
    const kills = [6, 13, 20];
    await r.feed(t, 0, t.rounds.length, 40, async (round) => {
      const k = kills.indexOf(round);
      if (k < 0) return;
      // Each kill must break a live connection: on a loaded machine the reconnect backoff can
      // outlast the rounds between two kills, and killing an idle broker proves nothing.
      await waitFor(`connection ${k + 1} accepted`, () => r.broker.lanes[0]!.connected && b.files().length >= k + 1);
      await b.kill('SIGKILL');
      await sleep(150); // the broker stays down a moment: packets queue up
      await b.start();
    });
    await r.close();
    await b.kill('SIGTERM');
    const files = b.files();
    expect(files.length).toBeGreaterThanOrEqual(4);
    const parts = files.map((f) => readRecords(f));
    for (const p of parts) expect(p.header.equals(parts[0]!.header)).toBe(true); // fresh header per connection
    const { merged, duplicates, duplicateBytes, maxOverlap } = mergeResent(parts.map((p) => p.recs));
    const disk = readRecords(r.diskFile).recs;
    expect(firstDifference(merged, disk)).toBe(-1);
    expect(merged.length).toBe(r.stats.packets);
    // At least once: whatever was resent lies within the replay window of each break.
    const lane = r.broker.lanes[0]!;
    expect(lane.resentPackets).toBeGreaterThanOrEqual(duplicates);
    // (the window is kept at batch granularity: at most one pipeline block more)
    expect(duplicateBytes).toBeLessThanOrEqual(3 * (window + 256 * 1024));
    expect(maxOverlap).toBeLessThan(disk.length);
    // Per direction, the merged stream carries exactly the payload written to disk (tshark follow).
    const mergedFile = path.join(d, 'merged.pcap');
    writeCapture(mergedFile, parts[0]!.header, merged);
    const [fa, fb] = await Promise.all([followTcpRaw(mergedFile), followTcpRaw(r.diskFile)]);
    expect(fa.length).toBe(8);
    expect(fa.map((s) => [s.aToB.toString('hex'), s.bToA.toString('hex')])).toEqual(fb.map((s) => [s.aToB.toString('hex'), s.bToA.toString('hex')]));
    expect(r.stats.totalDrops()).toBe(0);
  });
});
