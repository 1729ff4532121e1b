/**
 * The live endpoint, end to end over real TLS: a real Pipeline (FileSink + LiveServer) fed with
 * Envoy traces through the TraceDecoder, viewers connecting with the raw MESHCAP-LIVE/1 protocol
 * and with WebSocket. Authentication (tokens, client certificates) and its audit trail, per-viewer
 * filters, the mid-stream notice, slow viewers cut off without harming the capture to disk, and
 * the loopback-only PCAP-over-IP listener.
 */
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import client from 'prom-client';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { registerLiveMetrics } from '../../src/control/live-metrics.js';
import { JOINED_MID_STREAM, liveConfigProblem, LiveServer, type LiveConfig } from '../../src/sink/live-server.js';
import { silentLogger } from '../../src/control/logger.js';
import { parseCapture } from '../helpers/pcap-read.js';
import { tsharkFields } from '../helpers/tshark.js';
import {
  closedEv,
  connection,
  expectedHttp2Info,
  makePki,
  openConn,
  pcapngPackets,
  rawViewer,
  readEv,
  sleep,
  startLiveEnv,
  tmpDir,
  waitFor,
  writeEv,
  writeTokenFiles,
  wsViewer,
  GOOD_TOKEN,
  WRONG_TOKEN,
  type LiveEnv,
  type Pki,
} from './live-harness.js';

let pki: Pki;
let tokens: ReturnType<typeof writeTokenFiles>;
let root: string;
const envs: LiveEnv[] = [];

beforeAll(async () => {
  root = tmpDir('meshcap-live-');
  pki = await makePki();
  tokens = writeTokenFiles(root);
});

afterEach(async () => {
  for (const e of envs.splice(0)) await e.close();
});

afterAll(() => {
  if (process.env.MESHCAP_E2E_KEEP) return;
  fs.rmSync(root, { recursive: true, force: true });
  pki?.remove();
});

async function env(opts: Parameters<typeof startLiveEnv>[1] = {}, pipelineOpts: Parameters<typeof startLiveEnv>[2] = {}): Promise<LiveEnv> {
  const dir = fs.mkdtempSync(path.join(root, 'env-'));
  const e = await startLiveEnv(dir, { certFile: pki.serverCert, keyFile: pki.serverKey, tokenFile: tokens.serverTokens, ...opts }, pipelineOpts);
  envs.push(e);
  return e;
}

/** The file sink's packets (frame bytes), after the pipeline closed. */
function filePackets(e: LiveEnv): Buffer[] {
  return parseCapture(fs.readFileSync(e.out)).packets.map((p) => p.data);
}

const SHB = Buffer.from([0x0a, 0x0d, 0x0d, 0x0a]);

/** TCP ports (src, dst) of an Ethernet frame. */
function ports(frame: Buffer): [number, number] {
  const v6 = frame.readUInt16BE(12) === 0x86dd;
  const t = 14 + (v6 ? 40 : (frame[14]! & 0x0f) * 4);
  return [frame.readUInt16BE(t), frame.readUInt16BE(t + 2)];
}

describe('live endpoint: raw MESHCAP-LIVE/1 over TLS', () => {
  it('streams pcapng to a viewer with a token: the same packets as the capture file, and audits the session', async () => {
    const e = await env();
    const v = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, client: 'raw-test' });
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    e.feedFixture();
    await e.close(); // flushes; live viewers are ended with reason "shutdown"
    await v.closed;
    const got = v.data();
    expect(got.subarray(0, 4)).toEqual(SHB);
    const live = pcapngPackets(got).map((p) => p.data);
    const disk = filePackets(e);
    expect(disk.length).toBe(22);
    expect(live).toEqual(disk);
    // Dissects like Envoy's own conversion.
    const file = path.join(path.dirname(e.out), 'viewer.pcapng');
    fs.writeFileSync(file, got);
    const info = (await tsharkFields(file, ['_ws.col.Info'], { decodeAs: ['tcp.port==10000,http2'], filter: 'http2' })).map((r) => r[0]);
    expect(info).toEqual(expectedHttp2Info());

    const audit = e.audit();
    const start = audit.find((l) => l.event === 'live_session_start')!;
    const end = audit.find((l) => l.event === 'live_session_end')!;
    expect(start.viewer).toMatchObject({ protocol: 'tls', auth: 'token', client: 'raw-test', token_id: expect.stringMatching(/^sha256:[0-9a-f]{12}$/) });
    expect(JSON.stringify(audit)).not.toContain(GOOD_TOKEN);
    expect(end).toMatchObject({ session: start.session, reason: 'shutdown', packets: 22, bytes: got.length, filter: '' });
    expect(typeof end.duration_ms).toBe('number');
  });

  it('refuses a wrong token and a missing token: audited, counted, no packet sent', async () => {
    const e = await env();
    const wrong = rawViewer(e.port, { ca: pki.ca, token: WRONG_TOKEN });
    const none = rawViewer(e.port, { ca: pki.ca });
    await Promise.all([wrong.closed, none.closed]);
    e.feedFixture();
    await sleep(200);
    expect(wrong.data().toString()).toMatch(/^MESHCAP-LIVE\/1 403 bad_token token not accepted\n$/);
    expect(none.data().toString()).toMatch(/^MESHCAP-LIVE\/1 401 no_token a bearer token is required\n$/);
    expect(e.live.counters.refused.get('bad_token')).toBe(1);
    expect(e.live.counters.refused.get('no_token')).toBe(1);
    expect(e.live.viewerCount).toBe(0);
    const refused = e.audit().filter((l) => l.event === 'live_session_refused');
    expect(refused.map((l) => l.reason).sort()).toEqual(['bad_token', 'no_token']);
    expect(refused.find((l) => l.reason === 'bad_token')!.viewer).toMatchObject({ protocol: 'tls', auth: 'none', token_id: expect.stringMatching(/^sha256:/) });
    expect(e.audit().some((l) => l.event === 'live_session_start')).toBe(false);
  });

  it('with --live-ca: requires a client certificate of that CA as well as the token (--live-auth all)', async () => {
    const e = await env({ caFile: pki.ca });
    const rogue = rawViewer(e.port, { ca: pki.ca, cert: pki.rogueCert, key: pki.rogueKey, token: GOOD_TOKEN });
    const noCert = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    const certNoToken = rawViewer(e.port, { ca: pki.ca, cert: pki.clientCert, key: pki.clientKey });
    await Promise.all([rogue.closed, noCert.closed, certNoToken.closed]);
    expect(rogue.data().toString()).toMatch(/^MESHCAP-LIVE\/1 403 bad_client_cert client certificate not accepted: \w+/);
    expect(noCert.data().toString()).toMatch(/^MESHCAP-LIVE\/1 401 no_client_cert /);
    expect(certNoToken.data().toString()).toMatch(/^MESHCAP-LIVE\/1 401 no_token /);
    const refusedRogue = e.audit().find((l) => l.reason === 'bad_client_cert')!;
    expect(refusedRogue.viewer).toMatchObject({ cert_subject: 'CN=viewer-mallory', cert_issuer: 'CN=other-ca' });

    const good = rawViewer(e.port, { ca: pki.ca, cert: pki.clientCert, key: pki.clientKey, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    e.feedFixture();
    await e.close();
    await good.closed;
    expect(pcapngPackets(good.data()).length).toBe(22);
    const start = e.audit().find((l) => l.event === 'live_session_start')!;
    expect(start.viewer).toMatchObject({ auth: 'token+cert', cert_subject: 'CN=viewer-alice', cert_issuer: 'CN=ca' });
  });

  it('--live-auth any: a client certificate alone is enough, a wrong token still is not', async () => {
    const e = await env({ caFile: pki.ca, authMode: 'any' });
    const wrong = rawViewer(e.port, { ca: pki.ca, cert: pki.clientCert, key: pki.clientKey, token: WRONG_TOKEN });
    const nothing = rawViewer(e.port, { ca: pki.ca });
    await Promise.all([wrong.closed, nothing.closed]);
    expect(wrong.data().toString()).toMatch(/^MESHCAP-LIVE\/1 403 bad_token /);
    expect(nothing.data().toString()).toMatch(/^MESHCAP-LIVE\/1 401 no_credentials /);
    const certOnly = rawViewer(e.port, { ca: pki.ca, cert: pki.clientCert, key: pki.clientKey });
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    await e.close();
    await certOnly.closed;
    expect(certOnly.data().subarray(0, 4)).toEqual(SHB);
  });

  it('refuses garbage, bad filters and unknown protocol versions in words', async () => {
    const e = await env();
    const bad = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'host=not-an-ip' });
    await bad.closed;
    expect(bad.data().toString()).toMatch(/^MESHCAP-LIVE\/1 400 bad_filter filter: host "not-an-ip": expected an IPv4 or IPv6 address/);
    const tls = await import('node:tls');
    const line = async (text: string): Promise<string> => {
      const s = tls.connect({ host: '127.0.0.1', port: e.port, ca: fs.readFileSync(pki.ca) });
      let got = '';
      s.on('data', (d) => (got += d.toString()));
      s.on('secureConnect', () => s.write(text));
      await new Promise((r) => s.on('close', r));
      return got;
    };
    expect(await line('HELLO\n')).toMatch(/^MESHCAP-LIVE\/1 400 bad_request expected "MESHCAP-LIVE\/1 token=\.\.\. filter=\.\.\."/);
    expect(await line('MESHCAP-LIVE/2 token=x\n')).toMatch(/^MESHCAP-LIVE\/1 400 bad_request unsupported protocol version MESHCAP-LIVE\/2/);
    expect(e.live.counters.refused.get('bad_request')).toBe(2);
  });
});

describe('live endpoint: limits and token rotation', () => {
  it('refuses viewers beyond --live-max-viewers (503), and re-reads the token file when it changes', async () => {
    const dir = fs.mkdtempSync(path.join(root, 'rotate-'));
    const tokenFile = path.join(dir, 'tokens');
    fs.writeFileSync(tokenFile, `${GOOD_TOKEN}\n`, { mode: 0o600 });
    const e = await env({ tokenFile, maxViewers: 1 });
    const first = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 1, 'first viewer');
    const second = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await second.closed;
    expect(second.data().toString()).toMatch(/^MESHCAP-LIVE\/1 503 too_many_viewers the server allows 1 viewers at a time\n$/);
    first.socket.end();
    await first.closed;
    await waitFor(() => e.live.viewerCount === 0, 'first viewer gone');
    expect(e.audit().find((l) => l.event === 'live_session_end')).toMatchObject({ reason: 'client_closed' });
    // Rotate: the old token stops working, the new one works, without a restart.
    const NEW = 'tok-rotated-0123456789abcdef0123';
    fs.writeFileSync(tokenFile, `${NEW}\n# rotated\n`);
    fs.utimesSync(tokenFile, new Date(), new Date(Date.now() + 5000));
    const old = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await old.closed;
    expect(old.data().toString()).toMatch(/^MESHCAP-LIVE\/1 403 bad_token /);
    const fresh = rawViewer(e.port, { ca: pki.ca, token: NEW });
    await waitFor(() => e.live.viewerCount === 1, 'viewer with the new token');
    fresh.socket.destroy();
  });
});

describe('live endpoint: certificate rotation', () => {
  it('a certificate replaced on disk: the next viewer gets the new one, the open session carries on', async () => {
    const dir = fs.mkdtempSync(path.join(root, 'certs-'));
    const certFile = path.join(dir, 'tls.crt');
    const keyFile = path.join(dir, 'tls.key');
    fs.copyFileSync(pki.serverCert, certFile);
    fs.copyFileSync(pki.serverKey, keyFile);
    const e = await env({ certFile, keyFile });
    const fingerprint = (file: string) => new X509Certificate(fs.readFileSync(file)).fingerprint256;
    const first = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 1, 'first viewer');
    expect(first.socket.getPeerX509Certificate()!.fingerprint256).toBe(fingerprint(pki.serverCert));
    // cert-manager style: new key and certificate written in place (the key first).
    fs.copyFileSync(pki.serverKey2, keyFile);
    fs.copyFileSync(pki.serverCert2, certFile);
    await waitFor(() => e.logs.some((l) => l.msg === 'TLS certificate reloaded; new connections use it'), 'reload logged', 5000);
    const second = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 2, 'second viewer');
    expect(second.socket.getPeerX509Certificate()!.fingerprint256).toBe(fingerprint(pki.serverCert2));
    // The first session was not touched: it still receives packets.
    const before = first.data().length;
    const secondBefore = second.data().length;
    e.feedTraces('node-rot', [openConn(77, ['10.0.0.1', 8080], ['10.0.0.2', 40000]), readEv(77, 'GET /after-rotation HTTP/1.1\r\nHost: x\r\n\r\n')]);
    e.pipeline.flush();
    await waitFor(() => first.data().length > before && second.data().length > secondBefore, 'both viewers receive');
    expect(first.socket.destroyed).toBe(false);
    first.socket.destroy();
    second.socket.destroy();
  });
});

describe('live endpoint: WebSocket', () => {
  it('a ws client gets the same pcapng stream in binary messages', async () => {
    const e = await env();
    const v = wsViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await v.opened;
    expect(await v.refusal).toBeNull();
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    e.feedFixture();
    await waitFor(() => pcapngPackets(v.data()).length === 22, 'all packets on the WebSocket');
    expect(v.messages[0]!.subarray(0, 4)).toEqual(SHB);
    await e.close();
    const closed = await v.closed;
    expect(closed).toEqual({ code: 1001, reason: 'meshcap serve is shutting down' });
    expect(pcapngPackets(v.data()).map((p) => p.data)).toEqual(filePackets(e));
    expect(e.audit().find((l) => l.event === 'live_session_start')!.viewer).toMatchObject({ protocol: 'wss', auth: 'token' });
  });

  it('refuses a wrong or missing bearer token with 403/401 before the upgrade', async () => {
    const e = await env();
    const wrong = wsViewer(e.port, { ca: pki.ca, token: WRONG_TOKEN });
    const none = wsViewer(e.port, { ca: pki.ca });
    expect(await wrong.refusal).toMatchObject({ status: 403, reason: 'bad_token' });
    expect(await none.refusal).toMatchObject({ status: 401, reason: 'no_token' });
    e.feedFixture();
    await sleep(200);
    expect(wrong.messages).toEqual([]);
    expect(none.messages).toEqual([]);
    expect(e.audit().filter((l) => l.event === 'live_session_refused').map((l) => (l.viewer as { protocol: string }).protocol)).toEqual(['wss', 'wss']);
  });

  it('takes the token from the bearer.<token> subprotocol (browsers cannot set headers)', async () => {
    const e = await env();
    const { WebSocket } = await import('ws');
    const ws = new WebSocket(`wss://127.0.0.1:${e.port}/live`, ['meshcap-live', `bearer.${GOOD_TOKEN}`], { ca: fs.readFileSync(pki.ca) });
    const first = await new Promise<Buffer>((resolve, reject) => {
      ws.once('message', (d: Buffer) => resolve(d));
      ws.once('error', reject);
    });
    expect(ws.protocol).toBe('meshcap-live');
    expect(first.subarray(0, 4)).toEqual(SHB);
    ws.close();
  });
});

describe('live endpoint: filters and mid-stream joins', () => {
  it('sends each viewer only the flows its filter matches (host, port, node, flow)', async () => {
    const e = await env();
    const viewers = {
      all: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN }),
      net: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'host=10.0.1.0/24' }),
      port: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'port=443' }),
      node: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'node=node-b*' }),
      flow: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'flow=7 node=node-a' }),
      v6: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'host=fd00::/16, host=10.9.9.9' }),
      none: rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, filter: 'port=1-100' }),
    };
    await waitFor(() => e.live.viewerCount === 7, 'viewers connected');
    // Short flows (opened and closed between two flushes: matched from the frames and the first
    // packet's comment) and one long flow (matched from the flow table).
    e.feedTraces('node-a', connection(5, ['10.0.0.1', 443], ['10.0.0.2', 40001], 'GET / HTTP/1.1\r\n\r\n', 'HTTP/1.1 200 OK\r\n\r\n'));
    e.feedTraces('node-b-7f9c', connection(6, ['10.0.1.1', 8080], ['10.0.1.2', 40002], 'ping', 'pong'));
    e.feedTraces('node-a', [openConn(7, ['fd00::1', 443], ['fd00::2', 40003]), readEv(7, 'hello')]);
    await sleep(150);
    e.feedTraces('node-a', [writeEv(7, 'world'), closedEv(7)]);
    await e.close();
    await Promise.all(Object.values(viewers).map((v) => v.closed));
    const portsOf = (v: (typeof viewers)['all']): number[] => [...new Set(pcapngPackets(v.data()).map((p) => Math.max(...ports(p.data))))].sort();
    expect(portsOf(viewers.all)).toEqual([40001, 40002, 40003]);
    expect(portsOf(viewers.net)).toEqual([40002]);
    expect(portsOf(viewers.port)).toEqual([40001, 40003]);
    expect(portsOf(viewers.node)).toEqual([40002]);
    expect(portsOf(viewers.flow)).toEqual([40003]);
    expect(portsOf(viewers.v6)).toEqual([40003]);
    expect(portsOf(viewers.none)).toEqual([]);
    expect(pcapngPackets(viewers.none.data())).toEqual([]);
    expect(viewers.none.data().subarray(0, 4)).toEqual(SHB); // still a valid (empty) capture
    // Per flow, a filtered viewer gets exactly what the unfiltered one got.
    const all = pcapngPackets(viewers.all.data()).map((p) => p.data);
    expect(pcapngPackets(viewers.port.data()).map((p) => p.data)).toEqual(all.filter((f) => ports(f).includes(443)));
    const starts = e.audit().filter((l) => l.event === 'live_session_start').map((l) => l.filter);
    expect(starts).toContain('host=fd00::/16 host=10.9.9.9');
    expect(starts).toContain('node=node-a flow=7');
  });

  it('tells a viewer that joined mid-flow, in a packet comment; new flows carry their handshake', async () => {
    const e = await env();
    e.feedFixture(0, 3); // connection, the client preface + request, the server SETTINGS
    await sleep(150); // flushed before the viewer joins
    const v = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    e.feedFixture(3); // the rest of the fixture connection
    e.feedTraces('node-a', connection(9, ['10.0.0.1', 8443], ['10.0.0.2', 41000], 'new', 'flow'));
    await e.close();
    await v.closed;
    const pkts = pcapngPackets(v.data());
    const old = pkts.filter((p) => ports(p.data).includes(10000));
    const fresh = pkts.filter((p) => ports(p.data).includes(8443));
    expect(old.length).toBeGreaterThan(0);
    expect(old[0]!.comments.join('; ')).toContain(JOINED_MID_STREAM);
    expect(old.slice(1).every((p) => !p.comments.join('').includes('joined mid-stream'))).toBe(true);
    expect(fresh[0]!.data[14 + 20 + 13]! & 0x02).toBe(0x02); // SYN
    expect(fresh.every((p) => !p.comments.join('').includes('joined mid-stream'))).toBe(true);
    // The capture on disk never carries the viewer's note.
    expect(fs.readFileSync(e.out).includes(Buffer.from('joined mid-stream'))).toBe(false);
    // Wireshark shows it as a packet comment.
    const file = path.join(path.dirname(e.out), 'joined.pcapng');
    fs.writeFileSync(file, v.data());
    const comments = await tsharkFields(file, ['frame.comment'], { filter: 'tcp.port == 10000 && frame.comment' });
    expect(comments[0]![0]).toContain('viewer joined mid-stream');
  });
});

describe('live endpoint: slow viewers', () => {
  it('cuts off a viewer that stops reading; other viewers and the capture file are unharmed', async () => {
    // 4 MiB per viewer, blocks of 256 KiB (serve: 8 MiB and 1 MiB); ~38 MB of traffic.
    const e = await env({ viewerBufferBytes: 4 * 1024 * 1024 }, { blockSize: 256 * 1024, blockCount: 16 });
    const registry = new client.Registry();
    registerLiveMetrics(registry, e.live);
    const stuck = rawViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, paused: true });
    const stuckWs = wsViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN, paused: true });
    const reader = wsViewer(e.port, { ca: pki.ca, token: GOOD_TOKEN });
    await waitFor(() => e.live.viewerCount === 3, 'viewers connected');
    const chunk = Buffer.alloc(60_000, 0x61);
    for (let conn = 0; conn < 8; conn++) {
      const id = 100 + conn;
      e.feedTraces('node-a', [openConn(id, ['10.0.0.1', 443], ['10.0.0.2', 42000 + conn])]);
      for (let i = 0; i < 80; i++) {
        e.feedTraces('node-a', [readEv(id, 'GET /big HTTP/1.1\r\n\r\n'), writeEv(id, chunk)]);
        if (i % 4 === 0) await sleep(2); // paced, so the reading viewer (same process) keeps up
      }
      e.feedTraces('node-a', [closedEv(id)]);
      await sleep(20);
    }
    await waitFor(() => e.live.counters.disconnected.get('slow')! >= 2, 'both stuck viewers cut off', 30_000);
    expect(e.live.counters.disconnected.get('slow')).toBe(2);
    expect(e.live.viewerCount).toBe(1);
    const metrics = await registry.metrics();
    expect(metrics).toMatch(/meshcap_live_viewers_disconnected_total\{reason="slow"\} 2/);
    expect(metrics).toMatch(/meshcap_live_viewers\{protocol="wss"\} 1/);
    await e.close();
    await reader.closed;
    // The file is complete: every packet made, none dropped.
    expect(e.stats.totalDrops()).toBe(0);
    const disk = filePackets(e);
    expect(disk.length).toBe(e.stats.packets);
    expect(pcapngPackets(reader.data()).length).toBe(e.stats.packets);
    const ends = e.audit().filter((l) => l.event === 'live_session_end');
    expect(ends.filter((l) => l.reason === 'slow').length).toBe(2);
    expect(ends.find((l) => l.reason === 'slow')!.detail).toMatch(/fell behind/);
    stuck.socket.destroy();
    stuckWs.ws.terminate();
  });
});

describe('live endpoint: configuration and the loopback PCAP-over-IP listener', () => {
  const base: LiveConfig = { listen: '0.0.0.0:9465', cert: 'c', key: 'k', ca: null, tokenFile: 't', authMode: 'all', insecureLoopback: null, viewerBufferMiB: 8, maxViewers: 16 };

  it('validates the flags', () => {
    expect(liveConfigProblem(base)).toBeNull();
    expect(liveConfigProblem({ ...base, tokenFile: null })).toMatch(/needs "live-token-file" and\/or "live-ca"/);
    expect(liveConfigProblem({ ...base, cert: null })).toMatch(/needs "live-cert" and "live-key"/);
    expect(liveConfigProblem({ ...base, listen: 'nonsense' })).toMatch(/expected HOST:PORT/);
    expect(liveConfigProblem({ ...base, insecureLoopback: '0.0.0.0:57012' })).toMatch(/only served on loopback/);
    expect(liveConfigProblem({ ...base, listen: null, cert: null, key: null, tokenFile: null, insecureLoopback: '57012' })).toBeNull();
    expect(liveConfigProblem({ ...base, listen: null })).toMatch(/"live-cert" is set but "live-listen" is not/);
  });

  it('refuses to start cleartext on a non-loopback address, or without credentials', async () => {
    await expect(new LiveServer({ insecureLoopback: '0.0.0.0:0', snaplen: 65535 }, silentLogger()).start()).rejects.toThrow(/only binds to loopback/);
    await expect(new LiveServer({ listen: '127.0.0.1:0', certFile: pki.serverCert, keyFile: pki.serverKey, snaplen: 65535 }, silentLogger()).start()).rejects.toThrow(
      /needs --live-token-file and\/or --live-ca/,
    );
    const short = path.join(root, 'short-tokens');
    fs.writeFileSync(short, 'abc\n');
    await expect(
      new LiveServer({ listen: '127.0.0.1:0', certFile: pki.serverCert, keyFile: pki.serverKey, tokenFile: short, snaplen: 65535 }, silentLogger()).start(),
    ).rejects.toThrow(/line 1: token shorter than 16 characters/);
  });

  it('serves classic pcap to PCAP-over-IP clients on loopback, audited as unauthenticated', async () => {
    const e = await env({ insecureLoopback: '127.0.0.1:0' });
    const port = e.live.addresses.insecure!.port;
    const chunks: Buffer[] = [];
    const s = net.connect(port, '127.0.0.1');
    s.on('data', (d) => chunks.push(d));
    const closed = new Promise((r) => s.on('close', r));
    await waitFor(() => e.live.viewerCount === 1, 'viewer connected');
    e.feedFixture();
    await e.close();
    await closed;
    const cap = parseCapture(Buffer.concat(chunks));
    expect(cap.format).toBe('pcap');
    expect(cap.tsPrecision).toBe('us');
    expect(cap.linkType).toBe(1);
    expect(cap.packets.map((p) => p.data)).toEqual(filePackets(e));
    expect(e.audit().find((l) => l.event === 'live_session_start')!.viewer).toMatchObject({ protocol: 'pcap-over-ip', auth: 'none' });
  });
});
