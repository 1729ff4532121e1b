/**
 * The UDP door: receives Envoy's contrib UDP tap sink (`envoy.tap_sinks.udp_sink`, Envoy >= 1.34,
 * contrib builds only), configured as `OutputSink.custom_sink`.
 *
 * Envoy sends one TraceWrapper per datagram (contrib/tap_sinks/udp_sink/source/udp_sink_impl.cc):
 *  - JSON_BODY_AS_BYTES / JSON_BODY_AS_STRING: pretty-printed JSON (default values omitted);
 *  - PROTO_BINARY: the binary message;
 *  - PROTO_TEXT: text format;
 *  - PROTO_BINARY_LENGTH_DELIMITED is not supported by the sink (nothing is sent).
 * Streamed events with large bodies are split by Envoy into several traces (at most 47104 body
 * bytes, 63488 for strings, each), whose timestamps' nanos are bumped by 1, 2, ...: each piece is an
 * ordinary event here. Datagrams up to 64 KiB are expected, so the socket gets a large receive
 * buffer (the kernel caps it at net.core.rmem_max; the effective size is logged).
 *
 * The format of each datagram is told from its first bytes: `{` → JSON; a field name → text;
 * anything else → binary. Envoy sends from one socket per sink, and trace ids are per Envoy
 * process, so each sender address (ip:port) is its own node namespace. Bad datagrams are counted
 * and logged through the handler; the listener never throws on input.
 *
 * Only loopback addresses are accepted for listening: the plaintext of tapped connections travels
 * in these datagrams, unauthenticated.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import type { Logger } from 'pino';
import { isLoopbackHost } from './admin-tap-client.js';
import type { StreamIdentity, TapEventHandler } from './tap-event.js';
import { parseTextTraces } from './textproto.js';
import { TraceDecoder } from './trace-decoder.js';
import { jsonTraceToBinary } from './trace-json.js';

export const UDP_SOURCE = 'udp';
export const DEFAULT_UDP_RECV_BUFFER = 8 * 1024 * 1024;
/** Sender identities kept; beyond this the oldest is forgotten (it is recreated if it sends again). */
const MAX_SENDERS = 4096;

export interface UdpTapListenerOptions {
  /** HOST:PORT or [V6]:PORT, loopback only; port 0 picks a free port. */
  listen: string;
  /** SO_RCVBUF to ask for (default 8 MiB). */
  recvBufferBytes?: number;
}

export interface UdpListenerCounters {
  datagrams: number;
  bytes: number;
  accepted: number;
  rejected: number;
  json: number;
  binary: number;
  text: number;
}

export type DatagramFormat = 'json' | 'binary' | 'text';

const TEXT_START = /^[A-Za-z_][A-Za-z0-9_]*\s*[:{<]/;

/** How a datagram is encoded, from its first bytes. */
export function detectDatagramFormat(buf: Buffer): DatagramFormat {
  let i = 0;
  while (i < buf.length && (buf[i] === 0x20 || buf[i] === 0x09 || buf[i] === 0x0a || buf[i] === 0x0d)) i++;
  if (i < buf.length && buf[i] === 0x7b /* { */) {
    // 0x7b can't start a binary TraceWrapper (field 15, group); after leading whitespace (0x0a is
    // also a protobuf tag) the datagram must end like JSON too.
    if (i === 0) return 'json';
    let j = buf.length - 1;
    while (j > i && (buf[j] === 0x20 || buf[j] === 0x09 || buf[j] === 0x0a || buf[j] === 0x0d)) j--;
    if (buf[j] === 0x7d /* } */) return 'json';
  }
  if (i < buf.length && TEXT_START.test(buf.toString('latin1', i, Math.min(buf.length, i + 128)))) return 'text';
  return 'binary';
}

/** Parses HOST:PORT / [V6]:PORT; throws with a clear message. */
export function parseUdpListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:\s]+)):(\d{1,5})$/.exec(text);
  if (!m) throw new Error(`--udp-listen: expected HOST:PORT or [V6]:PORT, got "${text}"`);
  const host = (m[1] ?? m[2])!;
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`--udp-listen: port ${port} is out of range`);
  if (!isLoopbackHost(host)) {
    throw new Error(
      `--udp-listen: refusing "${text}": tap datagrams carry the plaintext of tapped connections without authentication, ` +
        'so meshcap only listens on loopback (127.0.0.1 or [::1]); run it next to Envoy.',
    );
  }
  return { host: host === 'localhost' ? '127.0.0.1' : host, port };
}

export class UdpTapListener {
  readonly counters: UdpListenerCounters = { datagrams: 0, bytes: 0, accepted: 0, rejected: 0, json: 0, binary: 0, text: 0 };
  private readonly socket: dgram.Socket;
  private readonly decoder: TraceDecoder;
  private readonly senders = new Map<string, StreamIdentity>();
  private readonly host: string;
  private readonly port: number;
  private bound = '';
  private closed = false;

  constructor(
    private readonly opts: UdpTapListenerOptions,
    private readonly handler: TapEventHandler,
    private readonly log: Logger,
  ) {
    const { host, port } = parseUdpListen(opts.listen);
    this.host = host;
    this.port = port;
    this.decoder = new TraceDecoder(handler);
    this.socket = dgram.createSocket({
      type: net.isIPv6(host) ? 'udp6' : 'udp4',
      recvBufferSize: opts.recvBufferBytes ?? DEFAULT_UDP_RECV_BUFFER,
    });
    this.socket.on('message', (msg, rinfo) => this.onDatagram(msg, rinfo));
    this.socket.on('error', (err) => {
      // After bind, socket errors are not fatal to meshcap: log and keep the process up.
      if (this.bound) this.log.error({ listen: this.bound, err: err.message }, 'UDP tap socket error');
    });
  }

  /** "127.0.0.1:PORT" / "[::1]:PORT" once bound. */
  get address(): string {
    return this.bound;
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => reject(new Error(`cannot listen on UDP ${this.opts.listen}: ${err.message}`));
      this.socket.once('error', onError);
      this.socket.bind({ address: this.host, port: this.port, exclusive: true }, () => {
        this.socket.off('error', onError);
        resolve();
      });
    });
    const a = this.socket.address();
    this.bound = a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
    const wanted = this.opts.recvBufferBytes ?? DEFAULT_UDP_RECV_BUFFER;
    let effective = 0;
    try {
      effective = this.socket.getRecvBufferSize();
    } catch {
      /* not available on every platform */
    }
    // Linux reports twice the value it granted (bookkeeping overhead is included).
    if (effective > 0 && effective < wanted) {
      this.log.warn(
        { listen: this.bound, requested_bytes: wanted, effective_bytes: effective },
        'UDP receive buffer is smaller than requested (capped by net.core.rmem_max): bursts of tap datagrams may be lost; raise the sysctl',
      );
    } else {
      this.log.debug({ listen: this.bound, effective_bytes: effective }, 'UDP receive buffer');
    }
  }

  stop(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    return new Promise((resolve) => {
      try {
        this.socket.close(() => resolve());
      } catch {
        resolve(); // never bound
      }
    });
  }

  private identity(ip: string, port: number): StreamIdentity {
    const key = net.isIPv6(ip) ? `[${ip}]:${port}` : `${ip}:${port}`;
    let id = this.senders.get(key);
    if (!id) {
      if (this.senders.size >= MAX_SENDERS) this.senders.delete(this.senders.keys().next().value!);
      id = { nodeId: `udp:${key}`, tapId: `udp:${this.bound || this.opts.listen}`, source: UDP_SOURCE };
      this.senders.set(key, id);
      this.log.info({ listen: this.bound, sender: key }, 'first tap datagram from a new sender');
    }
    return id;
  }

  private onDatagram(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    this.counters.datagrams++;
    this.counters.bytes += msg.length;
    const stream = this.identity(rinfo.address, rinfo.port);
    try {
      if (this.decode(msg, stream)) this.counters.accepted++;
      else this.counters.rejected++;
    } catch (err) {
      // Defensive: the decoders report their own errors; nothing may escape into the event loop.
      this.counters.rejected++;
      this.handler.onIngestError(stream, 'malformed_protobuf', `UDP datagram from ${stream.nodeId}: ${(err as Error).message}`);
    }
  }

  private decode(msg: Buffer, stream: StreamIdentity): boolean {
    const from = (): string => `UDP datagram (${msg.length} bytes) from ${stream.nodeId.slice(4)}`;
    if (msg.length === 0) {
      this.handler.onIngestError(stream, 'empty_trace', `${from()}: empty`);
      return false;
    }
    const format = detectDatagramFormat(msg);
    this.counters[format]++;
    switch (format) {
      case 'json': {
        let bin: Buffer;
        try {
          bin = jsonTraceToBinary(JSON.parse(msg.toString('utf8')));
        } catch (err) {
          this.handler.onIngestError(stream, 'malformed_json', `${from()}: ${(err as Error).message}`);
          return false;
        }
        this.handler.onIngestMessage(UDP_SOURCE, msg.length);
        return this.decoder.decodeTraceWrapper(bin, stream);
      }
      case 'text': {
        let traces: Buffer[];
        try {
          traces = parseTextTraces(msg.toString('utf8'));
        } catch (err) {
          this.handler.onIngestError(stream, 'malformed_text', `${from()}: ${(err as Error).message}`);
          return false;
        }
        if (traces.length === 0) {
          this.handler.onIngestError(stream, 'empty_trace', `${from()}: no trace in the text`);
          return false;
        }
        this.handler.onIngestMessage(UDP_SOURCE, msg.length);
        let ok = true;
        for (const t of traces) ok = this.decoder.decodeTraceWrapper(t, stream) && ok;
        return ok;
      }
      default:
        this.handler.onIngestMessage(UDP_SOURCE, msg.length);
        return this.decoder.decodeTraceWrapper(msg, stream);
    }
  }
}
