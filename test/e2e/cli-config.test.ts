/**
 * The `meshcap` command line, end to end: configuration errors exit 2 and name the field and
 * where it came from (flag, config file, environment); `meshcap serve` with no flags runs on its
 * embedded defaults (socket and capture under the working directory, control endpoint on
 * 127.0.0.1:9464); `meshcap convert` turns each of Envoy's fixture encodings of the h2c trace into
 * the capture Envoy's own golden tshark output describes, with a clean TCP conversation.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { streamTaps } from '../helpers/envoy-grpc-client.js';
import { readCaptureFile } from '../helpers/pcap-read.js';
import {
  CLI_BUILT,
  ENVOY_FIXTURES,
  expectedHttp2Info,
  httpGet,
  killAll,
  metricValue,
  parsePrometheus,
  portInUse,
  runCli,
  startServe,
  syntheticStreamMessages,
  tempDir,
} from '../helpers/serve-process.js';
import { tsharkFields } from '../helpers/tshark.js';

let EXPECTED: string[] = [];
beforeAll(() => {
  EXPECTED = expectedHttp2Info();
});

const dirs: string[] = [];
function dir(prefix: string): string {
  const d = tempDir(prefix);
  dirs.push(d);
  return d;
}
/** For the sequential blocks only: the concurrent convert block must not kill its siblings. */
async function cleanUp(): Promise<void> {
  await killAll();
  if (!process.env.MESHCAP_E2E_KEEP) for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
}
afterAll(cleanUp);

/** Runs `meshcap serve ARGS` expecting a usage error before anything is bound. */
async function serveFails(args: string[], env: Record<string, string> = {}): Promise<string> {
  const cwd = dir('meshcap-cli-');
  const r = await runCli(['serve', ...args], { cwd, env, timeoutMs: 10_000 });
  expect(r.signal, `meshcap serve ${args.join(' ')} did not exit by itself:\n${r.stderr}`).toBeNull();
  expect(r.code, r.stderr).toBe(2);
  expect(fs.readdirSync(cwd).filter((f) => f !== 'meshcap.json')).toEqual([]); // nothing created
  return r.stderr;
}

describe.skipIf(!CLI_BUILT)('meshcap serve: configuration errors exit 2 and say what is wrong', () => {
  afterEach(cleanUp);
  it('--mss abc names the option and the value', async () => {
    const err = await serveFails(['--mss', 'abc', '--metrics-listen', 'off']);
    expect(err).toMatch(/--mss/);
    expect(err).toMatch(/"?mss"? must be an integer/);
    expect(err).toContain('abc');
  });

  it('an out-of-range value names the range', async () => {
    const err = await serveFails(['--flush-interval', '5000', '--metrics-listen', 'off']);
    expect(err).toMatch(/flush-interval/);
    expect(err).toMatch(/between 10 and 1000/);
  });

  it('an unknown flag is refused and named', async () => {
    const err = await serveFails(['--no-such-flag', '--metrics-listen', 'off']);
    expect(err).toMatch(/no-such-flag/);
  });

  it('a --config JSON file with a bad value names the file and the field', async () => {
    const cwd = dir('meshcap-cfg-');
    const cfg = path.join(cwd, 'bad.json');
    fs.writeFileSync(cfg, JSON.stringify({ 'metrics-listen': 'off', 'file-size': 'huge' }));
    const err = await serveFails(['--config', cfg]);
    expect(err).toContain(cfg);
    expect(err).toMatch(/file-size/);
    expect(err).toContain('huge');
  });

  it('a --config JSON file with an unknown field names the field', async () => {
    const cwd = dir('meshcap-cfg-');
    const cfg = path.join(cwd, 'unknown.json');
    fs.writeFileSync(cfg, JSON.stringify({ 'metrics-listen': 'off', 'maximum-flows': 5 }));
    const err = await serveFails(['--config', cfg]);
    expect(err).toMatch(/unknown field "maximum-flows"/);
  });

  it('MESHCAP_MSS=10 names the environment variable', async () => {
    const err = await serveFails(['--metrics-listen', 'off'], { MESHCAP_MSS: '10' });
    expect(err).toContain('MESHCAP_MSS');
    expect(err).toMatch(/between 88 and 65495, got 10/);
  });

  it('an unknown command exits 2', async () => {
    const r = await runCli(['sniff'], { cwd: dir('meshcap-cli-') });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown command "sniff"/);
  });
});

describe.skipIf(!CLI_BUILT)('meshcap serve with no flags', () => {
  afterEach(cleanUp);
  it('listens on unix:<cwd>/meshcap.sock, writes <cwd>/captures/meshcap.pcapng, serves 127.0.0.1:9464', async (ctx) => {
    if (await portInUse(9464)) ctx.skip(); // the default control port is taken on this machine
    const cwd = fs.realpathSync(dir('meshcap-defaults-'));
    const sock = path.join(cwd, 'meshcap.sock');
    const proc = await startServe({ args: [], cwd, socket: sock });
    const serving = proc.logs.find((l) => l.msg.startsWith('meshcap serving'))!;
    expect(serving.grpc_listen).toEqual([`unix:${sock}`]);
    expect(serving.write).toBe(path.join(cwd, 'captures', 'meshcap.pcapng'));
    expect(serving.metrics).toBe('http://127.0.0.1:9464/metrics');
    expect(fs.existsSync(path.join(cwd, 'captures', 'meshcap.pcapng.part'))).toBe(true);
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);

    const healthz = await httpGet(9464, '/healthz');
    expect(healthz.status).toBe(200);
    const readyz = await httpGet(9464, '/readyz');
    expect(readyz.status).toBe(200);
    expect((await httpGet(9464, '/nope')).status).toBe(404);

    const res = await streamTaps(`unix:${sock}`, syntheticStreamMessages());
    expect(res.code, res.details).toBe(0);
    const metrics = await httpGet(9464, '/metrics');
    expect(metrics.status).toBe(200);
    expect(metrics.headers['content-type']).toMatch(/^text\/plain/);
    const m = parsePrometheus(metrics.body);
    const names = [...m.keys()].map((k) => k.replace(/\{.*$/, ''));
    expect(names.every((n) => n.startsWith('meshcap_')), names.filter((n) => !n.startsWith('meshcap_')).join(' ')).toBe(true);
    for (const counter of [
      'meshcap_ingest_messages_total',
      'meshcap_packets_total',
      'meshcap_flows_opened_total',
      'meshcap_flows_closed_total',
      'meshcap_grpc_streams_total',
      'meshcap_lost_bytes_total',
    ]) {
      expect(names, counter).toContain(counter);
    }
    expect(metricValue(m, 'meshcap_ingest_messages_total', { source: 'grpc' })).toBe(8);
    expect(metricValue(m, 'meshcap_packets_total')).toBe(22);
    expect(metricValue(m, 'meshcap_flows_opened_total')).toBe(1);
    expect(metricValue(m, 'meshcap_flows_closed_total')).toBe(1);
    expect(metricValue(m, 'meshcap_grpc_streams_total')).toBe(1);
    expect(metricValue(m, 'meshcap_flows_active')).toBe(0);
    // Help text present for every meshcap_ family.
    expect(metrics.body).toMatch(/# HELP meshcap_packets_total /);
    expect(metrics.body).toMatch(/# TYPE meshcap_packets_total counter/);

    const stop = await proc.stop('SIGTERM');
    expect(stop.code, proc.stderr()).toBe(0);
    const out = path.join(cwd, 'captures', 'meshcap.pcapng');
    expect(fs.existsSync(out)).toBe(true);
    expect(fs.existsSync(sock)).toBe(false);
    const info = await tsharkFields(out, ['_ws.col.Info'], { decodeAs: ['tcp.port==10000,http2'], filter: 'http2' });
    expect(info.map((r) => r[0])).toEqual(EXPECTED);
  });
});

interface FixtureCase {
  file: string;
  extra: string[];
  traceId: string;
}

const FIXTURES: FixtureCase[] = [
  { file: 'tap2pcap_h2_ipv4.pb_text', extra: [], traceId: '0' },
  { file: 'tap2pcap_h2_ipv4.v3.pb', extra: [], traceId: '0' },
  { file: 'tap2pcap_h2_ipv4.pre1.28.pb', extra: [], traceId: '0' },
  { file: 'tap2pcap_h2_ipv4.v3.len_delimited.bin', extra: ['--input-format', 'pb_length_delimited'], traceId: '0' },
  { file: 'synthetic_streamtaps_requests.grpc.bin', extra: [], traceId: '1' },
];

const CHECKSUMS_ON = { 'ip.check_checksum': 'TRUE', 'tcp.check_checksum': 'TRUE' };
/** What must not change between pcapng and pcap: everything Wireshark shows but time. */
const SAME_FIELDS = ['frame.len', 'ip.src', 'ip.dst', 'tcp.srcport', 'tcp.dstport', 'tcp.seq', 'tcp.ack', 'tcp.flags', 'tcp.len', 'tcp.window_size_value', '_ws.col.Info'];

describe.skipIf(!CLI_BUILT).concurrent('meshcap convert: Envoy fixtures → the golden HTTP/2 conversation', () => {
  for (const fx of FIXTURES) {
    it(`${fx.file}${fx.extra.length ? ` ${fx.extra.join(' ')}` : ''}`, async () => {
      const d = dir('meshcap-convert-');
      const input = path.join(ENVOY_FIXTURES, fx.file);
      const ng = path.join(d, 'out.pcapng');
      const classic = path.join(d, 'out.pcap');
      const [a, b] = await Promise.all([
        runCli(['convert', input, ...fx.extra, '-w', ng], { cwd: d }),
        runCli(['convert', input, ...fx.extra, '-w', classic, '--format', 'pcap'], { cwd: d }),
      ]);
      expect(a.code, a.stderr).toBe(0);
      expect(b.code, b.stderr).toBe(0);
      expect(a.stderr).toMatch(/1 connection\(s\), 22 packets/);

      // One pass per file for everything but tcp.completeness (final only after two passes).
      const fields = [...SAME_FIELDS, 'frame.protocols', 'ip.checksum.status', 'tcp.checksum.status', 'frame.comment'];
      const opts = { decodeAs: ['tcp.port==10000,http2'], prefs: CHECKSUMS_ON, aggregator: '|' };
      const [ngRows, pcapRows, completeness] = await Promise.all([
        tsharkFields(ng, fields, opts),
        tsharkFields(classic, fields, opts),
        tsharkFields(ng, ['tcp.completeness'], { twoPass: true }),
      ]);
      const col = (name: string) => fields.indexOf(name);
      const http2Info = (rows: string[][]) => rows.filter((r) => r[col('frame.protocols')]!.split(':').includes('http2')).map((r) => r[col('_ws.col.Info')]);
      expect(ngRows).toHaveLength(22);
      expect(http2Info(ngRows)).toEqual(EXPECTED);
      // Handshake (SYN 1 + SYN-ACK 2 + ACK 4), data (8), FIN (16): 31; no RST (32).
      expect(new Set(completeness.map((r) => r[0]))).toEqual(new Set(['31']));
      const checks = ngRows.map((r) => [r[col('ip.checksum.status')], r[col('tcp.checksum.status')]]);
      expect(checks.every(([ip, tcp]) => ip === '1' && tcp === '1'), JSON.stringify(checks)).toBe(true); // 1 = Good
      const comment = ngRows[0]![col('frame.comment')]!;
      expect(comment).toContain(`trace_id=${fx.traceId}`);
      expect(comment).toContain('local=127.0.0.1:10000 remote=127.0.0.1:53288');

      expect(fs.readFileSync(classic).subarray(0, 4).toString('hex')).toBe('d4c3b2a1');
      expect(readCaptureFile(classic).packets.length).toBe(22);
      const same = (rows: string[][]) => rows.map((r) => r.slice(0, col('frame.comment')));
      expect(same(pcapRows)).toEqual(same(ngRows));
      expect(pcapRows.every((r) => r[col('frame.comment')] === '')).toBe(true); // classic pcap has no comments
    });
  }
});
