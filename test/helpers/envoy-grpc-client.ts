/**
 * Emulates Envoy's side of the (never-implemented upstream) streaming gRPC tap sink:
 * a client-streaming call to `/envoy.service.tap.v3.TapSinkService/StreamTaps` carrying
 * pre-encoded StreamTapsRequest messages, with identity (raw Buffer) serializers.
 */
import * as grpc from '@grpc/grpc-js';
import type protobuf from 'protobufjs';
import { loadSchema } from '../../src/ingest/proto-schema.js';

export const STREAM_TAPS_PATH = '/envoy.service.tap.v3.TapSinkService/StreamTaps';
export const STREAM_TAPS_PATH_V2 = '/envoy.service.tap.v2alpha.TapSinkService/StreamTaps';

export interface StreamTapsOptions {
  /** Method path (default v3 StreamTaps). */
  path?: string;
  /** Cancel the call (like an Envoy going away) after this many messages were written. */
  abortAfter?: number;
  /** Half-close after writing (default true). false leaves the stream open until `deadlineMs`. */
  end?: boolean;
  /** Per-call deadline in ms (default 60 s). */
  deadlineMs?: number;
  /** Extra gRPC metadata. */
  metadata?: Record<string, string>;
  /** grpc-js channel options. */
  channelOptions?: grpc.ChannelOptions;
  /** Yield to the event loop every N messages even without back-pressure (default 16), so
   * concurrent streams really interleave. */
  yieldEvery?: number;
}

export interface StreamTapsResult {
  /** grpc status code (0 = OK, 1 = CANCELLED for abortAfter, …). */
  code: number;
  details: string;
  /** Serialized StreamTapsResponse (empty message → empty buffer) when OK. */
  response: Buffer | null;
  /** Messages written before the call ended. */
  sent: number;
}

const identity = (b: Buffer) => b;

/**
 * Streams `messages` (encoded StreamTapsRequest) to `target` ('unix:/path' or 'host:port').
 * Resolves with the call's final status (never rejects for a gRPC error: assert on `code`).
 */
export async function streamTaps(target: string, messages: Buffer[], opts: StreamTapsOptions = {}): Promise<StreamTapsResult> {
  const client = new grpc.Client(target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': -1,
    'grpc.max_receive_message_length': -1,
    ...opts.channelOptions,
  });
  try {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(opts.metadata ?? {})) md.set(k, v);
    let sent = 0;
    let call!: grpc.ClientWritableStream<Buffer>;
    const done = new Promise<StreamTapsResult>((resolve) => {
      call = client.makeClientStreamRequest<Buffer, Buffer>(
        opts.path ?? STREAM_TAPS_PATH,
        identity,
        identity,
        md,
        { deadline: Date.now() + (opts.deadlineMs ?? 60_000) },
        (err, res) => {
          if (err) resolve({ code: err.code ?? grpc.status.UNKNOWN, details: err.details ?? err.message, response: null, sent });
          else resolve({ code: grpc.status.OK, details: 'OK', response: res ?? Buffer.alloc(0), sent });
        },
      );
    });
    let finished = false;
    void done.then(() => (finished = true));
    call.on('error', () => {
      /* reported through the callback */
    });
    const yieldEvery = Math.max(1, opts.yieldEvery ?? 16);
    for (const m of messages) {
      if (finished) break;
      if (opts.abortAfter !== undefined && sent >= opts.abortAfter) break;
      const ok = call.write(m);
      sent++;
      if (!ok) await Promise.race([new Promise((r) => call.once('drain', r)), done]);
      else if (sent % yieldEvery === 0) await new Promise((r) => setImmediate(r));
    }
    if (opts.abortAfter !== undefined && sent >= opts.abortAfter && !finished) {
      // Let the written messages leave before cancelling.
      await new Promise((r) => setTimeout(r, 50));
      call.cancel();
    } else if (opts.end ?? true) {
      call.end();
    }
    return await done;
  } finally {
    client.close();
  }
}

let requestType: protobuf.Type | null = null;

/** envoy.service.tap.v3.StreamTapsRequest from meshcap's protos (keepCase names). */
export function streamTapsRequestType(): protobuf.Type {
  return (requestType ??= loadSchema().lookupType('envoy.service.tap.v3.StreamTapsRequest'));
}

/** Encodes plain StreamTapsRequest objects (snake_case keys, Buffers for bytes). */
export function encodeRequests(objects: object[]): Buffer[] {
  const T = streamTapsRequestType();
  return objects.map((o) => {
    const err = T.verify(o);
    if (err) throw new Error(`StreamTapsRequest: ${err}`);
    const bytes = T.encode(T.fromObject(o)).finish();
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  });
}

/** Decodes an encoded StreamTapsRequest back to a plain object (bytes as Buffers, longs as numbers). */
export function decodeRequest(buf: Buffer): Record<string, unknown> {
  const T = streamTapsRequestType();
  return T.toObject(T.decode(buf), { longs: Number, bytes: Buffer, defaults: false }) as Record<string, unknown>;
}

/** The gRPC length-prefixed body (flag 0 + u32 BE length + message) for a list of messages. */
export function rawGrpcFrames(msgs: Buffer[]): Buffer {
  const parts: Buffer[] = [];
  for (const m of msgs) {
    const h = Buffer.alloc(5);
    h[0] = 0;
    h.writeUInt32BE(m.length, 1);
    parts.push(h, m);
  }
  return Buffer.concat(parts);
}
