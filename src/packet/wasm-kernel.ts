/**
 * The packet kernel (src/packet/kernel.wat) instantiated over a memory that holds a pool's blocks.
 *
 * `segments` does the slicer's per-segment work for a whole event in one call: move each payload
 * piece to its place while summing it (one pass, 16 bytes per SIMD instruction), copy and patch the
 * headers, write both checksums and the record framing. `sum` is the checksum loop alone. The
 * blocks live in the kernel's memory so both work in place; JavaScript keeps the control flow.
 */
import v8 from 'node:v8';
import { KERNEL_WASM } from './kernel-wasm.js';

export type WasmSum = (ptr: number, len: number) => number;

/** See kernel.wat. Returns the offset past the last record written. */
export type WasmSegments = (
  rec: number,
  bytes: number,
  mss: number,
  tmpl: number,
  hdr: number,
  v6: number,
  seq: number,
  ack: number,
  ipId: number,
  pseudo: number,
  lastFlags: number,
  fmt: number,
  ts0: number,
  ts1: number,
  dir: number,
) => number;

/** Record framings the kernel writes (its `fmt` argument). */
export const KERNEL_FMT_PCAPNG = 0;
export const KERNEL_FMT_PCAP = 1;

export interface Kernel {
  readonly memory: WebAssembly.Memory;
  readonly sum: WasmSum;
  readonly segments: WasmSegments;
  /**
   * A scratch area in the memory for header templates, a small cache: templateSlot(flow id, d)
   * says where direction d of a flow keeps its template (events of many flows interleave: the
   * template is written again only when another flow took the slot).
   */
  readonly scratch: number;
  readonly scratchView: Uint8Array;
  /** Whose template each slot holds now (the flow); slicers keep it current. */
  readonly tmplOf: unknown[];
}

/** Room for the longest header template (IPv6: 74 bytes), rounded to cache lines. */
export const TEMPLATE_SLOT = 128;
/** Flows whose templates the scratch area keeps at once (a power of two): 64 KiB of slots. */
const TEMPLATE_FLOWS = 256;
const TEMPLATE_SCRATCH = 2 * TEMPLATE_FLOWS * TEMPLATE_SLOT;

/** The template slot of direction d of the flow with this id (an index; × TEMPLATE_SLOT bytes). */
export function templateSlot(flowId: number, d: number): number {
  return ((flowId & (TEMPLATE_FLOWS - 1)) << 1) | d;
}

let compiled: WebAssembly.Module | null | undefined;

/** The compiled module, or null where WebAssembly SIMD is unavailable (the JavaScript path then). */
function kernelModule(): WebAssembly.Module | null {
  if (compiled === undefined) {
    try {
      // Compile with the optimising tier at once: with V8's dynamic tiering the loops may run for
      // a long time in the baseline tier (~3 GB/s instead of ~20 GB/s). meshcap has no other wasm.
      v8.setFlagsFromString('--no-wasm-dynamic-tiering');
      compiled = process.env.MESHCAP_NO_WASM ? null : new WebAssembly.Module(KERNEL_WASM);
    } catch {
      compiled = null;
    }
  }
  return compiled;
}

/**
 * The memory a pool's blocks live in: at least `bytes` plus the kernel's template scratch area,
 * rounded up to 64 KiB pages. Shared, so the capture writer thread can write blocks from it, and
 * page-aligned (WebAssembly memories are mapped pages), so 4 KiB-aligned offsets in it suit direct
 * I/O. Never grown: views over memory.buffer (the blocks) stay valid.
 */
export function blockMemory(bytes: number): WebAssembly.Memory {
  const pages = Math.ceil((scratchOffset(bytes) + TEMPLATE_SCRATCH) / 65536);
  return new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
}

/** Where the template scratch area starts in a blockMemory(bytes). */
const scratchOffset = (bytes: number): number => (bytes + 63) & ~63;

/** The kernel bound to a blockMemory(bytes), or null where WebAssembly SIMD is unavailable. */
export function bindKernel(memory: WebAssembly.Memory, bytes: number): Kernel | null {
  const mod = kernelModule();
  if (!mod) return null;
  const scratch = scratchOffset(bytes);
  const instance = new WebAssembly.Instance(mod, { env: { memory } });
  return {
    memory,
    sum: instance.exports.sum as WasmSum,
    segments: instance.exports.segments as WasmSegments,
    scratch,
    scratchView: new Uint8Array(memory.buffer, scratch, TEMPLATE_SCRATCH),
    tmplOf: new Array<unknown>(2 * TEMPLATE_FLOWS).fill(null),
  };
}

/** A fresh memory of at least `bytes` with the kernel bound to it, or null (tests). */
export function kernelMemory(bytes: number): Kernel | null {
  return bindKernel(blockMemory(bytes), bytes);
}
