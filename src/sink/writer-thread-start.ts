/**
 * Starting capture writer threads (capture-writer-thread.ts). Kept apart from file-sink.ts and its
 * imports so that a one-shot command can start its thread first thing, before it loads the rest of
 * meshcap: the thread's start-up (an isolate, Node's internals, its modules: ~30–50 ms here) then
 * overlaps the command's own.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

/** A writer thread started ahead of its FileSink (prestartCaptureWriter). */
let spare: Worker | null = null;

/** A writer thread: the one started ahead, if any, or a new one. */
export function startWriterThread(): Worker {
  const w = spare ?? new Worker(writerThreadUrl(), { stdout: false, stderr: false });
  spare = null;
  return w;
}

/**
 * Starts the next FileSink's writer thread now, for one-shot conversions. Unused, it does not keep
 * the process alive.
 */
export function prestartCaptureWriter(): void {
  if (spare) return;
  spare = new Worker(writerThreadUrl(), { stdout: false, stderr: false });
  spare.unref();
}

/**
 * The thread's compiled module: next to this one in dist/, or, when this module runs from its
 * TypeScript source (vitest), the build's copy (the test setup builds first).
 */
function writerThreadUrl(): URL {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return new URL('./capture-writer-thread.js', import.meta.url);
  const root = path.resolve(path.dirname(here), '..', '..');
  return new URL(`file://${path.join(root, 'dist', 'src', 'sink', 'capture-writer-thread.js')}`);
}
