/**
 * Envoy tap files (file_per_tap sink output, and captures of the gRPC stream) into TapEvents.
 *
 * Formats, by file name unless given:
 *   .pb                    one binary TraceWrapper (PROTO_BINARY; buffered traces)
 *   .pb_length_delimited   varint32-length-prefixed TraceWrappers (PROTO_BINARY_LENGTH_DELIMITED)
 *   .json                  pretty JSON TraceWrappers concatenated (JSON_BODY_AS_BYTES/_STRING)
 *   .pb_text               text-format TraceWrappers (PROTO_TEXT)
 *   grpc                   a StreamTaps request body: gRPC 5-byte frames of StreamTapsRequest
 * Each file is its own Envoy-node namespace (trace ids restart per Envoy). Reading: tap-file-source.ts
 * (messages, in chunks), tap-file-reader.ts (events), tap-merge.ts (many files in time order).
 */
import path from 'node:path';

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
