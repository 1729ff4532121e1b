/**
 * The Wireshark extcap, with the real tshark 4.0: the protocol answers, `meshcap extcap install`
 * into the personal extcap folder (HOME is a temp dir, so the real home is untouched), `tshark -D`,
 * and captures with `tshark -i meshcap -o extcap.meshcap.*` from an in-process Pipeline + live
 * server while Envoy's h2c trace is fed in: the capture dissects like Envoy's own conversion and
 * holds the very frames the file sink wrote. Refusals and connection failures come back as words
 * on stderr; SIGTERM and a closed fifo (EPIPE) end the program cleanly.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { chooseExtcapDir, configText, dltsText, interfacesText } from '../../src/cli/extcap.js';
import { parseCapture } from '../helpers/pcap-read.js';
import { tsharkFields } from '../helpers/tshark.js';
import { expectedHttp2Info, makePki, pcapngPackets, REPO, sleep, startLiveEnv, tmpDir, waitFor, writeTokenFiles, type LiveEnv, type Pki } from './live-harness.js';

const BIN = path.join(REPO, 'bin', 'meshcap.js');
const ENTRY = path.join(REPO, 'dist', 'src', 'cli', 'extcap.js');
const BUILT = fs.existsSync(ENTRY);
const HAVE_TSHARK = spawnSync('tshark', ['--version'], { stdio: 'ignore' }).status === 0;

let pki: Pki;
let tokens: ReturnType<typeof writeTokenFiles>;
let root: string;
let home: string;
const envs: LiveEnv[] = [];
const children: ChildProcess[] = [];

beforeAll(async () => {
  root = tmpDir('meshcap-extcap-');
  home = path.join(root, 'home');
  fs.mkdirSync(home);
  pki = await makePki();
  tokens = writeTokenFiles(root);
});

afterEach(async () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const e of envs.splice(0)) await e.close();
});

afterAll(() => {
  if (process.env.MESHCAP_E2E_KEEP) return;
  fs.rmSync(root, { recursive: true, force: true });
  pki?.remove();
});

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

function run(cmd: string, args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<Run> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { env: { ...process.env, LC_ALL: 'C', ...env }, timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: Date.now() - t0 }),
    );
  });
}

const meshcap = (args: string[], env: Record<string, string> = {}): Promise<Run> => run(process.execPath, [BIN, ...args], env);

async function env(opts: Parameters<typeof startLiveEnv>[1] = {}): Promise<LiveEnv> {
  const dir = fs.mkdtempSync(path.join(root, 'env-'));
  const e = await startLiveEnv(dir, { certFile: pki.serverCert, keyFile: pki.serverKey, tokenFile: tokens.serverTokens, ...opts });
  envs.push(e);
  return e;
}

async function installed(): Promise<void> {
  const r = await meshcap(['extcap', 'install'], { HOME: home });
  expect(r.code, r.stderr).toBe(0);
}

/** tshark capturing from the meshcap interface; resolves when it exits. */
function tsharkCapture(out: string, prefs: Record<string, string>, seconds: number, extra: string[] = []): { child: ChildProcess; done: Promise<Run> } {
  const args = ['-i', 'meshcap'];
  for (const [k, v] of Object.entries(prefs)) args.push('-o', `extcap.meshcap.${k}:${v}`);
  args.push('-a', `duration:${seconds}`, '-w', out, ...extra);
  const t0 = Date.now();
  const child = spawn('tshark', args, { env: { ...process.env, HOME: home, LC_ALL: 'C' }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  const done = new Promise<Run>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr, ms: Date.now() - t0 })));
  return { child, done };
}

const http2Info = async (file: string): Promise<string[]> =>
  (await tsharkFields(file, ['_ws.col.Info'], { decodeAs: ['tcp.port==10000,http2'], filter: 'http2' })).map((r) => r[0]!);

describe('meshcap extcap: the protocol', () => {
  it.skipIf(!BUILT)('answers --extcap-interfaces, --extcap-dlts and --extcap-config exactly, fast and offline', async () => {
    const ifs = await meshcap(['extcap', '--extcap-interfaces', '--extcap-version=4.0']);
    expect(ifs.code).toBe(0);
    expect(ifs.stdout).toBe('extcap {version=0.1.0}\ninterface {value=meshcap}{display=meshcap live plaintext capture}\n');
    expect(ifs.stdout).toBe(interfacesText());
    const dlts = await meshcap(['extcap', '--extcap-interface', 'meshcap', '--extcap-dlts']);
    expect(dlts.stdout).toBe(dltsText());
    expect(dlts.stdout).toMatch(/^dlt \{number=1\}\{name=EN10MB\}\{display=[^{}]+\}\n$/);
    // Through the launcher's direct entry point, as Wireshark calls it at every start.
    const cfg = await run(process.execPath, [ENTRY, '--extcap-config', '--extcap-interface', 'meshcap'], { HTTPS_PROXY: 'http://192.0.2.1:9', http_proxy: 'http://192.0.2.1:9' });
    expect(cfg.code).toBe(0);
    expect(cfg.ms).toBeLessThan(3000);
    expect(cfg.stdout).toBe(configText());
    const lines = cfg.stdout.trim().split('\n');
    for (const l of lines) expect(l).toMatch(/^arg \{number=\d+\}\{call=--[a-z0-9-]+\}\{display=[^{}]+\}\{type=(string|fileselect)\}(\{[a-z]+=[^{}]*\})*$/);
    const calls = lines.map((l) => /\{call=([^}]+)\}/.exec(l)![1]);
    expect(calls).toEqual(['--server', '--tokenfile', '--cafile', '--certfile', '--keyfile', '--filter', '--servername']);
    expect(lines.map((l) => Number(/\{number=(\d+)\}/.exec(l)![1]))).toEqual([0, 1, 2, 3, 4, 5, 6]);
    const bad = await meshcap(['extcap', '--extcap-interface', 'eth0', '--extcap-dlts']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/unknown interface "eth0"/);
  });

  it('picks the personal extcap folder the way the reference table says', () => {
    const env = { HOME: '/home/u' };
    expect(chooseExtcapDir('Personal Extcap path:\t/home/u/.local/lib/wireshark/extcap\nGlobal Extcap path:\t/usr/libexec/wireshark/extcap\n', env)).toEqual({
      dir: '/home/u/.local/lib/wireshark/extcap',
      how: 'tshark -G folders: Personal Extcap path',
    });
    const v40 = 'Personal configuration:\t/home/u/.config/wireshark\nPersonal Plugins:    \t/home/u/.local/lib/wireshark/plugins/4.0\nExtcap path:         \t/usr/lib/x86_64-linux-gnu/wireshark/extcap\n';
    expect(chooseExtcapDir(v40, env).dir).toBe('/home/u/.config/wireshark/extcap');
    const v42 = v40.replace('plugins/4.0', 'plugins/4.2');
    expect(chooseExtcapDir(v42, env).dir).toBe('/home/u/.local/lib/wireshark/extcap');
    expect(chooseExtcapDir(null, env, 'TShark (Wireshark) 4.6.1').dir).toBe('/home/u/.local/lib/wireshark/extcap');
    expect(chooseExtcapDir(null, { HOME: '/home/u', XDG_CONFIG_HOME: '/xdg' }).dir).toBe('/xdg/wireshark/extcap');
  });
});

describe.skipIf(!BUILT || !HAVE_TSHARK)('meshcap extcap with tshark', () => {
  it('`meshcap extcap install` makes tshark -D list the meshcap interface (and uninstall removes it)', async () => {
    const r = await meshcap(['extcap', 'install'], { HOME: home });
    expect(r.code, r.stderr).toBe(0);
    const launcher = path.join(home, '.config', 'wireshark', 'extcap', 'meshcap');
    expect(r.stdout).toContain(`installed ${launcher}`);
    expect(fs.statSync(launcher).mode & 0o111).not.toBe(0);
    expect(fs.readFileSync(launcher, 'utf8')).toContain(ENTRY);
    const d = await run('tshark', ['-D'], { HOME: home });
    expect(d.stdout).toMatch(/^\d+\. meshcap \(meshcap live plaintext capture\)$/m);
    const u = await meshcap(['extcap', 'uninstall'], { HOME: home });
    expect(u.code).toBe(0);
    expect(fs.existsSync(launcher)).toBe(false);
    expect((await run('tshark', ['-D'], { HOME: home })).stdout).not.toMatch(/meshcap/);
  });

  it('tshark -i meshcap (tls://, token, CA) captures what the pipeline makes: same frames, same HTTP/2 dissection', async () => {
    await installed();
    const e = await env();
    const out = path.join(root, 'tls-capture.pcapng');
    const t = tsharkCapture(out, { server: `tls://127.0.0.1:${e.port}`, tokenfile: tokens.clientToken, cafile: pki.ca }, 8);
    await waitFor(() => e.live.viewerCount === 1, 'tshark connected', 20_000);
    e.feedFixture();
    const r = await t.done;
    expect(r.code, r.stderr).toBe(0);
    // tshark stopped the capture: the extcap went away, the session ended as the client's doing.
    await waitFor(() => e.live.viewerCount === 0, 'the extcap to disconnect');
    await e.close();
    expect(await http2Info(out)).toEqual(expectedHttp2Info());
    const disk = parseCapture(fs.readFileSync(e.out)).packets.map((p) => p.data);
    const captured = parseCapture(fs.readFileSync(out)).packets.map((p) => p.data);
    expect(captured.length).toBe(22);
    expect(captured).toEqual(disk);
    const start = e.audit().find((l) => l.event === 'live_session_start')!;
    expect(start.viewer).toMatchObject({ protocol: 'tls', auth: 'token', client: 'meshcap-extcap/0.1.0' });
    expect(e.audit().find((l) => l.event === 'live_session_end')).toMatchObject({ reason: 'client_closed', packets: 22 });
  });

  it('tshark over wss:// with a client certificate and a filter gets only the matching flows', async () => {
    await installed();
    const e = await env({ caFile: pki.ca });
    const out = path.join(root, 'wss-capture.pcapng');
    const t = tsharkCapture(
      out,
      { server: `wss://127.0.0.1:${e.port}/live`, tokenfile: tokens.clientToken, cafile: pki.ca, certfile: pki.clientCert, keyfile: pki.clientKey, filter: 'port=10000' },
      8,
    );
    await waitFor(() => e.live.viewerCount === 1, 'tshark connected', 20_000);
    const { connection } = await import('./live-harness.js');
    e.feedTraces('node-other', connection(77, ['10.0.0.1', 8080], ['10.0.0.2', 40000], 'GET / HTTP/1.1\r\n\r\n', 'HTTP/1.1 204 No Content\r\n\r\n'));
    e.feedFixture();
    const r = await t.done;
    expect(r.code, r.stderr).toBe(0);
    await e.close();
    expect(await http2Info(out)).toEqual(expectedHttp2Info());
    const ports = await tsharkFields(out, ['tcp.port'], {});
    expect(new Set(ports.map((p) => p[0]))).toEqual(new Set(['10000,53288', '53288,10000']));
    const start = e.audit().find((l) => l.event === 'live_session_start')!;
    expect(start).toMatchObject({ filter: 'port=10000', viewer: { protocol: 'wss', auth: 'token+cert', cert_subject: 'CN=viewer-alice' } });
  });

  it('a wrong token: tshark reports the refusal in words, the attempt is audited, nothing is captured', async () => {
    await installed();
    const e = await env();
    const out = path.join(root, 'refused.pcapng');
    const t = tsharkCapture(out, { server: `tls://127.0.0.1:${e.port}`, tokenfile: tokens.wrongToken, cafile: pki.ca }, 10);
    const r = await t.done;
    expect(r.ms).toBeLessThan(9000); // ends at once, not at the autostop
    expect(r.stderr).toContain('the server refused this viewer (403 bad_token): token not accepted.');
    expect(r.stderr).toContain(`The token in ${tokens.wrongToken} is not one of the server's`);
    expect(e.audit().filter((l) => l.event === 'live_session_refused').map((l) => l.reason)).toEqual(['bad_token']);
    expect(e.live.counters.sentPackets).toBe(0);
    if (fs.existsSync(out)) expect(parseCapture(fs.readFileSync(out)).packets.length).toBe(0);
  });
});

describe.skipIf(!BUILT)('meshcap extcap --capture, run directly', () => {
  function mkfifo(name: string): string {
    const p = path.join(root, name);
    expect(spawnSync('mkfifo', [p]).status).toBe(0);
    return p;
  }

  function capture(args: string[]): { child: ChildProcess; done: Promise<Run> } {
    const child = spawn(process.execPath, [ENTRY, '--extcap-interface', 'meshcap', '--capture', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let stdout = '';
    let stderr = '';
    const t0 = Date.now();
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    return { child, done: new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr, ms: Date.now() - t0 }))) };
  }

  it('writes pcapng into the fifo as packets arrive and exits 0 on SIGTERM', async () => {
    const e = await env();
    const fifo = mkfifo('sigterm.fifo');
    const c = capture(['--fifo', fifo, '--server', `tls://127.0.0.1:${e.port}`, '--tokenfile', tokens.clientToken, '--cafile', pki.ca]);
    const chunks: Buffer[] = [];
    const reader = fs.createReadStream(fifo);
    reader.on('data', (d) => chunks.push(d as Buffer));
    await waitFor(() => e.live.viewerCount === 1, 'connected', 15_000);
    e.feedFixture();
    // The fifo is read while it is written: count whole blocks only, then parse strictly.
    await waitFor(() => pcapngPackets(Buffer.concat(chunks)).length === 22, 'packets in the fifo', 10_000);
    expect(parseCapture(Buffer.concat(chunks)).packets.length).toBe(22);
    c.child.kill('SIGTERM');
    const r = await c.done;
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    reader.destroy();
  });

  it('ends cleanly (exit 0) when the reader closes the fifo (EPIPE)', async () => {
    const e = await env();
    const fifo = mkfifo('epipe.fifo');
    const c = capture(['--fifo', fifo, '--server', `wss://127.0.0.1:${e.port}/live`, '--tokenfile', tokens.clientToken, '--cafile', pki.ca]);
    const fd = await fs.promises.open(fifo, 'r');
    const head = Buffer.alloc(4);
    await fd.read(head, 0, 4);
    expect(head).toEqual(Buffer.from([0x0a, 0x0d, 0x0d, 0x0a]));
    await fd.close();
    await waitFor(() => e.live.viewerCount === 1, 'connected', 15_000);
    for (let i = 0; i < 20 && c.child.exitCode === null; i++) {
      e.feedFixture();
      await sleep(100);
    }
    const r = await c.done;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
  });

  it('explains connection failures: nothing listening, an untrusted server certificate, a missing client certificate', async () => {
    const e = await env({ caFile: pki.ca });
    const open = async (name: string, args: string[]): Promise<Run> => {
      const fifo = mkfifo(name);
      const c = capture(['--fifo', fifo, ...args]);
      const reader = fs.createReadStream(fifo);
      reader.on('data', () => {});
      const r = await c.done;
      reader.destroy();
      return r;
    };
    const refused = await open('refused.fifo', ['--server', 'tls://127.0.0.1:1', '--tokenfile', tokens.clientToken]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/cannot connect to 127\.0\.0\.1:1: connection refused\. Is `meshcap serve --live-listen` running/);
    const untrusted = await open('untrusted.fifo', ['--server', `tls://127.0.0.1:${e.port}`, '--tokenfile', tokens.clientToken]);
    expect(untrusted.stderr).toMatch(/server certificate of 127\.0\.0\.1:\d+ is not trusted \(\w+\): set "Server CA certificate" \(--cafile\)/);
    const noCert = await open('nocert.fifo', ['--server', `tls://127.0.0.1:${e.port}`, '--tokenfile', tokens.clientToken, '--cafile', pki.ca]);
    expect(noCert.stderr).toMatch(/\(401 no_client_cert\).*Set "Client certificate" and "Client key"/);
    const rogue = await open('rogue.fifo', ['--server', `wss://127.0.0.1:${e.port}/live`, '--tokenfile', tokens.clientToken, '--cafile', pki.ca, '--certfile', pki.rogueCert, '--keyfile', pki.rogueKey]);
    expect(rogue.stderr).toMatch(/\(403 bad_client_cert\).*must be signed by the CA of the server's --live-ca/);
    const scheme = await open('scheme.fifo', ['--server', `http://127.0.0.1:${e.port}`]);
    expect(scheme.stderr).toMatch(/unsupported server scheme "http:".*never speaks cleartext/);
    const badFilter = await open('filter.fifo', ['--server', `tls://127.0.0.1:${e.port}`, '--filter', 'tcp port 80']);
    expect(badFilter.stderr).toMatch(/bad filter "tcp port 80": unknown filter clause "tcp"/);
    expect(e.live.counters.sentPackets).toBe(0);
  });
});
