/**
 * The capture files of the real `meshcap serve`, end to end: rotation by size (-C) and time (-G),
 * the ring (-W), the .part suffix, signals (SIGTERM/SIGINT: exit 0 within 5 s with everything
 * written; SIGKILL: the open .part is still a readable capture), file and socket modes, `-w -`,
 * `--format pcap` and `-s` snaplen. Traffic is Envoy's h2c trace (the synthetic StreamTaps fixture)
 * or a bulk connection made here.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { encodeRequests, streamTaps } from '../helpers/envoy-grpc-client.js';
import { directIoSupported } from '../helpers/direct-io.js';
import { readCaptureFile } from '../helpers/pcap-read.js';
import {
  CLI_BUILT,
  ENVOY_FIXTURES,
  expectedHttp2Info,
  freePort,
  killAll,
  metricValue,
  runCli,
  sleep,
  startServe,
  syntheticStreamMessages,
  tempDir,
  waitForMetrics,
  type ServeProcess,
} from '../helpers/serve-process.js';
import { tsharkFields } from '../helpers/tshark.js';

const BLOCK_BYTES = 1024 * 1024; // serve's output block size
const ROTATED = /^cap_(\d{5})_(\d{14})\.pcapng$/;

let GOOD: Buffer[] = [];
let EXPECTED: string[] = [];
/** Packets meshcap makes of the fixture trace (handshake, MSS-sliced data, teardown). */
const GOOD_PACKETS = 22;

beforeAll(() => {
  GOOD = syntheticStreamMessages();
  EXPECTED = expectedHttp2Info();
});

const dirs: string[] = [];
afterEach(async () => {
  await killAll();
  if (!process.env.MESHCAP_E2E_KEEP) for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

interface Env {
  dir: string;
  sock: string;
  target: string;
  proc: ServeProcess;
  port: number;
}

async function startEnv(args: string[], opts: { metrics?: boolean; captureStdout?: boolean; fileSizeLimit?: number; env?: Record<string, string> } = {}): Promise<Env> {
  const dir = tempDir('meshcap-sink-');
  dirs.push(dir);
  const sock = path.join(dir, 'tap.sock');
  const port = opts.metrics ? await freePort() : 0;
  const proc = await startServe({
    args: ['--grpc-listen', `unix:${sock}`, '--metrics-listen', opts.metrics ? `127.0.0.1:${port}` : 'off', ...args.map((a) => a.replaceAll('$DIR', dir))],
    cwd: dir,
    socket: sock,
    captureStdout: opts.captureStdout,
    ...(opts.fileSizeLimit !== undefined ? { fileSizeLimit: opts.fileSizeLimit } : {}),
    ...(opts.env ? { env: opts.env } : {}),
  });
  return { dir, sock, target: `unix:${sock}`, proc, port };
}

/** A node-B connection carrying `totalBytes` of server writes in 64 KiB events, with seq_num. */
function bulkMessages(traceId: number, remotePort: number, totalBytes: number, nodeId = 'bulk-node'): Buffer[] {
  const t0 = Math.floor(Date.now() / 1000);
  let seq = 1;
  let n = 0;
  const ts = () => ({ seconds: t0, nanos: (n++ * 1000) % 1_000_000_000 });
  const seg = (piece: object, first = false) => ({
    ...(first ? { identifier: { node: { id: nodeId }, tap_id: 'bulk' } } : {}),
    trace_id: traceId,
    trace: { socket_streamed_trace_segment: { trace_id: traceId, ...piece } },
  });
  const objs: object[] = [
    seg(
      {
        connection: {
          local_address: { socket_address: { address: '10.30.0.1', port_value: 8080 } },
          remote_address: { socket_address: { address: '10.30.0.2', port_value: remotePort } },
        },
      },
      true,
    ),
  ];
  const req = Buffer.from('GET /bulk HTTP/1.1\r\nhost: bulk\r\n\r\n');
  objs.push(seg({ event: { timestamp: ts(), read: { data: { as_bytes: req } }, seq_num: seq } }));
  seq += req.length;
  const chunk = 64 * 1024;
  for (let sent = 0; sent < totalBytes; sent += chunk) {
    const len = Math.min(chunk, totalBytes - sent);
    const data = Buffer.alloc(len, 0x30 + ((sent / chunk) % 10));
    objs.push(seg({ event: { timestamp: ts(), write: { data: { as_bytes: data } }, seq_num: seq } }));
    seq += len;
  }
  objs.push(seg({ event: { timestamp: ts(), closed: {}, seq_num: seq + 1 } }));
  return encodeRequests(objs);
}

function execStatus(cmd: string, args: string[], input?: Buffer): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.stdin.on('error', () => {});
    child.stdin.end(input ?? Buffer.alloc(0));
    child.on('close', (code) => resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
  });
}

const HTTP2_INFO_ARGS = ['-d', 'tcp.port==10000,http2', '-Y', 'http2', '-T', 'fields', '-e', '_ws.col.Info'];

/** `tshark -r FILE -d tcp.port==10000,http2 -Y http2 -T fields -e _ws.col.Info`. */
async function http2Info(file: string): Promise<string[]> {
  const r = await execStatus('tshark', ['-n', '-r', file, ...HTTP2_INFO_ARGS]);
  expect(r.code, r.stderr).toBe(0);
  return r.stdout.split('\n').filter(Boolean);
}

/**
 * The same through `tshark -r -` fed by a real pipe (tshark refuses the socketpair Node gives a
 * child for stdin): `cat FILE | tshark -r - …`, paths passed as positional parameters.
 */
async function http2InfoFromPipe(file: string): Promise<string[]> {
  const script = 'f="$1"; shift; cat "$f" | tshark -n -r - "$@"';
  const r = await execStatus('sh', ['-c', script, 'sh', file, ...HTTP2_INFO_ARGS]);
  expect(r.code, r.stderr).toBe(0);
  return r.stdout.split('\n').filter(Boolean);
}

function stoppedPackets(proc: ServeProcess): number {
  const line = proc.logs.find((l) => l.msg === 'meshcap stopped');
  expect(line, proc.stderr()).toBeDefined();
  return line!.packets as number;
}

const mode = (p: string) => fs.statSync(p).mode & 0o777;

describe.skipIf(!CLI_BUILT)('meshcap serve: capture files', () => {
  it('-C 1 rotates by size: STEM_NNNNN_YYYYmmddHHMMSS.pcapng, one .part while open, each file whole and bounded', async () => {
    const env = await startEnv(['-w', '$DIR/cap.pcapng', '-C', '1', '--flush-interval', '100']);
    const res = await streamTaps(env.target, bulkMessages(5, 41000, 5_000_000));
    expect(res.code, res.details).toBe(0);
    await sleep(400);
    const during = fs.readdirSync(env.dir).filter((f) => f.startsWith('cap_'));
    const parts = during.filter((f) => f.endsWith('.part'));
    expect(parts, during.join(' ')).toHaveLength(1);
    expect(parts[0]).toMatch(/^cap_\d{5}_\d{14}\.pcapng\.part$/);
    expect(mode(path.join(env.dir, parts[0]!))).toBe(0o600);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);

    const files = fs.readdirSync(env.dir).filter((f) => f.startsWith('cap_')).sort();
    expect(files.every((f) => ROTATED.test(f)), files.join(' ')).toBe(true);
    expect(files.length).toBeGreaterThanOrEqual(4);
    // Sequence numbers 1..N, no gaps.
    expect(files.map((f) => Number(ROTATED.exec(f)![1]))).toEqual(files.map((_, i) => i + 1));
    const paths = files.map((f) => path.join(env.dir, f));
    for (const p of paths) {
      expect(fs.statSync(p).size).toBeLessThanOrEqual(1_000_000 + BLOCK_BYTES + 4096);
      expect(mode(p)).toBe(0o600);
    }
    const cap = await execStatus('capinfos', ['-c', '-M', ...paths]);
    expect(cap.code, cap.stderr).toBe(0);
    let total = 0;
    for (const p of paths) {
      const n = readCaptureFile(p).packets.length;
      expect(n).toBeGreaterThan(0);
      total += n;
    }
    // tshark reads every file to its end (exit 0) and counts what our reader counts.
    const counts = await Promise.all(paths.map((p) => execStatus('tshark', ['-n', '-r', p, '-T', 'fields', '-e', 'frame.number'])));
    counts.forEach((r, i) => {
      expect(r.code, `${files[i]}: ${r.stderr}`).toBe(0);
      expect(r.stdout.split('\n').filter(Boolean).length).toBe(readCaptureFile(paths[i]!).packets.length);
    });
    expect(total).toBe(stoppedPackets(env.proc));
    expect(total).toBeGreaterThan(5_000_000 / 1460);
  });

  it('-G 1 rotates every second while traffic flows', async () => {
    const env = await startEnv(['-w', '$DIR/cap.pcapng', '-G', '1', '--flush-interval', '100']);
    const t0 = Date.now();
    let rounds = 0;
    while (Date.now() - t0 < 3200) {
      const r = await streamTaps(env.target, GOOD);
      expect(r.code, r.details).toBe(0);
      rounds++;
      await sleep(200);
    }
    await sleep(150);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const files = fs.readdirSync(env.dir).filter((f) => f.startsWith('cap_')).sort();
    expect(files.every((f) => ROTATED.test(f)), files.join(' ')).toBe(true);
    expect(files.length).toBeGreaterThanOrEqual(3);
    expect(files.length).toBeLessThanOrEqual(5);
    let total = 0;
    for (const f of files) {
      const n = readCaptureFile(path.join(env.dir, f)).packets.length;
      expect(n, f).toBeGreaterThan(0);
      total += n;
    }
    const cap = await execStatus('capinfos', ['-c', '-M', ...files.map((f) => path.join(env.dir, f))]);
    expect(cap.code, cap.stderr).toBe(0);
    expect(total).toBe(rounds * GOOD_PACKETS);
  });

  it('-W 2 keeps only the newest 2 files', async () => {
    const env = await startEnv(['-w', '$DIR/cap.pcapng', '-C', '1', '-W', '2', '--flush-interval', '100']);
    const res = await streamTaps(env.target, bulkMessages(6, 41001, 5_000_000));
    expect(res.code, res.details).toBe(0);
    await sleep(300);
    expect(fs.readdirSync(env.dir).filter((f) => f.startsWith('cap_')).length).toBeLessThanOrEqual(2);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const completed = env.proc.logs.filter((l) => l.msg === 'capture file completed').map((l) => path.basename(l.file as string));
    expect(completed.length).toBeGreaterThan(2);
    const files = fs.readdirSync(env.dir).filter((f) => f.startsWith('cap_')).sort();
    expect(files).toEqual(completed.slice(-2).sort());
    const cap = await execStatus('capinfos', ['-c', ...files.map((f) => path.join(env.dir, f))]);
    expect(cap.code, cap.stderr).toBe(0);
  });

  // pcapng records are 4-byte aligned, classic pcap records are not: the block lead works for both.
  it.each(['pcapng', 'pcap'])('big captures (%s) go to disk by direct I/O where the filesystem allows it (metric), byte for byte the file of the page cache', async (format) => {
    // A buffer larger than the whole capture: nothing can be dropped, so both files must be equal.
    const args = ['-w', `$DIR/out.${format}`, '--format', format, '--flush-interval', '100', '--buffer-size', '64'];
    const env = await startEnv(args, { metrics: true });
    const total = 12 * 1024 * 1024;
    const messages = bulkMessages(8, 41003, total);
    const res = await streamTaps(env.target, messages);
    expect(res.code, res.details).toBe(0);
    const m = await waitForMetrics(env.port, (x) => x.get('meshcap_packets_total')! > 0 && metricValue(x, 'meshcap_sink_packets_written_total', { sink: 'file' }) === x.get('meshcap_packets_total'));
    const written = metricValue(m, 'meshcap_sink_written_bytes_total', { sink: 'file' });
    const direct = metricValue(m, 'meshcap_capture_direct_io_bytes_total');
    expect(written).toBeGreaterThan(total);
    if (directIoSupported(env.dir)) expect(direct, `${direct} of ${written} bytes by direct I/O`).toBeGreaterThan(written / 2);
    else expect(direct).toBe(0);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const out = path.join(env.dir, `out.${format}`);
    expect(readCaptureFile(out).packets.length).toBe(m.get('meshcap_packets_total'));
    // tshark reads it to the end and finds every payload byte of the connection (without
    // reassembling the 12 MB HTTP body, which takes tshark most of a minute).
    const rows = await tsharkFields(out, ['tcp.len'], { prefs: { 'tcp.desegment_tcp_streams': 'FALSE' } });
    expect(rows.reduce((n, r) => n + Number(r[0]), 0)).toBe(total + 'GET /bulk HTTP/1.1\r\nhost: bulk\r\n\r\n'.length);
    // The same stream with direct I/O off: the same bytes on disk.
    const cached = await startEnv(args, { env: { MESHCAP_NO_DIRECT_IO: '1' } });
    expect((await streamTaps(cached.target, messages)).code).toBe(0);
    expect((await cached.proc.stop('SIGTERM')).code, cached.proc.stderr()).toBe(0);
    expect(fs.readFileSync(path.join(cached.dir, `out.${format}`)).equals(fs.readFileSync(out))).toBe(true);
  });

  it('a full disk: the write that does not fit is undone, logged and counted; the file stays whole; meshcap carries on and exits 0', async () => {
    // RLIMIT_FSIZE stands in for a full disk: writes past 3 MB fail (EFBIG), like ENOSPC.
    const limit = 3_000_000;
    const env = await startEnv(['-w', '$DIR/out.pcapng', '--flush-interval', '100'], { metrics: true, fileSizeLimit: limit });
    const res = await streamTaps(env.target, bulkMessages(9, 41004, 8_000_000));
    expect(res.code, res.details).toBe(0);
    const failures = () => env.proc.logs.filter((l) => l.msg === 'capture write failed; packets dropped');
    const loggedLost = () => failures().reduce((n, l) => n + (l.packets as number), 0);
    const lostOf = (x: Map<string, number>) => metricValue(x, 'meshcap_dropped_packets_total', { cause: 'sink_error' });
    const writtenOf = (x: Map<string, number>) => metricValue(x, 'meshcap_sink_packets_written_total', { sink: 'file' });
    // Every packet made is written or counted lost, and every lost one was logged.
    const m = await waitForMetrics(env.port, (x) => x.get('meshcap_packets_total')! > 0 && writtenOf(x) + lostOf(x) === x.get('meshcap_packets_total') && loggedLost() === lostOf(x));
    const written = writtenOf(m);
    const lost = lostOf(m);
    expect(written + lost).toBe(m.get('meshcap_packets_total'));
    expect(loggedLost()).toBe(lost);
    expect(written).toBeGreaterThan(1000);
    expect(lost).toBeGreaterThan(2000);
    expect(failures()[0]!.code).toBe('EFBIG');
    // Not a line per failed block: the ones that follow the first within a second are summed.
    expect(failures().reduce((n, l) => n + (l.blocks as number), 0)).toBeGreaterThan(failures().length);
    // Still serving: another stream is taken; what still fits under the limit is written, the rest counted.
    const again = await streamTaps(env.target, GOOD);
    expect(again.code, again.details).toBe(0);
    const m2 = await waitForMetrics(env.port, (x) => x.get('meshcap_packets_total') === m.get('meshcap_packets_total')! + GOOD_PACKETS && writtenOf(x) + lostOf(x) === x.get('meshcap_packets_total'));
    expect(writtenOf(m2) + lostOf(m2)).toBe(m.get('meshcap_packets_total')! + GOOD_PACKETS);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const out = path.join(env.dir, 'out.pcapng');
    expect(fs.existsSync(`${out}.part`)).toBe(false);
    expect(fs.statSync(out).size).toBeLessThanOrEqual(limit);
    // Whole records only: our reader and tshark read it to the end and agree on the packets.
    expect(readCaptureFile(out).packets.length).toBe(writtenOf(m2));
    const r = await execStatus('tshark', ['-n', '-r', out, '-T', 'fields', '-e', 'frame.number']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split('\n').filter(Boolean).length).toBe(writtenOf(m2));
  });

  it('-w FILE is written as FILE.part (0600) and renamed on SIGTERM; exit 0 within 5 s with every packet', async () => {
    const env = await startEnv(['-w', '$DIR/out.pcapng', '--flush-interval', '1000']);
    const out = path.join(env.dir, 'out.pcapng');
    expect(fs.existsSync(`${out}.part`)).toBe(true);
    expect(fs.existsSync(out)).toBe(false);
    expect(mode(`${out}.part`)).toBe(0o600);
    expect(mode(env.sock)).toBe(0o600);
    expect(fs.statSync(env.sock).isSocket()).toBe(true);
    const res = await streamTaps(env.target, GOOD);
    expect(res.code, res.details).toBe(0);
    // Packets are still in the output buffer (1 s flush interval): shutdown must flush them.
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    expect(stop.signal).toBeNull();
    expect(stop.elapsedMs).toBeLessThan(5000);
    expect(fs.existsSync(`${out}.part`)).toBe(false);
    expect(fs.existsSync(env.sock)).toBe(false);
    expect(mode(out)).toBe(0o600);
    expect(readCaptureFile(out).packets.length).toBe(GOOD_PACKETS);
    expect(stoppedPackets(env.proc)).toBe(GOOD_PACKETS);
    expect(await http2Info(out)).toEqual(EXPECTED);
  });

  it('SIGINT with a tap stream still open: exit 0 within 5 s, every received packet written', async () => {
    const env = await startEnv(['-w', '$DIR/out.pcapng', '--flush-interval', '1000'], { metrics: true });
    const out = path.join(env.dir, 'out.pcapng');
    const pending = streamTaps(env.target, GOOD, { end: false, deadlineMs: 20_000 });
    const m = await waitForMetrics(env.port, (mm) => metricValue(mm, 'meshcap_ingest_messages_total', { source: 'grpc' }) >= GOOD.length);
    expect(metricValue(m, 'meshcap_ingest_messages_total', { source: 'grpc' })).toBe(GOOD.length);
    expect(metricValue(m, 'meshcap_grpc_streams_active')).toBe(1);
    const stop = await env.proc.stop('SIGINT');
    expect({ code: stop.code, signal: stop.signal }, env.proc.stderr()).toEqual({ code: 0, signal: null });
    expect(stop.elapsedMs).toBeLessThan(5000);
    const res = await pending;
    expect(res.code).not.toBe(0); // the server cut the open stream
    expect(readCaptureFile(out).packets.length).toBe(GOOD_PACKETS);
    expect(await http2Info(out)).toEqual(EXPECTED);
  });

  it('SIGKILL after one flush interval: the .part file is a readable capture with the packets', async () => {
    const env = await startEnv(['-w', '$DIR/out.pcapng', '--flush-interval', '100']);
    const part = path.join(env.dir, 'out.pcapng.part');
    const res = await streamTaps(env.target, GOOD);
    expect(res.code, res.details).toBe(0);
    await sleep(500);
    const stop = await env.proc.stop('SIGKILL');
    expect(stop.signal).toBe('SIGKILL');
    expect(fs.existsSync(part)).toBe(true);
    const r = await execStatus('tshark', ['-n', '-r', part]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split('\n').filter(Boolean)).toHaveLength(GOOD_PACKETS);
    expect(await http2Info(part)).toEqual(EXPECTED);
  });

  it('-w - streams pcapng to standard output (logs stay on stderr), readable by tshark -r -', async () => {
    const env = await startEnv(['-w', '-', '--flush-interval', '100'], { captureStdout: true });
    const res = await streamTaps(env.target, GOOD);
    expect(res.code, res.details).toBe(0);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const stdout = env.proc.stdout();
    expect(stdout.readUInt32LE(0)).toBe(0x0a0d0d0a);
    const saved = writeTemp(env.dir, 'stdout.pcapng', stdout);
    expect(readCaptureFile(saved).packets.length).toBe(GOOD_PACKETS);
    expect(await http2InfoFromPipe(saved)).toEqual(EXPECTED);
    expect(fs.readdirSync(env.dir).filter((f) => f.includes('pcap') && f !== 'stdout.pcapng')).toEqual([]);
  });

  it('--format pcap writes classic pcap (d4c3b2a1) with the same HTTP/2 frames', async () => {
    const env = await startEnv(['-w', '$DIR/out.pcap', '--format', 'pcap', '--flush-interval', '100']);
    const res = await streamTaps(env.target, GOOD);
    expect(res.code, res.details).toBe(0);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const out = path.join(env.dir, 'out.pcap');
    expect(fs.readFileSync(out).subarray(0, 4).toString('hex')).toBe('d4c3b2a1');
    const cap = readCaptureFile(out);
    expect(cap.format).toBe('pcap');
    expect(cap.tsPrecision).toBe('us');
    expect(cap.packets.length).toBe(GOOD_PACKETS);
    expect(await http2Info(out)).toEqual(EXPECTED);
  });

  it('-s 100 keeps at most 100 bytes of each frame and the original lengths', async () => {
    const dir = tempDir('meshcap-sink-ref-');
    dirs.push(dir);
    const ref = path.join(dir, 'ref.pcapng');
    const conv = await runCli(['convert', path.join(ENVOY_FIXTURES, 'synthetic_streamtaps_requests.grpc.bin'), '-w', ref]);
    expect(conv.code, conv.stderr).toBe(0);
    const refLens = (await tsharkFields(ref, ['frame.len', 'frame.cap_len'])).map((r) => Number(r[0]));

    const env = await startEnv(['-w', '$DIR/out.pcapng', '-s', '100', '--flush-interval', '100']);
    const res = await streamTaps(env.target, GOOD);
    expect(res.code, res.details).toBe(0);
    const stop = await env.proc.stop('SIGTERM');
    expect(stop.code, env.proc.stderr()).toBe(0);
    const out = path.join(env.dir, 'out.pcapng');
    const rows = await tsharkFields(out, ['frame.len', 'frame.cap_len']);
    expect(rows).toHaveLength(GOOD_PACKETS);
    const lens = rows.map((r) => Number(r[0]));
    const caps = rows.map((r) => Number(r[1]));
    expect(lens).toEqual(refLens);
    expect(caps).toEqual(lens.map((l) => Math.min(l, 100)));
    expect(lens.some((l) => l > 1000)).toBe(true);
    expect(readCaptureFile(out).snapLen).toBe(100);
  });
});

function writeTemp(dir: string, name: string, data: Buffer): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, data);
  return p;
}

