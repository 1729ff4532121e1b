/**
 * StreamTaps on node:http2 directly (experimental, off by default: MESHCAP_INGEST_H2=1): the same
 * door as GrpcTapServer, same paths, statuses, compression and counters, without grpc-js in the
 * data path.
 *
 * Why: grpc-js copies every message into a fresh Buffer and pauses the stream and runs a promise
 * per message; at saturation that is about a quarter of the ingest thread's time per MB
 * (bench/README.md, section 2). Here gRPC's framing is read from the DATA chunks as they pass
 * (GrpcMessageReader: a view when a message lies in one chunk, else one copy into a reused buffer).
 * grpc-js stays the default because it is the design card's library; this door exists so that the
 * choice can be made on measurements, and the e2e tests hold both doors to the same behaviour.
 *
 * A call: POST with content-type application/grpc (else HTTP 415), one of STREAM_TAPS_PATHS (else
 * UNIMPLEMENTED), messages decoded as they complete, an empty StreamTapsResponse and grpc-status 0
 * when Envoy half-closes. A message over the limit ends the call with RESOURCE_EXHAUSTED, a
 * grpc-timeout that passes with DEADLINE_EXCEEDED, both counted; other streams carry on.
 */
import http2 from 'node:http2';
import zlib from 'node:zlib';
import type { Logger } from 'pino';
import type { PipelineStats } from '../control/stats.js';
import { bindTapListener, CONNECTION_WINDOW, removeTapSockets, STREAM_TAPS_PATHS, STREAM_WINDOW, type GrpcTapServerOptions } from './grpc-tap-server.js';
import { GrpcMessageReader, type FramingError } from './grpc-message-reader.js';
import type { TapEventHandler } from './tap-event.js';
import { TapStreamDoor } from './tap-stream.js';

/** gRPC status codes used here. */
const Status = { OK: 0, DEADLINE_EXCEEDED: 4, RESOURCE_EXHAUSTED: 8, UNIMPLEMENTED: 12, INTERNAL: 13 } as const;

/** The reply to a StreamTaps call: one empty StreamTapsResponse. */
const EMPTY_MESSAGE = Buffer.alloc(5);

export class H2TapServer {
  private readonly servers: http2.Http2Server[] = [];
  private readonly sessions = new Set<http2.ServerHttp2Session>();
  private readonly door: TapStreamDoor;
  readonly bound: string[] = [];

  constructor(
    private readonly opts: GrpcTapServerOptions,
    handler: TapEventHandler,
    stats: PipelineStats,
    private readonly log: Logger,
  ) {
    this.door = new TapStreamDoor(handler, stats, log);
  }

  async start(): Promise<void> {
    for (const target of this.opts.listen) {
      const server = http2.createServer({
        settings: { initialWindowSize: STREAM_WINDOW },
        // What is in flight is bounded by the windows; Node's 10 MB default would refuse them.
        maxSessionMemory: 64 + (2 * CONNECTION_WINDOW) / 1e6,
      });
      server.on('session', (session) => this.onSession(session));
      server.on('stream', (stream, headers) => this.onStream(stream, headers, target));
      await bindTapListener(target, (sockPath) =>
        new Promise<void>((resolve, reject) => {
          server.once('error', (err) => reject(new Error(`cannot listen on ${target}: ${err.message}`)));
          if (sockPath !== null) server.listen(sockPath, resolve);
          else {
            const i = target.lastIndexOf(':');
            server.listen(Number(target.slice(i + 1)), target.slice(0, i).replace(/^\[(.*)\]$/, '$1'), resolve);
          }
        }),
      );
      this.servers.push(server);
      this.bound.push(target);
    }
    this.log.info({ listen: this.bound }, 'StreamTaps door on node:http2 (experimental, MESHCAP_INGEST_H2=1)');
  }

  /** Stops accepting; gives streams a moment to finish (GOAWAY), then cuts them. */
  async stop(graceMs = 1000): Promise<void> {
    for (const s of this.servers) s.close();
    for (const session of this.sessions) session.close();
    const deadline = Date.now() + graceMs;
    while (this.sessions.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const session of this.sessions) session.destroy();
    removeTapSockets(this.bound);
  }

  private onSession(session: http2.ServerHttp2Session): void {
    this.sessions.add(session);
    session.on('close', () => this.sessions.delete(session));
    session.on('error', (err) => this.log.debug({ err: err.message }, 'HTTP/2 session error'));
    const widen = (): void => {
      try {
        session.setLocalWindowSize(CONNECTION_WINDOW);
      } catch (err) {
        this.log.debug({ err: (err as Error).message }, 'cannot widen HTTP/2 connection window');
      }
    };
    if (session.connecting) session.once('connect', widen);
    else widen();
  }

  /** One request on the listener `target`. */
  private onStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders, target: string): void {
    const path = String(headers[':path']);
    if (headers[':method'] !== 'POST' || !String(headers['content-type'] ?? '').startsWith('application/grpc')) {
      stream.respond({ ':status': 415 }, { endStream: true });
      stream.close();
      return;
    }
    if (!STREAM_TAPS_PATHS.includes(path)) {
      trailersOnly(stream, Status.UNIMPLEMENTED, `unknown method ${path}`);
      return;
    }
    const version = path.includes('v2alpha') ? 'v2alpha' : 'v3';
    const encoding = String(headers['grpc-encoding'] ?? 'identity');
    // A TCP client by its address; on a Unix socket, the socket (as grpc-js names such peers).
    const sock = stream.session?.socket;
    const peer = sock?.remoteAddress ? `${sock.remoteAddress}:${sock.remotePort}` : target;
    const tap = this.door.open(peer, version);
    let timer: NodeJS.Timeout | null = null;
    const finish = (): void => {
      if (timer) clearTimeout(timer);
      tap.finish();
    };
    const fail = (code: number, reason: 'message_too_large' | 'stream_aborted' | 'malformed_protobuf', detail: string): void => {
      tap.error(reason, `tap stream from ${peer}: ${detail}`);
      trailersOnly(stream, code, detail);
      finish();
    };

    const onMessage = (message: Buffer, compressed: boolean): void => {
      // A chunk can hold messages after one that ended the call.
      if (tap.finished) return;
      if (compressed) {
        const inflated = this.inflate(message, encoding);
        if (typeof inflated === 'string') {
          fail(inflated.startsWith('unsupported') ? Status.UNIMPLEMENTED : Status.INTERNAL, 'malformed_protobuf', inflated);
          return;
        }
        message = inflated;
      }
      tap.message(message);
    };
    const onFramingError = (err: FramingError): void => {
      if (err.kind === 'too_large') {
        fail(Status.RESOURCE_EXHAUSTED, 'message_too_large', `message larger than max (${err.size} vs ${this.opts.maxMessageBytes} bytes, --max-message-size)`);
      } else {
        fail(Status.INTERNAL, 'stream_aborted', `the request ended inside a message (${err.missing} bytes of its ${err.inPrefix ? 'length prefix' : 'body'} missing)`);
      }
    };
    const reader = new GrpcMessageReader(this.opts.maxMessageBytes, onMessage, onFramingError);
    const deadline = grpcTimeout(headers['grpc-timeout']);
    if (deadline !== null) {
      timer = setTimeout(() => fail(Status.DEADLINE_EXCEEDED, 'stream_aborted', 'deadline exceeded'), deadline);
      timer.unref();
    }

    stream.on('data', (chunk: Buffer) => {
      if (!tap.finished) reader.push(chunk);
    });
    stream.on('end', () => {
      if (tap.finished) return;
      reader.end();
      if (tap.finished) return;
      finish();
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': String(Status.OK) }));
      stream.end(EMPTY_MESSAGE);
    });
    stream.on('aborted', () => {
      if (!tap.finished) tap.error('stream_aborted', `tap stream from ${peer} ended without a clean close: the client went away`);
      finish();
    });
    stream.on('error', (err) => {
      if (!tap.finished) tap.error('stream_aborted', `tap stream from ${peer}: ${err.message}`);
      finish();
    });
    stream.on('close', () => {
      if (!tap.finished) {
        tap.error('stream_aborted', `tap stream from ${peer} closed before it ended`);
        finish();
      }
    });
  }

  /** A compressed message, inflated (bounded by the message limit), or why it cannot be. */
  private inflate(message: Buffer, encoding: string): Buffer | string {
    const opts = { maxOutputLength: this.opts.maxMessageBytes };
    try {
      if (encoding === 'gzip') return zlib.gunzipSync(message, opts);
      if (encoding === 'deflate') return zlib.inflateSync(message, opts);
    } catch (err) {
      return `cannot decompress a ${encoding} message: ${(err as Error).message}`;
    }
    return encoding === 'identity' ? 'a message is flagged compressed but the stream has no grpc-encoding' : `unsupported grpc-encoding "${encoding}"`;
  }
}

/** Ends a call with only trailers (the gRPC "Trailers-Only" response), then the stream. */
function trailersOnly(stream: http2.ServerHttp2Stream, code: number, message: string): void {
  if (stream.closed || stream.destroyed) return;
  if (!stream.headersSent) {
    stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': String(code), 'grpc-message': encodeURIComponent(message) }, { endStream: true });
  }
  stream.close(http2.constants.NGHTTP2_NO_ERROR);
}

/** Longest delay setTimeout takes (Node fires longer ones at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The grpc-timeout header ("100m", "5S") in ms, or null without one (or beyond any timer). */
function grpcTimeout(h: string | string[] | undefined): number | null {
  const m = typeof h === 'string' ? /^(\d{1,8})([HMSmun])$/.exec(h) : null;
  if (!m) return null;
  const unitMs = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[m[2] as 'H'];
  const ms = Math.max(1, Number(m[1]) * unitMs);
  return ms > MAX_TIMER_MS ? null : ms;
}
