/**
 * Envoy tap files (file_per_tap sink output, and captures of the gRPC stream) into TapEvents.
 *
 * Formats, by file name unless given:
 *   .pb                    one binary TraceWrapper (PROTO_BINARY; buffered traces)
 *   .pb_length_delimited   varint32-length-prefixed TraceWrappers (PROTO_BINARY_LENGTH_DELIMITED)
 *   .json                  pretty JSON TraceWrappers concatenated (JSON_BODY_AS_BYTES/_STRING)
 *   .pb_text               text-format TraceWrappers (PROTO_TEXT)
 *   grpc                   a StreamTaps request body: gRPC 5-byte frames of StreamTapsRequest
 * Each file is its own Envoy-node namespace (trace ids restart per Envoy).
 */
import fs from 'node:fs';
import path from 'node:path';
import { ConcatJsonSplitter } from './json-stream.js';
import type { StreamIdentity, TapEventHandler } from './tap-event.js';
import { parseTextTraces } from './textproto.js';
import { TraceDecoder, splitLengthDelimited, type StreamState } from './trace-decoder.js';
import { jsonTraceToBinary } from './trace-json.js';

export const TAP_FILE_FORMATS = ['pb', 'pb_length_delimited', 'json', 'pb_text', 'grpc'] as const;
export type TapFileFormat = (typeof TAP_FILE_FORMATS)[number];

export function detectTapFileFormat(file: string): TapFileFormat | null {
  const base = path.basename(file);
  if (base.endsWith('.pb_length_delimited') || base.includes('len_delimited')) return 'pb_length_delimited';
  if (base.endsWith('.pb_text') || base.endsWith('.textproto')) return 'pb_text';
  if (base.endsWith('.json')) return 'json';
  if (base.endsWith('.grpc.bin') || base.endsWith('.grpc')) return 'grpc';
  if (base.endsWith('.pb')) return 'pb';
  return null;
}

/**
 * Decodes a whole tap file. Malformed messages are reported through the handler (and the rest of
 * the file is still read where the framing allows). Returns the number of messages accepted.
 */
export function readTapFile(file: string, format: TapFileFormat, handler: TapEventHandler, maxMessageBytes: number): number {
  const data = fs.readFileSync(file);
  const source = 'file';
  const stream: StreamIdentity = { nodeId: `file:${path.resolve(file)}`, tapId: path.basename(file), source };
  const decoder = new TraceDecoder(handler);
  let accepted = 0;
  const one = (msg: Buffer): void => {
    handler.onIngestMessage(source, msg.length);
    if (decoder.decodeTraceWrapper(msg, stream)) accepted++;
  };
  switch (format) {
    case 'pb':
      one(data);
      break;
    case 'pb_length_delimited':
      try {
        const rest = splitLengthDelimited(data, one, maxMessageBytes);
        if (rest < data.length) handler.onIngestError(stream, 'malformed_protobuf', `${file}: ${data.length - rest} bytes at the end are not a whole length-delimited message`);
      } catch (err) {
        handler.onIngestError(stream, 'message_too_large', `${file}: ${(err as Error).message}`);
      }
      break;
    case 'json': {
      const splitter = new ConcatJsonSplitter({
        maxObjectBytes: maxMessageBytes,
        onObject: (text) => {
          let bin: Buffer;
          try {
            bin = jsonTraceToBinary(JSON.parse(text));
          } catch (err) {
            handler.onIngestError(stream, 'malformed_json', `${file}: ${(err as Error).message}`);
            return;
          }
          one(bin);
        },
        onError: (reason, detail) => handler.onIngestError(stream, reason === 'object_too_large' ? 'message_too_large' : 'malformed_json', `${file}: ${detail}`),
      });
      splitter.push(data);
      splitter.end();
      break;
    }
    case 'pb_text': {
      let traces: Buffer[];
      try {
        traces = parseTextTraces(data.toString('utf8'));
      } catch (err) {
        handler.onIngestError(stream, 'malformed_text', `${file}: ${(err as Error).message}`);
        break;
      }
      for (const t of traces) one(t);
      break;
    }
    case 'grpc': {
      const state: StreamState = { identity: null, messages: 0 };
      let pos = 0;
      while (pos + 5 <= data.length) {
        const len = data.readUInt32BE(pos + 1);
        if (data[pos] !== 0 || pos + 5 + len > data.length) {
          handler.onIngestError(state.identity, 'malformed_protobuf', `${file}: bad gRPC frame at offset ${pos}`);
          break;
        }
        const msg = data.subarray(pos + 5, pos + 5 + len);
        handler.onIngestMessage(source, len);
        if (decoder.decodeStreamTapsRequest(msg, state, source, () => stream)) accepted++;
        pos += 5 + len;
      }
      break;
    }
  }
  return accepted;
}
