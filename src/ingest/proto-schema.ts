/**
 * Loads meshcap's own .proto files (proto/, Envoy's field numbers) with protobufjs.
 *
 * The binary hot path does not use these reflection types (see trace-decoder.ts); they serve the
 * text and JSON doors, which normalise Envoy's JSON/text output into the binary form, and tests
 * that emulate Envoy's side of the wire.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

const here = path.dirname(fileURLToPath(import.meta.url));

/** proto/ at the package root, from src/ingest (tsx/vitest) or dist/src/ingest (compiled). */
export function protoDir(): string {
  let dir = here;
  for (let i = 0; i < 5; i++) {
    const candidate = path.join(dir, 'proto');
    if (path.basename(dir) !== 'src' && existsDir(candidate)) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error(`meshcap: cannot find the proto/ directory above ${here}`);
}

function existsDir(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

const ENTRY_FILES = [
  'envoy/service/tap/v3/tap.proto',
  'envoy/service/tap/v2alpha/tap.proto',
];

let cached: protobuf.Root | null = null;

/** The protobufjs root with every meshcap proto, field names as in Envoy's JSON (snake_case). */
export function loadSchema(extraFiles: string[] = []): protobuf.Root {
  if (cached && extraFiles.length === 0) return cached;
  const dir = protoDir();
  const root = new protobuf.Root();
  // google/protobuf/*.proto come from protobufjs' bundled common types.
  root.resolvePath = (_origin, target) => (target.startsWith('google/protobuf/') ? target : path.join(dir, target));
  root.loadSync([...ENTRY_FILES, ...extraFiles], { keepCase: true });
  root.resolveAll();
  if (extraFiles.length === 0) cached = root;
  return root;
}

export function traceWrapperType(): protobuf.Type {
  return loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');
}
