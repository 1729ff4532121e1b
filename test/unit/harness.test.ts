/**
 * Self-check of the real-traffic harness (test/helpers): record real loopback traffic with
 * tcpdump, recast it into the tap stream a server-side Envoy would send, and prove the recast
 * events carry exactly the bytes Wireshark's "Follow TCP stream (raw)" reports for the original
 * capture. Skipped when tcpdump/tshark cannot capture (not root).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeRequest, encodeRequests, rawGrpcFrames } from '../helpers/envoy-grpc-client.js';
import { LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2, parseCapture, readCaptureFile, readTcpPackets } from '../helpers/pcap-read.js';
import { bytesFromMessages, eventBytes, recastPackets, recastPcap, splitStreams, type RecastConnection } from '../helpers/recast.js';
import { canCapture, captureTcp, recordScenario, type Recording, type ScenarioName } from '../helpers/record-traffic.js';
import { followTcpRaw, tsharkFields, type FollowedStream } from '../helpers/tshark.js';

const CAN_CAPTURE = canCapture();
const BASE_PORT = 27100;
const SCENARIOS: ScenarioName[] = ['http1-large', 'h2c', 'grpc', 'ipv6', 'many'];

const key = (e: { addr: string; port: number }) => `${e.addr}|${e.port}`;

/** Orients a followed stream as client→server / server→client using the recast endpoints. */
function orient(f: FollowedStream, c: RecastConnection): { c2s: Buffer; s2c: Buffer } {
  if (key(f.a) === key(c.client) && key(f.b) === key(c.server)) return { c2s: f.aToB, s2c: f.bToA };
  if (key(f.b) === key(c.client) && key(f.a) === key(c.server)) return { c2s: f.bToA, s2c: f.aToB };
  throw new Error(`stream ${f.index} endpoints ${key(f.a)} ${key(f.b)} do not match ${key(c.client)} ${key(c.server)}`);
}

describe.skipIf(!CAN_CAPTURE)('real-traffic harness (tcpdump → recast ≡ tshark follow)', () => {
  let dir = '';
  const recordings = new Map<ScenarioName, Recording>();

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-harness-'));
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  for (const [i, name] of SCENARIOS.entries()) {
    it(`${name}: recast events reassemble to exactly tshark's follow,tcp,raw bytes`, async () => {
      const rec = await recordScenario(name, dir, BASE_PORT, 1000 + i);
      recordings.set(name, rec);
      expect(rec.tcpdump.droppedByKernel, rec.tcpdump.stderr).toBe(0);
      expect(rec.tcpdump.captured).toBeGreaterThan(0);

      const seed = 7 + i;
      const recast = recastPcap(rec.pcap, { seed, serverPorts: rec.serverPorts, node: { id: `harness-${name}` } });
      const follow = await followTcpRaw(rec.pcap);

      // Same conversations, every one with a handshake and a complete teardown.
      expect(recast.connections.length).toBe(rec.connections);
      expect(follow.length).toBe(recast.connections.length);
      for (const c of recast.connections) {
        expect(c.synSeen).toBe(true);
        expect(c.complete).toBe(true);
        expect(c.gapBytes).toEqual({ clientToServer: 0, serverToClient: 0 });
        expect(rec.serverPorts).toContain(c.server.port);
        expect(c.server.addr).toBe(rec.serverAddr);
      }
      const byEndpoints = new Map(recast.connections.map((c) => [[key(c.client), key(c.server)].sort().join('#'), c]));
      const fromMessages = bytesFromMessages(recast.messages);
      let totalBytes = 0;
      for (const f of follow) {
        const c = byEndpoints.get([key(f.a), key(f.b)].sort().join('#'));
        expect(c, `tshark stream ${f.index} ${key(f.a)} ↔ ${key(f.b)} not in recast`).toBeDefined();
        const { c2s, s2c } = orient(f, c!);
        expect(c2s.length + s2c.length).toBeGreaterThan(0);
        // Reassembly from TCP seq == Wireshark's follow.
        expect(c!.clientToServer.equals(c2s), `${name} stream ${f.index} client→server`).toBe(true);
        expect(c!.serverToClient.equals(s2c), `${name} stream ${f.index} server→client`).toBe(true);
        // The events (and the request objects built from them) carry the same bytes.
        const ev = eventBytes(c!);
        expect(ev.read.equals(c2s)).toBe(true);
        expect(ev.write.equals(s2c)).toBe(true);
        const m = fromMessages.get(c!.traceId)!;
        expect(m.read.equals(c2s)).toBe(true);
        expect(m.write.equals(s2c)).toBe(true);
        expect(m.connection).toEqual({
          local_address: { socket_address: { address: c!.server.addr, port_value: c!.server.port } },
          remote_address: { socket_address: { address: c!.client.addr, port_value: c!.client.port } },
        });
        totalBytes += c2s.length + s2c.length;
      }
      expect(totalBytes).toBeGreaterThan(1000);

      // Envoy 1.37 seq_num semantics and event shape.
      const sizes: number[] = [];
      for (const c of recast.connections) {
        let next = 1;
        let prevTs = 0n;
        const last = c.events[c.events.length - 1]!;
        expect(last.kind).toBe('closed');
        for (const e of c.events) {
          expect(e.tsNs >= prevTs).toBe(true);
          prevTs = e.tsNs;
          if (e.kind === 'closed') {
            expect(e.seqNum).toBe(next + 1);
          } else {
            expect(e.seqNum).toBe(next);
            next += e.data.length;
            expect(e.data.length).toBeLessThanOrEqual(65536);
            if (e.data.length > 0) sizes.push(e.data.length);
          }
        }
        expect(next - 1).toBe(c.clientToServer.length + c.serverToClient.length);
        const ends = c.events.filter((e) => e.kind === 'write' && e.endStream);
        expect(ends.length).toBe(c.serverFin ? 1 : 0);
        expect(c.events.filter((e) => e.kind === 'closed').length).toBe(1);
        expect(e2eTime(c)).toBe(true);
      }
      // Varied event sizes: not just segment boundaries.
      expect(Math.min(...sizes)).toBeLessThan(100);
      if (name !== 'many') expect(Math.max(...sizes)).toBeGreaterThan(8192);

      // Interleaving: the first message carries the identifier; each connection starts with a
      // `connection` segment before its events.
      expect(recast.messages[0]!.msg.identifier).toEqual({ node: { id: `harness-${name}`, cluster: 'meshcap-test' }, tap_id: 'meshcap-test-tap' });
      const seen = new Set<number>();
      for (const m of recast.messages) {
        const seg = m.msg.trace.socket_streamed_trace_segment;
        if (!seen.has(m.traceId)) {
          expect(seg.connection).toBeDefined();
          seen.add(m.traceId);
        }
      }

      // Encodes with meshcap's protos and decodes back to the same bytes.
      const encoded = encodeRequests(recast.messages.map((m) => m.msg));
      const decoded = encoded.map((b) => ({ msg: decodeRequest(b) as never }));
      const back = bytesFromMessages(decoded);
      for (const c of recast.connections) {
        expect(back.get(c.traceId)!.read.equals(c.clientToServer)).toBe(true);
        expect(back.get(c.traceId)!.write.equals(c.serverToClient)).toBe(true);
      }
      const frames = rawGrpcFrames(encoded.slice(0, 3));
      expect(frames.length).toBe(encoded.slice(0, 3).reduce((n, b) => n + b.length + 5, 0));
    }, 30_000);
  }

  it('many: concurrent connections interleave and split into streams with colliding trace ids', () => {
    const rec = recordings.get('many');
    if (!rec) return; // the recording test failed already
    const recast = recastPcap(rec.pcap, { seed: 3, serverPorts: rec.serverPorts });
    // Interleaved: some connection's events come after another connection started.
    const firstIdx = new Map<number, number>();
    const lastIdx = new Map<number, number>();
    recast.messages.forEach((m, i) => {
      if (!firstIdx.has(m.traceId)) firstIdx.set(m.traceId, i);
      lastIdx.set(m.traceId, i);
    });
    const overlapping = [...firstIdx.keys()].filter((t) => [...firstIdx.keys()].some((u) => u !== t && firstIdx.get(u)! > firstIdx.get(t)! && firstIdx.get(u)! < lastIdx.get(t)!));
    expect(overlapping.length).toBeGreaterThan(1);

    const streams = splitStreams(recast, [{ nodeId: 'envoy-a' }, { nodeId: 'envoy-b' }, { nodeId: 'envoy-c' }]);
    expect(streams.map((s) => s.connections.length).reduce((a, b) => a + b, 0)).toBe(recast.connections.length);
    for (const s of streams) {
      expect(s.messages[0]!.msg.identifier?.node.id).toBe(s.node.id);
      expect(s.messages.slice(1).every((m) => m.msg.identifier === undefined)).toBe(true);
      expect(s.connections.map((c) => c.traceId)).toEqual(s.connections.map((_, i) => i + 1));
      const b = bytesFromMessages(s.messages);
      for (const c of s.connections) {
        expect(b.get(c.traceId)!.read.equals(c.clientToServer)).toBe(true);
        expect(b.get(c.traceId)!.write.equals(c.serverToClient)).toBe(true);
      }
    }
    // Batched (SocketEvents) variant carries the same bytes.
    const batched = recastPcap(rec.pcap, { seed: 3, serverPorts: rec.serverPorts, batchMinBytes: 20_000 });
    const bb = bytesFromMessages(batched.messages);
    for (const c of batched.connections) expect(bb.get(c.traceId)!.write.equals(c.serverToClient)).toBe(true);
    expect(batched.messages.length).toBeLessThan(recast.messages.length);
    encodeRequests(batched.messages.map((m) => m.msg));
  });

  it('recast reassembly survives retransmissions, overlaps, reordering and keep-alive probes', () => {
    const rec = recordings.get('http1-large') ?? recordings.get('h2c');
    if (!rec) return;
    const pk = readTcpPackets(rec.pcap);
    const clean = recastPackets(pk, { seed: 1, serverPorts: rec.serverPorts });
    type P = (typeof pk)[number];
    const perturbed: P[] = [];
    let n = 0;
    for (const p of pk) {
      n++;
      if (p.payload.length > 40 && n % 5 === 0) {
        // Split into two overlapping segments.
        const half = p.payload.length >> 1;
        perturbed.push({ ...p, payload: p.payload.subarray(0, half + 20), fin: false });
        perturbed.push({ ...p, seq: (p.seq + half - 20) >>> 0, payload: p.payload.subarray(half - 20) });
      } else {
        perturbed.push(p);
      }
      if (p.payload.length > 0 && n % 7 === 0) {
        // Keep-alive probe (one old byte) and a later full retransmission.
        perturbed.push({ ...p, seq: (p.seq + p.payload.length - 1) >>> 0, payload: p.payload.subarray(-1), fin: false, syn: false });
        perturbed.splice(Math.max(0, perturbed.length - 3), 0, { ...p, fin: false, syn: false });
      }
    }
    // Reorder: swap some adjacent data segments of the same direction.
    for (let i = 10; i + 1 < perturbed.length; i += 11) {
      const a = perturbed[i]!;
      const b = perturbed[i + 1]!;
      if (a.payload.length && b.payload.length && a.srcPort === b.srcPort && !a.syn && !b.syn) [perturbed[i], perturbed[i + 1]] = [b, a];
    }
    const messy = recastPackets(perturbed, { seed: 1, serverPorts: rec.serverPorts });
    expect(messy.connections.length).toBe(clean.connections.length);
    clean.connections.forEach((c, i) => {
      const m = messy.connections[i]!;
      expect(m.clientToServer.equals(c.clientToServer)).toBe(true);
      expect(m.serverToClient.equals(c.serverToClient)).toBe(true);
      expect(eventBytes(m).read.equals(c.clientToServer)).toBe(true);
      expect(m.gapBytes).toEqual({ clientToServer: 0, serverToClient: 0 });
    });
    const dup = messy.connections.reduce((t, c) => t + c.duplicateBytes.clientToServer + c.duplicateBytes.serverToClient, 0);
    expect(dup).toBeGreaterThan(0);
    // A real gap is reported, not papered over.
    const dataIdx = pk.findIndex((p, i) => i > 5 && p.payload.length > 0);
    const holed = recastPackets(pk.filter((_, i) => i !== dataIdx), { serverPorts: rec.serverPorts });
    const gaps = holed.connections.reduce((t, c) => t + c.gapBytes.clientToServer + c.gapBytes.serverToClient, 0);
    expect(gaps).toBeGreaterThan(0);
  });

  it('pcap reader: classic µs/ns, big-endian, pcapng and Linux SLL2 agree with tshark', async () => {
    const rec = recordings.get('h2c');
    if (!rec) return;
    const ns = readCaptureFile(rec.pcap);
    expect(ns.format).toBe('pcap');
    expect(ns.tsPrecision).toBe('ns');
    expect(ns.linkType).toBe(LINKTYPE_ETHERNET);
    const tsharkRows = await tsharkFields(rec.pcap, ['frame.time_epoch', 'tcp.seq_raw', 'tcp.len', 'tcp.flags']);
    const pk = readTcpPackets(rec.pcap);
    expect(pk.length).toBe(tsharkRows.length);
    pk.forEach((p, i) => {
      const [t, seq, len, flags] = tsharkRows[i]!;
      expect(p.seq).toBe(Number(seq));
      expect(p.payload.length).toBe(Number(len));
      expect(p.flags).toBe(Number(flags));
      const [sec, frac = ''] = t!.split('.');
      expect(p.tsNs).toBe(BigInt(sec!) * 1_000_000_000n + BigInt(frac.padEnd(9, '0').slice(0, 9)));
    });

    const us = path.join(dir, 'h2c-us.pcap');
    const ng = path.join(dir, 'h2c.pcapng');
    execFileSync('editcap', ['-F', 'pcap', rec.pcap, us]);
    execFileSync('editcap', ['-F', 'pcapng', rec.pcap, ng]);
    const usCap = readCaptureFile(us);
    const ngCap = readCaptureFile(ng);
    expect(usCap.tsPrecision).toBe('us');
    expect(ngCap.format).toBe('pcapng');
    expect(ngCap.packets.length).toBe(ns.packets.length);
    ns.packets.forEach((p, i) => {
      expect(usCap.packets[i]!.tsNs).toBe((p.tsNs / 1000n) * 1000n);
      expect(ngCap.packets[i]!.tsNs).toBe(p.tsNs);
      expect(ngCap.packets[i]!.data.equals(p.data)).toBe(true);
    });

    // Big-endian classic pcap: swap the header and record headers by hand.
    const le = fs.readFileSync(rec.pcap);
    const be = Buffer.from(le);
    for (const o of [0, 8, 12, 16, 20]) be.writeUInt32BE(le.readUInt32LE(o), o);
    be.writeUInt16BE(le.readUInt16LE(4), 4);
    be.writeUInt16BE(le.readUInt16LE(6), 6);
    for (let off = 24; off < le.length; ) {
      const incl = le.readUInt32LE(off + 8);
      for (let k = 0; k < 16; k += 4) be.writeUInt32BE(le.readUInt32LE(off + k), off + k);
      off += 16 + incl;
    }
    const beCap = parseCapture(be);
    expect(beCap.bigEndian).toBe(true);
    expect(beCap.packets.map((p) => p.tsNs)).toEqual(ns.packets.map((p) => p.tsNs));

    // Linux SLL2 (tcpdump -i any) on a tiny HTTP exchange.
    const server = http.createServer((_req, res) => res.end('sll2'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as { port: number }).port;
    const sll2 = path.join(dir, 'any.pcap');
    try {
      await captureTcp(sll2, [port], async () => {
        await new Promise<void>((resolve, reject) => {
          http.get({ host: '127.0.0.1', port, agent: false }, (res) => res.resume().on('end', resolve)).on('error', reject);
        });
        await new Promise((r) => setTimeout(r, 100));
      }, { iface: 'any', settleMs: 200 });
    } finally {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
    const anyCap = readCaptureFile(sll2);
    expect(anyCap.linkType).toBe(LINKTYPE_LINUX_SLL2);
    const recast = recastPcap(sll2, { serverPorts: [port] });
    const follow = await followTcpRaw(sll2);
    expect(recast.connections.length).toBe(1);
    expect(follow.length).toBe(1);
    const o = orient(follow[0]!, recast.connections[0]!);
    expect(recast.connections[0]!.clientToServer.equals(o.c2s)).toBe(true);
    expect(recast.connections[0]!.serverToClient.equals(o.s2c)).toBe(true);
    expect(recast.connections[0]!.serverToClient.toString()).toContain('sll2');
  }, 20_000);
});

/** Event timestamps stay inside the connection's capture time span. */
function e2eTime(c: RecastConnection): boolean {
  return c.events.every((e) => e.tsNs >= c.firstTsNs && e.tsNs <= c.lastTsNs);
}
