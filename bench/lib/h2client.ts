/**
 * A raw HTTP/2 StreamTaps client (what an Envoy sidecar's gRPC client does on the wire): one HTTP/2
 * connection over a Unix socket, one client-streaming POST to
 * /envoy.service.tap.v3.TapSinkService/StreamTaps, pre-framed gRPC messages written in large
 * chunks. Far cheaper per byte than a grpc-js client, so that on a 2-core machine the load
 * generator leaves as much CPU as possible to the server under test.
 */
import http2 from 'node:http2';
import net from 'node:net';

export const STREAM_TAPS_PATH = '/envoy.service.tap.v3.TapSinkService/StreamTaps';

export interface StreamEnd {
  /** grpc-status from the trailers (0 = OK), or null when the stream broke before any. */
  status: number | null;
  message: string;
}

export class TapStream {
  private readonly session: http2.ClientHttp2Session;
  private readonly req: http2.ClientHttp2Stream;
  private status: number | null = null;
  private message = '';
  private readonly closed: Promise<StreamEnd>;
  private failed: Error | null = null;
  bytesWritten = 0;

  private constructor(target: string) {
    const connect = target.startsWith('unix:') ? () => net.connect(target.slice(5)) : undefined;
    this.session = http2.connect(connect ? 'http://localhost' : `http://${target}`, connect ? { createConnection: connect } : {});
    this.session.on('error', (err) => (this.failed ??= err));
    this.req = this.session.request({ ':method': 'POST', ':path': STREAM_TAPS_PATH, 'content-type': 'application/grpc', te: 'trailers' });
    const fromHeaders = (h: http2.IncomingHttpHeaders): void => {
      if (h['grpc-status'] !== undefined) {
        this.status = Number(h['grpc-status']);
        this.message = String(h['grpc-message'] ?? '');
      }
    };
    this.req.on('response', fromHeaders);
    this.req.on('trailers', fromHeaders);
    this.req.on('error', (err) => (this.failed ??= err));
    this.req.resume();
    this.closed = new Promise((resolve) => this.req.once('close', () => resolve({ status: this.status, message: this.message || (this.failed ? this.failed.message : '') })));
  }

  /** Opens the connection and the stream (resolves once the HTTP/2 session is connected). */
  static async open(target: string): Promise<TapStream> {
    const s = new TapStream(target);
    await new Promise<void>((resolve, reject) => {
      if (!s.session.connecting) return resolve();
      s.session.once('connect', () => resolve());
      s.session.once('error', reject);
    });
    return s;
  }

  get broken(): boolean {
    return this.failed !== null || this.req.destroyed;
  }

  /** Writes pre-framed gRPC messages; resolves at once, or when the stream drained (back-pressure). */
  write(buf: Buffer): Promise<void> | null {
    if (this.broken) throw this.failed ?? new Error('stream closed');
    this.bytesWritten += buf.length;
    if (this.req.write(buf)) return null;
    return new Promise((resolve) => {
      const done = (): void => {
        this.req.off('drain', done);
        this.req.off('close', done);
        resolve();
      };
      this.req.on('drain', done);
      this.req.on('close', done);
    });
  }

  /** Half-closes and waits for the server's status (or `timeoutMs`). */
  async end(timeoutMs = 10_000): Promise<StreamEnd> {
    if (!this.req.destroyed) this.req.end();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<StreamEnd>((resolve) => {
      timer = setTimeout(() => resolve({ status: null, message: `no status within ${timeoutMs} ms` }), timeoutMs);
    });
    const r = await Promise.race([this.closed, timeout]);
    clearTimeout(timer);
    this.session.close();
    return r;
  }

  /** Resets the stream and closes the connection at once (an Envoy going away). */
  destroy(): void {
    this.req.close(http2.constants.NGHTTP2_CANCEL);
    this.session.destroy();
  }
}
