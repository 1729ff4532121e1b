/**
 * `meshcap extcap`: the Wireshark extcap program for the live endpoint, and its installer.
 *
 * Wireshark (and tshark/dumpcap) run extcap programs from their extcap folders (docs/live.md):
 *
 *   --extcap-interfaces [--extcap-version[=X.Y]]   list the interface `meshcap`
 *   --extcap-interface meshcap --extcap-dlts        one DLT: Ethernet (1)
 *   --extcap-interface meshcap --extcap-config      the options below (fast, offline: Wireshark
 *                                                   calls it at every start)
 *   --extcap-interface meshcap --capture --fifo PATH [--extcap-capture-filter F] [options]
 *                                                   connect to `meshcap serve --live-listen` and
 *                                                   copy its pcapng stream into PATH
 *
 * Options (lowercase: an uppercase `call` makes tshark 4.0 abort at start-up), given on the command
 * line as `-o extcap.meshcap.<name>:<value>`:
 *   --server     tls://HOST:PORT (raw MESHCAP-LIVE/1) or wss://HOST:PORT/live (WebSocket)
 *   --tokenfile  file whose first line is the bearer token
 *   --cafile     PEM CA of the server certificate (default: the system CAs)
 *   --certfile, --keyfile   client certificate and key (when the server has --live-ca)
 *   --filter     viewer filter: host=ADDR port=N node=NAME flow=TRACE_ID
 *   --servername name to verify the server certificate against (e.g. through kubectl port-forward)
 * A capture filter (-f, --extcap-capture-filter) is taken as the viewer filter too (same syntax).
 *
 * Ends cleanly (exit 0) on SIGTERM/SIGINT or when Wireshark closes the fifo (EPIPE); connection and
 * authentication failures are explained on stderr (Wireshark shows them) with exit code 1.
 *
 * `meshcap extcap install [--dir DIR] [--tshark PATH]` writes a launcher into the personal extcap
 * folder (found with `tshark -G folders`), `meshcap extcap uninstall` removes it.
 *
 * This module is also an entry point of its own (the launcher runs it directly): it imports only
 * what --extcap-interfaces/--extcap-config need; TLS and WebSocket are loaded for --capture only.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const EXTCAP_INTERFACE = 'meshcap';
export const EXTCAP_DISPLAY = 'meshcap live plaintext capture';
export const LAUNCHER_NAME = 'meshcap';

const CONNECT_TIMEOUT_MS = 15_000;
const SHB_MAGIC = Buffer.from([0x0a, 0x0d, 0x0d, 0x0a]);

export const EXTCAP_USAGE = `Usage:
  meshcap extcap install [--dir DIR] [--tshark PATH]   install the Wireshark extcap launcher
  meshcap extcap uninstall [--dir DIR] [--tshark PATH] remove it
  meshcap extcap --extcap-interfaces                   (called by Wireshark)
  meshcap extcap --extcap-interface meshcap --extcap-dlts | --extcap-config
  meshcap extcap --extcap-interface meshcap --capture --fifo PATH --server URL [options]

Capture options: --server tls://HOST:PORT | wss://HOST:PORT/live, --tokenfile FILE, --cafile FILE,
  --certfile FILE, --keyfile FILE, --filter "host=ADDR port=N node=NAME flow=ID", --servername NAME
`;

/** A failure the user can fix: printed as it is, exit code 1. */
class UserError extends Error {}

function version(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const rel of ['../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(here, rel), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'meshcap' && pkg.version) return pkg.version;
    } catch {
      // try the next
    }
  }
  return '0.0.0';
}

// ---------------------------------------------------------------------------------------------
// Arguments

const VALUE_OPTS = new Set([
  'extcap-interface',
  'fifo',
  'extcap-capture-filter',
  'extcap-control-in',
  'extcap-control-out',
  'extcap-reload-option',
  'server',
  'tokenfile',
  'cafile',
  'certfile',
  'keyfile',
  'filter',
  'servername',
  'log-level',
  'log-file',
  'dir',
  'tshark',
]);
const FLAG_OPTS = new Set(['extcap-interfaces', 'extcap-dlts', 'extcap-config', 'capture', 'help']);

export interface ExtcapArgs {
  flags: Set<string>;
  values: Map<string, string>;
  /** --extcap-version: true without a value. */
  extcapVersion: string | true | null;
  unknown: string[];
}

/** Parses `--opt value` and `--opt=value` (Wireshark passes both forms). */
export function parseExtcapArgs(argv: string[]): ExtcapArgs {
  const out: ExtcapArgs = { flags: new Set(), values: new Map(), extcapVersion: null, unknown: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--')) {
      out.unknown.push(a);
      continue;
    }
    const eq = a.indexOf('=');
    const name = eq > 0 ? a.slice(2, eq) : a.slice(2);
    const inline = eq > 0 ? a.slice(eq + 1) : null;
    if (name === 'extcap-version') {
      if (inline !== null) out.extcapVersion = inline;
      else if (argv[i + 1] !== undefined && !argv[i + 1]!.startsWith('--')) out.extcapVersion = argv[++i]!;
      else out.extcapVersion = true;
    } else if (FLAG_OPTS.has(name)) out.flags.add(name);
    else if (VALUE_OPTS.has(name)) {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new UserError(`meshcap extcap: --${name} needs a value`);
      out.values.set(name, v);
    } else out.unknown.push(a);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The extcap protocol

export function interfacesText(): string {
  return `extcap {version=${version()}}\ninterface {value=${EXTCAP_INTERFACE}}{display=${EXTCAP_DISPLAY}}\n`;
}

export function dltsText(): string {
  return 'dlt {number=1}{name=EN10MB}{display=Ethernet (synthetic TCP/IP from meshcap)}\n';
}

/** The `arg` lines: every `call` lowercase, no network access. */
export function configText(): string {
  const args: string[][] = [
    ['--server', 'Server', 'string', 'Server', 'The meshcap serve live endpoint: tls://HOST:PORT or wss://HOST:PORT/live', '{placeholder=tls://127.0.0.1:9465}{required=true}'],
    ['--tokenfile', 'Token file', 'fileselect', 'Authentication', "File whose first line is a bearer token from the server's --live-token-file", '{mustexist=true}'],
    ['--cafile', 'Server CA certificate', 'fileselect', 'Server', 'PEM file of the CA that signed the server certificate (default: the system CAs)', '{mustexist=true}'],
    ['--certfile', 'Client certificate', 'fileselect', 'Authentication', "PEM client certificate, when the server checks client certificates (--live-ca)", '{mustexist=true}'],
    ['--keyfile', 'Client key', 'fileselect', 'Authentication', 'PEM private key of the client certificate', '{mustexist=true}'],
    ['--filter', 'Filter', 'string', 'Capture', 'Only these flows: host=ADDR[/PREFIX] port=N[-M] node=ENVOY_NODE (* wildcards) flow=TRACE_ID; same key: any of, different keys: all of', '{placeholder=host=10.0.0.5 port=443}'],
    ['--servername', 'Server name (TLS)', 'string', 'Server', 'Name to check the server certificate against when it differs from the host in Server (kubectl port-forward to 127.0.0.1)', ''],
  ];
  return args
    .map(([call, display, type, group, tooltip, extra], n) => `arg {number=${n}}{call=${call}}{display=${display}}{type=${type}}{tooltip=${tooltip}}${extra}{group=${group}}\n`)
    .join('');
}

export async function extcap(argv: string[]): Promise<number> {
  if (argv[0] === 'install') return install(argv.slice(1), false);
  if (argv[0] === 'uninstall') return install(argv.slice(1), true);
  let a: ExtcapArgs;
  try {
    a = parseExtcapArgs(argv);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 2;
  }
  if (a.flags.has('help') || argv.length === 0) {
    (argv.length === 0 ? process.stderr : process.stdout).write(EXTCAP_USAGE);
    return argv.length === 0 ? 2 : 0;
  }
  if (a.flags.has('extcap-interfaces')) {
    process.stdout.write(interfacesText());
    return 0;
  }
  const iface = a.values.get('extcap-interface');
  if (a.extcapVersion !== null && !a.flags.has('capture') && !a.flags.has('extcap-dlts') && !a.flags.has('extcap-config')) {
    process.stdout.write(`extcap {version=${version()}}\n`);
    return 0;
  }
  if (iface !== undefined && iface !== EXTCAP_INTERFACE) {
    process.stderr.write(`meshcap extcap: unknown interface "${iface}" (this program provides "${EXTCAP_INTERFACE}")\n`);
    return 1;
  }
  if (a.flags.has('extcap-dlts')) {
    process.stdout.write(dltsText());
    return 0;
  }
  if (a.flags.has('extcap-config')) {
    // --extcap-reload-option: no selector reloads; nothing to print for it.
    if (!a.values.has('extcap-reload-option')) process.stdout.write(configText());
    return 0;
  }
  if (a.flags.has('capture')) {
    try {
      return await capture(a);
    } catch (err) {
      if (err instanceof UserError) {
        process.stderr.write(`${err.message}\n`);
        return 1;
      }
      process.stderr.write(`meshcap extcap: ${(err as Error).stack ?? String(err)}\n`);
      return 1;
    }
  }
  process.stderr.write(`meshcap extcap: nothing to do\n\n${EXTCAP_USAGE}`);
  return 2;
}

// ---------------------------------------------------------------------------------------------
// Capture

interface Target {
  kind: 'tls' | 'wss';
  host: string;
  port: number;
  /** wss: path and query. */
  url: URL;
  token: string | null;
  tokenFile: string | null;
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  certFile: string | null;
  filter: string | null;
  servername: string | null;
}

/** Turns the extcap options into a connection target; UserError on anything wrong. */
export async function resolveTarget(a: ExtcapArgs): Promise<Target> {
  const server = a.values.get('server')?.trim();
  if (!server) throw new UserError('meshcap: no server given: set "Server" in the interface options (e.g. tls://127.0.0.1:9465), or -o extcap.meshcap.server:tls://HOST:PORT');
  let url: URL;
  try {
    url = new URL(server);
  } catch {
    throw new UserError(`meshcap: "Server" must look like tls://HOST:PORT or wss://HOST:PORT/live, got "${server}"`);
  }
  const kind = url.protocol === 'tls:' ? 'tls' : url.protocol === 'wss:' ? 'wss' : null;
  if (!kind) {
    throw new UserError(
      `meshcap: unsupported server scheme "${url.protocol}" in "${server}": use tls://HOST:PORT or wss://HOST:PORT/live (the live endpoint never speaks cleartext)`,
    );
  }
  const host = url.hostname.replace(/^\[|\]$/g, '');
  const port = Number(url.port || (kind === 'wss' ? 443 : 0));
  if (!host || !port) throw new UserError(`meshcap: "Server" needs a host and a port, e.g. ${kind}://127.0.0.1:9465${kind === 'wss' ? '/live' : ''}; got "${server}"`);
  if (kind === 'wss' && (url.pathname === '/' || url.pathname === '')) url.pathname = '/live';

  const readFile = async (what: string, opt: string): Promise<Buffer | undefined> => {
    const file = a.values.get(opt);
    if (!file) return undefined;
    try {
      return await fs.promises.readFile(file);
    } catch (err) {
      throw new UserError(`meshcap: cannot read ${what} (--${opt}) ${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
    }
  };
  const tokenFile = a.values.get('tokenfile') || null;
  let token: string | null = null;
  if (tokenFile) {
    const text = (await readFile('the token file', 'tokenfile'))!.toString('utf8');
    token = text.split(/\r?\n/).map((l) => l.trim()).find((l) => l !== '' && !l.startsWith('#')) ?? null;
    if (!token) throw new UserError(`meshcap: the token file ${tokenFile} holds no token (the first non-empty line that is not a # comment is used)`);
  }
  const ca = await readFile('the server CA certificate', 'cafile');
  const cert = await readFile('the client certificate', 'certfile');
  const key = await readFile('the client key', 'keyfile');
  if (!!cert !== !!key) throw new UserError('meshcap: a client certificate needs both "Client certificate" (--certfile) and "Client key" (--keyfile)');

  const filters = [a.values.get('filter'), a.values.get('extcap-capture-filter')].map((f) => f?.trim()).filter((f): f is string => !!f);
  if (filters.length === 2 && filters[0] !== filters[1]) {
    throw new UserError('meshcap: a filter was given both as "Filter" (--filter) and as the capture filter; give it in one place');
  }
  const filter = filters[0] ?? null;
  if (filter) {
    const { parseLiveFilter } = await import('../sink/live-filter.js');
    try {
      parseLiveFilter(filter);
    } catch (err) {
      throw new UserError(`meshcap: bad filter "${filter}": ${(err as Error).message}`);
    }
  }
  const t: Target = {
    kind,
    host,
    port,
    url,
    token,
    tokenFile,
    certFile: a.values.get('certfile') || null,
    filter,
    servername: a.values.get('servername') || null,
  };
  if (ca) t.ca = ca;
  if (cert) t.cert = cert;
  if (key) t.key = key;
  return t;
}

/** The data source after a successful start: the stream's first bytes, then more via onData. */
interface Source {
  first: Buffer;
  onData(cb: (chunk: Buffer) => void): void;
  onEnd(cb: (why: string | null) => void): void;
  pause(): void;
  resume(): void;
  close(): void;
}

async function capture(a: ExtcapArgs): Promise<number> {
  const fifo = a.values.get('fifo');
  if (!fifo) throw new UserError('meshcap extcap: --capture needs --fifo PATH');
  let source: Source | null = null;
  let finished = false;

  return await new Promise<number>((resolve) => {
    const finish = (code: number, message?: string): void => {
      if (finished) return;
      finished = true;
      // Said before the fifo closes: Wireshark reports the extcap's stderr when the pipe ends.
      if (message) process.stderr.write(`${message}\n`);
      source?.close();
      out.end(() => resolve(code));
      setTimeout(() => resolve(code), 500).unref();
    };
    process.once('SIGTERM', () => finish(0));
    process.once('SIGINT', () => finish(0));

    // Open the fifo first: dumpcap blocks opening its end until we open ours, also when we fail.
    const out = fs.createWriteStream(fifo, { flags: 'w' });
    out.on('error', (err: NodeJS.ErrnoException) => {
      // EPIPE: Wireshark stopped the capture and closed the fifo. That is the normal end.
      if (err.code === 'EPIPE') finish(0);
      else finish(1, `meshcap: cannot write to the capture fifo ${fifo}: ${err.message}`);
    });

    void (async () => {
      let target: Target;
      try {
        target = await resolveTarget(a);
        source = target.kind === 'tls' ? await connectRaw(target) : await connectWs(target);
      } catch (err) {
        finish(1, err instanceof UserError ? err.message : `meshcap: ${(err as Error).message}`);
        return;
      }
      if (finished) {
        source.close();
        return;
      }
      const s = source;
      const o = out;
      let waiting = false;
      const write = (chunk: Buffer): void => {
        if (finished) return;
        if (!o.write(chunk) && !waiting) {
          // Wireshark is not reading: stop reading the server until it does.
          waiting = true;
          s.pause();
          o.once('drain', () => {
            waiting = false;
            s.resume();
          });
        }
      };
      write(s.first);
      s.onData(write);
      s.onEnd((why) =>
        finish(
          1,
          why ??
            `meshcap: the server ended the live stream (${target.kind}://${target.host}:${target.port}): meshcap serve stopped, or this viewer fell behind and was disconnected (see the server's audit log)`,
        ),
      );
    })();
  });
}

/** Explains a connection-level failure in words a user can act on. */
export function explainConnectError(err: NodeJS.ErrnoException, t: { host: string; port: number; kind: string }): string {
  const where = `${t.host}:${t.port}`;
  const code = err.code ?? '';
  switch (code) {
    case 'ECONNREFUSED':
      return `meshcap: cannot connect to ${where}: connection refused. Is \`meshcap serve --live-listen\` running on that address (and kubectl port-forward up, if you use one)?`;
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return `meshcap: cannot resolve the server host "${t.host}": check "Server".`;
    case 'ETIMEDOUT':
    case 'ETIMEOUT':
      return `meshcap: no answer from ${where} within ${CONNECT_TIMEOUT_MS / 1000} s: check "Server" and that the port is reachable.`;
    case 'ECONNRESET':
      return `meshcap: ${where} closed the connection during the TLS handshake: is it the live endpoint (--live-listen), not the gRPC or metrics port?`;
    case 'ERR_TLS_CERT_ALTNAME_INVALID':
      return `meshcap: the server certificate is not valid for "${t.host}" (${err.message}): set "Server name (TLS)" (--servername) to a name in the certificate, e.g. when connecting through kubectl port-forward.`;
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'CERT_SIGNATURE_FAILURE':
      return `meshcap: the server certificate of ${where} is not trusted (${code}): set "Server CA certificate" (--cafile) to the CA that signed the server's --live-cert.`;
    case 'CERT_HAS_EXPIRED':
    case 'CERT_NOT_YET_VALID':
      return `meshcap: the server certificate of ${where} is expired or not yet valid (${code}): renew the server's --live-cert (or check this machine's clock).`;
    case 'EPROTO':
    case 'ERR_SSL_WRONG_VERSION_NUMBER':
      return `meshcap: ${where} did not answer with TLS (${err.message.split('\n')[0]}): is it the live endpoint (--live-listen)?`;
    default:
      if (/wrong version number|packet length too long|unknown protocol/i.test(err.message)) {
        return `meshcap: ${where} did not answer with TLS: is it the live endpoint (--live-listen), not the gRPC or metrics port?`;
      }
      if (/certificate|alert/i.test(err.message)) {
        return `meshcap: TLS with ${where} failed: ${err.message.split('\n')[0]}. Check "Server CA certificate", "Client certificate" and "Client key".`;
      }
      return `meshcap: connection to ${where} failed: ${err.message.split('\n')[0]}`;
  }
}

/** Explains the server's refusal (status and reason of MESHCAP-LIVE/1 or of the HTTP answer). */
export function explainRefusal(status: number, reason: string, message: string, t: { tokenFile: string | null; certFile: string | null }): string {
  const base = `meshcap: the server refused this viewer (${status} ${reason}): ${message}.`;
  switch (reason) {
    case 'no_token':
      return `${base} Set "Token file" (--tokenfile) to a file holding one of the tokens of the server's --live-token-file.`;
    case 'bad_token':
      return `${base} The token in ${t.tokenFile ?? 'the token file'} is not one of the server's: check it against the server's --live-token-file.`;
    case 'no_client_cert':
      return `${base} Set "Client certificate" and "Client key" (--certfile, --keyfile) to a certificate signed by the CA of the server's --live-ca.`;
    case 'bad_client_cert':
      return `${base} The client certificate ${t.certFile ?? ''} must be signed by the CA of the server's --live-ca (and be valid now).`;
    case 'no_credentials':
      return `${base} Set "Token file" (--tokenfile), or "Client certificate" and "Client key".`;
    case 'bad_filter':
      return `${base} Fix "Filter" (syntax: host=ADDR port=N node=NAME flow=ID).`;
    case 'too_many_viewers':
      return `${base} Close another viewer, or raise --live-max-viewers on the server.`;
    default:
      return base;
  }
}

async function connectRaw(t: Target): Promise<Source> {
  const tls = await import('node:tls');
  const net = await import('node:net');
  const { requestLine } = await import('../sink/live-server.js');
  return await new Promise<Source>((resolve, reject) => {
    const servername = t.servername ?? (net.isIP(t.host) ? undefined : t.host);
    const socket = tls.connect({
      host: t.host,
      port: t.port,
      ...(servername ? { servername } : {}),
      ...(t.ca ? { ca: t.ca } : {}),
      ...(t.cert ? { cert: t.cert, key: t.key } : {}),
      minVersion: 'TLSv1.2',
    });
    let buf: Buffer = Buffer.alloc(0);
    let settled = false;
    const fail = (msg: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      reject(new UserError(msg));
    };
    const timer = setTimeout(() => fail(explainConnectError(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' }), t)), CONNECT_TIMEOUT_MS);
    socket.on('error', (err: NodeJS.ErrnoException) => fail(explainConnectError(err, t)));
    socket.on('secureConnect', () => {
      socket.write(requestLine({ token: t.token, filter: t.filter, client: `meshcap-extcap/${version()}` }));
    });
    const onData = (chunk: Buffer): void => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      if (buf.length < 4) return;
      if (buf.subarray(0, 4).equals(SHB_MAGIC)) {
        settled = true;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.off('end', onEarlyEnd);
        socket.pause();
        const first = buf;
        resolve(rawSource(socket, first));
        return;
      }
      const nl = buf.indexOf(0x0a);
      if (nl < 0 && buf.length < 4096) return;
      const line = buf.toString('utf8', 0, nl < 0 ? buf.length : nl).replace(/\r$/, '');
      const m = /^MESHCAP-LIVE\/\d+ (\d{3}) (\S+) ?(.*)$/.exec(line);
      if (m) fail(explainRefusal(Number(m[1]), m[2]!, m[3]!, t));
      else fail(`meshcap: ${t.host}:${t.port} answered something that is not a meshcap live stream ("${line.slice(0, 60)}"): check "Server".`);
    };
    const onEarlyEnd = (): void =>
      fail(`meshcap: ${t.host}:${t.port} closed the connection without answering: check the client certificate and that "Server" is the live endpoint.`);
    socket.on('data', onData);
    socket.on('end', onEarlyEnd);
  });
}

function rawSource(socket: import('node:tls').TLSSocket, first: Buffer): Source {
  let ended = false;
  let endCb: ((why: string | null) => void) | null = null;
  const end = (why: string | null): void => {
    if (ended) return;
    ended = true;
    endCb?.(why);
  };
  socket.on('end', () => end(null));
  socket.on('close', () => end(null));
  socket.on('error', (err) => end(`meshcap: the live stream failed: ${err.message}`));
  return {
    first,
    onData: (cb) => {
      socket.on('data', cb);
      socket.resume();
    },
    onEnd: (cb) => {
      endCb = cb;
    },
    pause: () => socket.pause(),
    resume: () => socket.resume(),
    close: () => {
      ended = true;
      socket.destroy();
    },
  };
}

async function connectWs(t: Target): Promise<Source> {
  const { WebSocket } = await import('ws');
  const net = await import('node:net');
  const url = new URL(t.url.href);
  if (t.filter) url.searchParams.set('filter', t.filter);
  url.searchParams.set('client', `meshcap-extcap/${version()}`);
  return await new Promise<Source>((resolve, reject) => {
    const servername = t.servername ?? (net.isIP(t.host) ? undefined : t.host);
    const ws = new WebSocket(url, ['meshcap-live'], {
      ...(t.token ? { headers: { Authorization: `Bearer ${t.token}` } } : {}),
      ...(servername ? { servername } : {}),
      ...(t.ca ? { ca: t.ca } : {}),
      ...(t.cert ? { cert: t.cert, key: t.key } : {}),
      perMessageDeflate: false,
      handshakeTimeout: CONNECT_TIMEOUT_MS,
    });
    let settled = false;
    const fail = (msg: string): void => {
      if (settled) return;
      settled = true;
      ws.terminate();
      reject(new UserError(msg));
    };
    ws.on('unexpected-response', (_req, res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d.slice(0, 2048)));
      res.on('end', () => {
        const reason = String(res.headers['x-meshcap-refusal'] ?? '');
        const text = body.trim() || res.statusMessage || '';
        if (reason) fail(explainRefusal(res.statusCode ?? 0, reason, text, t));
        else fail(`meshcap: ${t.url.href} answered HTTP ${res.statusCode} ${text}: check "Server" (the WebSocket endpoint is wss://HOST:PORT/live).`);
      });
    });
    ws.on('error', (err: NodeJS.ErrnoException) => {
      if (err.message.startsWith('Opening handshake has timed out')) fail(explainConnectError(Object.assign(err, { code: 'ETIMEDOUT' }), t));
      else fail(explainConnectError(err, t));
    });
    ws.once('message', (first: Buffer) => {
      if (!first.subarray(0, 4).equals(SHB_MAGIC)) return fail(`meshcap: ${t.url.href} sent something that is not a pcapng stream: check "Server".`);
      settled = true;
      ws.pause();
      let ended = false;
      let endCb: ((why: string | null) => void) | null = null;
      const end = (why: string | null): void => {
        if (ended) return;
        ended = true;
        endCb?.(why);
      };
      ws.on('close', (code, reason) =>
        end(code === 1001 && reason.length ? `meshcap: the server ended the live stream: ${reason.toString()}` : null),
      );
      resolve({
        first,
        onData: (cb) => {
          ws.on('message', (d: Buffer) => cb(d));
          ws.resume();
        },
        onEnd: (cb) => {
          endCb = cb;
        },
        pause: () => ws.pause(),
        resume: () => ws.resume(),
        close: () => {
          ended = true;
          ws.terminate();
        },
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Installation

export interface ExtcapDirChoice {
  dir: string;
  /** How it was chosen, for the user. */
  how: string;
}

/**
 * The personal extcap folder, from `tshark -G folders` output (null when tshark was not run):
 * "Personal Extcap path" when tshark prints it; otherwise by version (docs/live.md) — Wireshark
 * up to 4.0 uses <Personal configuration>/extcap (~/.config/wireshark/extcap), 4.1 and later
 * ~/.local/lib/wireshark/extcap.
 */
export function chooseExtcapDir(folders: string | null, env: NodeJS.ProcessEnv, versionText: string | null = null): ExtcapDirChoice {
  const home = env.HOME || os.homedir();
  const field = (name: string): string | null => {
    const m = new RegExp(`^${name}:\\s*(.+?)\\s*$`, 'm').exec(folders ?? '');
    return m ? m[1]! : null;
  };
  const personalExtcap = field('Personal Extcap path');
  if (personalExtcap) return { dir: personalExtcap, how: 'tshark -G folders: Personal Extcap path' };
  let ver: [number, number] | null = null;
  const vm = /(\d+)\.(\d+)(?:\.\d+)?/.exec(versionText ?? '') ?? /plugins\/(\d+)\.(\d+)\s*$/m.exec(field('Personal Plugins') ?? '');
  if (vm) ver = [Number(vm[1]), Number(vm[2])];
  const newLayout = ver !== null && (ver[0] > 4 || (ver[0] === 4 && ver[1] >= 1));
  if (newLayout) return { dir: path.join(home, '.local', 'lib', 'wireshark', 'extcap'), how: `Wireshark ${ver!.join('.')}: ~/.local/lib/wireshark/extcap` };
  const personalConf = field('Personal configuration');
  if (personalConf) return { dir: path.join(personalConf, 'extcap'), how: `Wireshark ${ver ? ver.join('.') : '<= 4.0'}: <Personal configuration>/extcap` };
  const xdg = env.XDG_CONFIG_HOME || path.join(home, '.config');
  return { dir: path.join(xdg, 'wireshark', 'extcap'), how: 'tshark not found: the Wireshark <= 4.0 default' };
}

function runTshark(tshark: string, args: string[]): Promise<string | null> {
  return new Promise((resolve) => {
    execFile(tshark, args, { timeout: 30_000, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } }, (err, stdout) => resolve(err ? null : stdout));
  });
}

/** The script Wireshark runs: node + this module, absolute paths, arguments passed through. */
export function launcherScript(node: string, entry: string): string {
  const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  return `#!/bin/sh\n# meshcap extcap launcher, written by \`meshcap extcap install\`. Wireshark runs it to list and\n# capture from the "meshcap" interface (meshcap live plaintext capture).\nexec ${q(node)} ${q(entry)} "$@"\n`;
}

/** dist/src/cli/extcap.js, also when this runs from the TypeScript sources (tests). */
function entryScript(): string {
  const self = fileURLToPath(import.meta.url);
  if (self.endsWith('.js')) return self;
  return path.resolve(path.dirname(self), '..', '..', 'dist', 'src', 'cli', 'extcap.js');
}

async function install(argv: string[], remove: boolean): Promise<number> {
  let a: ExtcapArgs;
  try {
    a = parseExtcapArgs(argv);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 2;
  }
  if (a.flags.has('help') || a.unknown.length > 0) {
    if (a.unknown.length) process.stderr.write(`meshcap extcap ${remove ? 'uninstall' : 'install'}: unknown argument ${a.unknown[0]}\n`);
    process.stderr.write(EXTCAP_USAGE);
    return a.unknown.length ? 2 : 0;
  }
  let choice: ExtcapDirChoice;
  const dirFlag = a.values.get('dir');
  if (dirFlag) choice = { dir: path.resolve(dirFlag), how: '--dir' };
  else {
    const tshark = a.values.get('tshark') ?? 'tshark';
    const folders = await runTshark(tshark, ['-G', 'folders']);
    const ver = folders && /Personal Extcap path:/.test(folders) ? null : await runTshark(tshark, ['--version']);
    choice = chooseExtcapDir(folders, process.env, ver?.split('\n')[0] ?? null);
  }
  const file = path.join(choice.dir, LAUNCHER_NAME);
  if (remove) {
    try {
      fs.unlinkSync(file);
      process.stdout.write(`removed ${file}\n`);
    } catch (err) {
      process.stderr.write(`meshcap: cannot remove ${file}: ${(err as Error).message}\n`);
      return 1;
    }
    return 0;
  }
  const entry = entryScript();
  if (!fs.existsSync(entry)) {
    process.stderr.write(`meshcap: ${entry} is missing: run \`npm run build\` in the meshcap checkout first\n`);
    return 1;
  }
  try {
    fs.mkdirSync(choice.dir, { recursive: true, mode: 0o755 });
    const tmp = `${file}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, launcherScript(process.execPath, entry), { mode: 0o755 });
    fs.renameSync(tmp, file);
  } catch (err) {
    process.stderr.write(`meshcap: cannot write the extcap launcher into ${choice.dir}: ${(err as Error).message}\n`);
    return 1;
  }
  process.stdout.write(
    `installed ${file} (${choice.how})\n` +
      `Restart Wireshark: the interface "${EXTCAP_INTERFACE}" (${EXTCAP_DISPLAY}) is in the capture list; set Server,\n` +
      `Token file and Server CA certificate in its options (gear icon). With tshark:\n` +
      `  tshark -i ${EXTCAP_INTERFACE} -o extcap.${EXTCAP_INTERFACE}.server:tls://127.0.0.1:9465 -o extcap.${EXTCAP_INTERFACE}.tokenfile:TOKEN_FILE \\\n` +
      `         -o extcap.${EXTCAP_INTERFACE}.cafile:CA.pem\n`,
  );
  return 0;
}

// Run directly (by the launcher): `node dist/src/cli/extcap.js --extcap-interfaces`.
const invoked = process.argv[1] ? safeRealpath(process.argv[1]) : null;
if (invoked && invoked === safeRealpath(fileURLToPath(import.meta.url))) {
  void extcap(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
    // A fifo open still blocked in the thread pool must not keep the process alive.
    setTimeout(() => process.exit(code), 100).unref();
  });
}

function safeRealpath(p: string): string | null {
  try {
    return fs.realpathSync(p);
  } catch {
    return null;
  }
}
