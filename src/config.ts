/**
 * Configuration for `meshcap serve` and `meshcap convert`: embedded defaults, then a JSON config
 * file (--config), then MESHCAP_* environment variables, then command-line flags (tcpdump/dumpcap
 * style where one exists). Every value is validated, and an error names the field and where it came
 * from. Nothing here is consulted on the packet path: the result is a plain object.
 */
import fs from 'node:fs';
import path from 'node:path';
import { validateAdminUrl } from './ingest/admin-tap-client.js';
import { parseUdpListen } from './ingest/udp-tap-listener.js';
import { resolveBrokerConfig, type BrokerConfig, type BrokerFlagValues } from './sink/broker-sink.js';
import { liveConfigProblem, type LiveConfig } from './sink/live-server.js';
import { ConfigError, parseFlags, type OptionSpec } from './flags.js';

export const SERVE_OPTIONS: OptionSpec[] = [
  { name: 'grpc-listen', kind: 'list', help: 'StreamTaps listener: unix:/path or host:port (repeatable)' },
  { name: 'write', short: 'w', kind: 'string', help: "capture file (pcapng by default), or '-' for standard output" },
  { name: 'file-size', short: 'C', kind: 'int', min: 0, max: 1_000_000, help: 'rotate when a file reaches this many MB (10^6 bytes); 0 = off' },
  { name: 'rotate-seconds', short: 'G', kind: 'int', min: 0, max: 31_536_000, help: 'rotate every this many seconds; 0 = off' },
  { name: 'ring', short: 'W', kind: 'int', min: 0, max: 1_000_000, help: 'keep at most this many files (ring buffer); 0 = keep all' },
  { name: 'snaplen', short: 's', kind: 'int', min: 0, max: 262_144, help: 'bytes kept of each frame (0 = 262144); the original length is recorded' },
  { name: 'autostop', short: 'a', kind: 'list', help: 'stop after duration:SECONDS, files:N or packets:N (repeatable, like dumpcap)' },
  { name: 'format', kind: 'string', choices: ['pcapng', 'pcap', 'pcap-ns'], help: 'file format: pcapng (ns timestamps, comments), pcap (µs) or pcap-ns' },
  { name: 'mss', kind: 'int', min: 88, max: 65495, help: 'segment size for IPv4 flows (IPv6 flows use it minus 20 unless --mss6)' },
  { name: 'mss6', kind: 'int', min: 68, max: 65475, help: 'segment size for IPv6 flows' },
  { name: 'metrics-listen', kind: 'string', help: "host:port for /metrics, /healthz, /readyz, or 'off'" },
  { name: 'flush-interval', kind: 'int', min: 10, max: 1000, help: 'milliseconds between flushes of buffered packets to the sinks (at most 1000)' },
  { name: 'idle-timeout', kind: 'int', min: 1, max: 86_400, help: 'seconds without events after which a flow is freed' },
  { name: 'max-flows', kind: 'int', min: 1, max: 10_000_000, help: 'open flows tracked at most; new ones beyond are refused and counted' },
  { name: 'max-message-size', kind: 'int', min: 65_536, max: 1_073_741_824, help: 'largest tap message accepted, in bytes' },
  { name: 'buffer-size', kind: 'int', min: 1, max: 1024, help: 'output buffer in MiB (split into blocks handed to the sinks)' },
  { name: 'log-level', kind: 'string', choices: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], help: 'log level' },
  { name: 'config', kind: 'string', help: 'JSON file with any of these options (kebab-case keys)' },
  // Doors for stock Envoy (docs/stock-envoy.md).
  { name: 'envoy-admin', kind: 'list', help: 'attach to Envoy admin /tap at this URL, e.g. http://127.0.0.1:15000 (loopback only; repeatable)' },
  { name: 'tap-config-id', kind: 'list', help: 'admin_config.config_id of the tap to attach to, with --envoy-admin (repeatable)' },
  { name: 'admin-max-buffered-bytes', kind: 'int', min: 1024, max: 4_294_967_295, help: "max_buffered_rx/tx_bytes asked of Envoy through /tap (Envoy's own default, 1 KiB, cuts bodies)" },
  { name: 'udp-listen', kind: 'list', help: 'receive the contrib UDP tap sink on this loopback HOST:PORT (repeatable)' },
  { name: 'watch', kind: 'list', help: 'follow file_per_tap outputs written into this directory (repeatable)' },
  // Live viewers (docs/live.md).
  { name: 'live-listen', kind: 'string', help: 'live endpoint HOST:PORT (TLS: raw pcapng stream and WebSocket /live); needs --live-cert, --live-key and --live-token-file and/or --live-ca' },
  { name: 'live-cert', kind: 'string', help: 'PEM certificate (chain) of the live endpoint' },
  { name: 'live-key', kind: 'string', help: 'PEM private key of the live endpoint' },
  { name: 'live-token-file', kind: 'string', help: 'bearer tokens of live viewers, one per line (re-read when it changes)' },
  { name: 'live-ca', kind: 'string', help: 'PEM CA bundle: live viewers present a client certificate signed by it' },
  { name: 'live-auth', kind: 'string', choices: ['all', 'any'], help: 'with both --live-token-file and --live-ca: require both (all) or either (any)' },
  { name: 'live-insecure-loopback', kind: 'string', help: '[HOST:]PORT on loopback only: UNAUTHENTICATED cleartext PCAP-over-IP (classic pcap) for Arkime/NetworkMiner' },
  { name: 'live-viewer-buffer', kind: 'int', min: 1, max: 1024, help: 'MiB queued per live viewer before it is disconnected as slow' },
  { name: 'live-max-viewers', kind: 'int', min: 1, max: 1024, help: 'live viewers at a time' },
  // Packet brokers over mutual TLS (docs/broker.md).
  { name: 'broker', kind: 'list', help: 'forward captures to a packet broker or meshcap collect: tls://HOST:PORT (repeatable; mutual TLS only)' },
  { name: 'broker-mode', kind: 'string', choices: ['failover', 'spread'], help: 'failover: the first broker that answers, in order; spread: flows hashed over all brokers' },
  { name: 'broker-format', kind: 'string', choices: ['pcap', 'pcapng', 'pcap-ns'], help: 'broker stream format (default pcap: µs, Ethernet, what Arkime reads)' },
  { name: 'broker-spiffe-id', kind: 'string', help: 'verify the broker by this SPIFFE ID (URI SAN; * and ** globs) instead of its host name' },
  { name: 'tls-cert', kind: 'string', help: 'PEM certificate presented to brokers (reloaded when it changes)' },
  { name: 'tls-key', kind: 'string', help: 'PEM private key of --tls-cert' },
  { name: 'tls-ca', kind: 'string', help: 'PEM CA bundle the broker certificate must chain to' },
  { name: 'spool-dir', kind: 'string', help: 'directory for packets waiting for a broker (default ./spool)' },
  { name: 'spool-max', kind: 'string', help: 'spool cap: bytes, or 512M, 2G; 0 = memory only (default 1G)' },
  { name: 'broker-queue', kind: 'string', help: 'memory queue before the spool takes over (default 64M)' },
  { name: 'broker-replay-window', kind: 'string', help: "plain brokers: bytes resent after a broken connection, or 'auto' (default)" },
];

export interface ServeConfig {
  grpcListen: string[];
  write: string;
  fileSizeMB: number;
  rotateSeconds: number;
  ring: number;
  snaplen: number;
  autostop: { durationSec: number; files: number; packets: number };
  format: 'pcapng' | 'pcap' | 'pcap-ns';
  mss: number;
  mss6: number;
  metricsListen: string | null;
  flushIntervalMs: number;
  idleTimeoutSec: number;
  maxFlows: number;
  maxMessageBytes: number;
  bufferMiB: number;
  logLevel: string;
  /** Admin /tap door: every URL × every config id. */
  envoyAdmin: string[];
  tapConfigIds: string[];
  adminMaxBufferedBytes: number;
  udpListen: string[];
  /** Directories, absolute. */
  watch: string[];
  live: LiveConfig;
  /** Broker sink, or null without --broker. */
  broker: BrokerConfig | null;
}

/** The embedded defaults: `meshcap serve` with no flags runs on these. */
export function defaultServeValues(cwd: string): Record<string, unknown> {
  return {
    'grpc-listen': [`unix:${path.join(cwd, 'meshcap.sock')}`],
    write: path.join(cwd, 'captures', 'meshcap.pcapng'),
    'file-size': 0,
    'rotate-seconds': 0,
    ring: 0,
    snaplen: 0,
    autostop: [],
    format: 'pcapng',
    mss: 1460,
    'metrics-listen': '127.0.0.1:9464',
    'flush-interval': 250,
    'idle-timeout': 300,
    'max-flows': 1_000_000,
    'max-message-size': 16 * 1024 * 1024,
    'buffer-size': 32,
    'log-level': 'info',
    'envoy-admin': [],
    'tap-config-id': [],
    'admin-max-buffered-bytes': 1024 * 1024,
    'udp-listen': [],
    watch: [],
    'live-auth': 'all',
    'live-viewer-buffer': 8,
    'live-max-viewers': 16,
  };
}

/** Reads flags, environment and config file into a validated ServeConfig. */
export function loadServeConfig(argv: string[], env: NodeJS.ProcessEnv, cwd: string): ServeConfig {
  const flags = parseFlags(argv, SERVE_OPTIONS);
  const values: Record<string, unknown> = { ...defaultServeValues(cwd) };
  const origin: Record<string, string> = {};
  for (const k of Object.keys(values)) origin[k] = 'default';

  const configPath = (flags.config as string | undefined) ?? env.MESHCAP_CONFIG;
  if (configPath) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(fs.readFileSync(configPath, 'utf8'));
    } catch (err) {
      throw new ConfigError(`config file ${configPath}: ${(err as Error).message}`);
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new ConfigError(`config file ${configPath}: expected a JSON object`);
    for (const [key, raw] of Object.entries(parsed)) {
      const spec = SERVE_OPTIONS.find((o) => o.name === key);
      if (!spec || key === 'config') throw new ConfigError(`config file ${configPath}: unknown field "${key}"`);
      values[key] = coerce(spec, raw, `config file ${configPath}, field "${key}"`);
      origin[key] = 'config file';
    }
  }
  for (const spec of SERVE_OPTIONS) {
    const envName = `MESHCAP_${spec.name.toUpperCase().replace(/-/g, '_')}`;
    const raw = env[envName];
    if (raw === undefined || raw === '' || spec.name === 'config') continue;
    values[spec.name] = coerce(spec, spec.kind === 'list' ? raw.split(',').map((s) => s.trim()).filter(Boolean) : raw, `environment variable ${envName}`);
    origin[spec.name] = 'environment';
  }
  for (const spec of SERVE_OPTIONS) {
    if (flags[spec.name] === undefined || spec.name === 'config') continue;
    values[spec.name] = coerce(spec, flags[spec.name], `flag --${spec.name}${spec.short ? ` (-${spec.short})` : ''}`);
    origin[spec.name] = 'flag';
  }

  const mss = values.mss as number;
  const autostop = parseAutostop(values.autostop as string[]);
  const listen = values['grpc-listen'] as string[];
  for (const target of listen) validateListen(target);
  const metrics = values['metrics-listen'] as string;
  const envoyAdmin = values['envoy-admin'] as string[];
  const tapConfigIds = values['tap-config-id'] as string[];
  if (envoyAdmin.length > 0 && tapConfigIds.length === 0) throw new ConfigError('"envoy-admin" needs at least one --tap-config-id (the admin_config.config_id of the tap to attach to)');
  if (tapConfigIds.length > 0 && envoyAdmin.length === 0) throw new ConfigError('"tap-config-id" needs --envoy-admin (the Envoy admin URL, e.g. http://127.0.0.1:15000)');
  for (const url of envoyAdmin) {
    try {
      validateAdminUrl(url);
    } catch (err) {
      throw new ConfigError((err as Error).message);
    }
  }
  const udpListen = values['udp-listen'] as string[];
  for (const target of udpListen) {
    try {
      parseUdpListen(target);
    } catch (err) {
      throw new ConfigError((err as Error).message);
    }
  }
  const live: LiveConfig = {
    listen: (values['live-listen'] as string | undefined) ?? null,
    cert: (values['live-cert'] as string | undefined) ?? null,
    key: (values['live-key'] as string | undefined) ?? null,
    ca: (values['live-ca'] as string | undefined) ?? null,
    tokenFile: (values['live-token-file'] as string | undefined) ?? null,
    authMode: values['live-auth'] as 'all' | 'any',
    insecureLoopback: (values['live-insecure-loopback'] as string | undefined) ?? null,
    viewerBufferMiB: values['live-viewer-buffer'] as number,
    maxViewers: values['live-max-viewers'] as number,
  };
  const liveProblem = liveConfigProblem(live);
  if (liveProblem) throw new ConfigError(liveProblem);
  return {
    live,
    broker: brokerConfig(values, cwd),
    grpcListen: listen,
    write: values.write as string,
    fileSizeMB: values['file-size'] as number,
    rotateSeconds: values['rotate-seconds'] as number,
    ring: values.ring as number,
    snaplen: (values.snaplen as number) || 262144,
    autostop,
    format: values.format as ServeConfig['format'],
    mss,
    mss6: (values.mss6 as number | undefined) ?? Math.max(68, mss - 20),
    metricsListen: metrics === 'off' ? null : metrics,
    flushIntervalMs: values['flush-interval'] as number,
    idleTimeoutSec: values['idle-timeout'] as number,
    maxFlows: values['max-flows'] as number,
    maxMessageBytes: values['max-message-size'] as number,
    bufferMiB: values['buffer-size'] as number,
    logLevel: values['log-level'] as string,
    envoyAdmin,
    tapConfigIds,
    adminMaxBufferedBytes: values['admin-max-buffered-bytes'] as number,
    udpListen,
    watch: (values.watch as string[]).map((d) => path.resolve(cwd, d)),
  };
}

function coerce(spec: OptionSpec, raw: unknown, where: string): unknown {
  switch (spec.kind) {
    case 'int': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && /^\s*-?\d+\s*$/.test(raw) ? Number(raw) : NaN;
      if (!Number.isInteger(n)) throw new ConfigError(`${where}: "${spec.name}" must be an integer, got ${JSON.stringify(raw)}`);
      if ((spec.min !== undefined && n < spec.min) || (spec.max !== undefined && n > spec.max)) {
        throw new ConfigError(`${where}: "${spec.name}" must be between ${spec.min} and ${spec.max}, got ${n}`);
      }
      return n;
    }
    case 'bool':
      if (typeof raw === 'boolean') return raw;
      if (raw === 'true' || raw === '1') return true;
      if (raw === 'false' || raw === '0') return false;
      throw new ConfigError(`${where}: "${spec.name}" must be true or false, got ${JSON.stringify(raw)}`);
    case 'list': {
      const list = Array.isArray(raw) ? raw : [raw];
      if (!list.every((x) => typeof x === 'string' && x.length > 0)) throw new ConfigError(`${where}: "${spec.name}" must be a list of non-empty strings`);
      return list;
    }
    default:
      if (typeof raw !== 'string' || raw === '') throw new ConfigError(`${where}: "${spec.name}" must be a non-empty string`);
      if (spec.choices && !spec.choices.includes(raw)) throw new ConfigError(`${where}: "${spec.name}" must be one of ${spec.choices.join(', ')}, got "${raw}"`);
      return raw;
  }
}

function brokerConfig(values: Record<string, unknown>, cwd: string): BrokerConfig | null {
  try {
    return resolveBrokerConfig(values as BrokerFlagValues, cwd);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
}

function parseAutostop(items: string[]): ServeConfig['autostop'] {
  const out = { durationSec: 0, files: 0, packets: 0 };
  for (const item of items) {
    const m = /^(duration|files|packets):(\d+)$/.exec(item);
    if (!m || Number(m[2]) <= 0) throw new ConfigError(`"autostop" (-a): expected duration:SECONDS, files:N or packets:N with N > 0, got "${item}"`);
    if (m[1] === 'duration') out.durationSec = Number(m[2]);
    else if (m[1] === 'files') out.files = Number(m[2]);
    else out.packets = Number(m[2]);
  }
  return out;
}

function validateListen(target: string): void {
  if (target.startsWith('unix:')) {
    if (target.length <= 5) throw new ConfigError(`"grpc-listen": unix: needs a socket path, got "${target}"`);
    return;
  }
  if (!/^(\[[0-9a-fA-F:.]+\]|[^:]+):\d{1,5}$/.test(target)) throw new ConfigError(`"grpc-listen": expected unix:/path or host:port, got "${target}"`);
}
