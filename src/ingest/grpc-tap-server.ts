/**
 * The gRPC tap sink: `envoy.service.tap.v3.TapSinkService/StreamTaps` (client streaming) and the
 * same service under the frozen `envoy.service.tap.v2alpha` path.
 *
 * Messages are taken as raw Buffers (identity deserializer) and decoded by TraceDecoder, so bytes
 * fields are views into the received message. The Identifier comes in the first message only and
 * names the stream (Envoy node, tap_id) for all later ones. Envoy expects no response until it
 * ends the stream; a malformed message is counted and logged and the stream carries on with the
 * next message; a stream that breaks loses only its own in-flight message (its flows stay open,
 * keyed by node, for Envoy's reconnect).
 */
import fs from 'node:fs';
import type http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { PipelineStats } from '../control/stats.js';
import type { TapEventHandler } from './tap-event.js';
import { TapStreamDoor } from './tap-stream.js';

export const STREAM_TAPS_PATHS = [
  '/envoy.service.tap.v3.TapSinkService/StreamTaps',
  '/envoy.service.tap.v2alpha.TapSinkService/StreamTaps',
];

const EMPTY = Buffer.alloc(0);

/**
 * HTTP/2 receive windows. Node's defaults (64 KiB per stream and per connection) leave a
 * StreamTaps server half idle at ~0.3-0.4 GB/s whatever the message size; 4 MiB / 16 MiB let one
 * Envoy stream keep the pipeline busy (bench/README.md). grpc-js has no option for either, so
 * both are set on its http2 servers: the SETTINGS initial window through its server options, the
 * connection window on each session.
 */
export const STREAM_WINDOW = 4 * 1024 * 1024;
export const CONNECTION_WINDOW = 16 * 1024 * 1024;

interface GrpcServerInternals {
  commonServerOptions?: http2.ServerOptions;
  http2Servers?: Map<http2.Http2Server, unknown>;
}
const identity = (b: Buffer): Buffer => b;

/**
 * Raises the SETTINGS initial window of the http2 servers grpc-js will create (call before
 * bindAsync). False when grpc-js internals no longer allow it.
 */
export function widenStreamWindow(server: grpc.Server): boolean {
  const internals = server as unknown as GrpcServerInternals;
  if (!internals.commonServerOptions) return false;
  internals.commonServerOptions.settings = { ...internals.commonServerOptions.settings, initialWindowSize: STREAM_WINDOW };
  return true;
}

/** Widens the connection window of every session of the bound http2 servers not in `seen`. */
export function widenConnectionWindows(server: grpc.Server, seen: Set<http2.Http2Server>, onError: (err: Error) => void): void {
  for (const h2 of (server as unknown as GrpcServerInternals).http2Servers?.keys() ?? []) {
    if (seen.has(h2)) continue;
    seen.add(h2);
    h2.on('session', (session: http2.ServerHttp2Session) => {
      const widen = (): void => {
        try {
          session.setLocalWindowSize(CONNECTION_WINDOW);
        } catch (err) {
          onError(err as Error);
        }
      };
      if (session.connecting) session.once('connect', widen);
      else widen();
    });
  }
}

/** The StreamTaps service at `path`, with messages left as raw Buffers (decoded by TraceDecoder). */
export function streamTapsService(path: string): grpc.ServiceDefinition {
  return {
    StreamTaps: {
      path,
      requestStream: true,
      responseStream: false,
      requestSerialize: identity,
      requestDeserialize: identity,
      responseSerialize: () => EMPTY,
      responseDeserialize: () => ({}),
      originalName: 'streamTaps',
    },
  } as grpc.ServiceDefinition;
}

export interface GrpcTapServerOptions {
  /** 'unix:/path' or 'host:port', one or more. */
  listen: string[];
  /** Largest StreamTapsRequest accepted (bytes). */
  maxMessageBytes: number;
}

export class GrpcTapServer {
  private readonly server: grpc.Server;
  private readonly door: TapStreamDoor;
  readonly bound: string[] = [];

  constructor(
    private readonly opts: GrpcTapServerOptions,
    handler: TapEventHandler,
    stats: PipelineStats,
    private readonly log: Logger,
  ) {
    this.door = new TapStreamDoor(handler, stats, log);
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': opts.maxMessageBytes,
      'grpc.max_send_message_length': 1024,
    });
    this.widenWindows();
    for (const path of STREAM_TAPS_PATHS) {
      const version = path.includes('v2alpha') ? 'v2alpha' : 'v3';
      this.server.addService(streamTapsService(path), {
        StreamTaps: (call: grpc.ServerReadableStream<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => this.stream(call, callback, version),
      });
    }
  }

  async start(): Promise<void> {
    for (const target of this.opts.listen) {
      await bindTapListener(target, () =>
        new Promise<void>((resolve, reject) => {
          this.server.bindAsync(target, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(new Error(`cannot listen on ${target}: ${err.message}`)) : resolve()));
        }),
      );
      this.bound.push(target);
    }
    this.widenSessionWindows();
  }

  private widenWindows(): void {
    if (!widenStreamWindow(this.server)) this.log.warn('grpc-js internals changed: HTTP/2 receive windows stay at 64 KiB (ingest will be slower)');
  }

  private readonly widened = new Set<http2.Http2Server>();

  private widenSessionWindows(): void {
    widenConnectionWindows(this.server, this.widened, (err) => this.log.debug({ err: err.message }, 'cannot widen HTTP/2 connection window'));
  }

  /** Stops accepting; gives streams a moment to finish, then cuts them. */
  async stop(graceMs = 1000): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      this.server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    removeTapSockets(this.bound);
  }

  private stream(call: grpc.ServerReadableStream<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>, version: string): void {
    const peer = call.getPeer();
    const tap = this.door.open(peer, version);
    call.on('data', (msg: Buffer) => tap.message(msg));
    call.on('end', () => {
      // Node ends the request stream both on a real half-close and when the client resets or
      // vanishes mid-message (grpc-js then drops the partial message silently). Sending metadata
      // makes grpc-js check that the stream is still alive: on a dead one it emits 'cancelled'
      // on the next tick, before ours, and that handler counts the abort.
      call.sendMetadata(new grpc.Metadata());
      process.nextTick(() => {
        if (tap.finished) return;
        tap.finish();
        callback(null, EMPTY);
      });
    });
    call.on('error', (err: grpc.ServiceError) => {
      tap.error('stream_aborted', `tap stream from ${peer}: ${err.message}`);
      tap.finish();
    });
    call.on('cancelled', () => {
      // grpc-js reports both a client that went away and its own rejection of a message over
      // --max-message-size (RESOURCE_EXHAUSTED, sent to Envoy) as a cancellation; the handler
      // cannot tell which.
      if (!tap.finished) {
        tap.error(
          'stream_aborted',
          `tap stream from ${peer} ended without a clean close: the client went away, or gRPC rejected a message over --max-message-size (${this.opts.maxMessageBytes} bytes)`,
        );
      }
      tap.finish();
    });
  }
}

/** The socket path of a 'unix:/path' or 'unix:///path' listener, or null for host:port. */
function unixSocketPath(target: string): string | null {
  return target.startsWith('unix:') ? target.slice('unix:'.length).replace(/^\/\/(?=\/)/, '') : null;
}

/**
 * Binds one listener with `bind`. A Unix socket is created 0600 (umask while binding, chmod after)
 * so that only the pod's Envoy (same user) may stream taps, after removing the socket file a
 * previous run left behind.
 */
export async function bindTapListener(target: string, bind: (sockPath: string | null) => Promise<void>): Promise<void> {
  const sockPath = unixSocketPath(target);
  if (sockPath !== null) removeStaleSocket(sockPath);
  const oldMask = sockPath !== null ? process.umask(0o177) : null;
  try {
    await bind(sockPath);
  } finally {
    if (oldMask !== null) process.umask(oldMask);
  }
  if (sockPath !== null) fs.chmodSync(sockPath, 0o600);
}

/** Removes the socket files of the Unix listeners among `targets` (at shutdown). */
export function removeTapSockets(targets: string[]): void {
  for (const target of targets) {
    const sockPath = unixSocketPath(target);
    if (sockPath !== null) fs.rmSync(sockPath, { force: true });
  }
}

/** A socket file left by a previous run that nobody listens on any more. */
function removeStaleSocket(p: string): void {
  try {
    if (fs.statSync(p).isSocket()) fs.rmSync(p);
  } catch {
    /* absent */
  }
}
