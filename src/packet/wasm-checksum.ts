/**
 * The payload checksum loop in WebAssembly SIMD: ~3x the JavaScript word loop on these machines
 * (bench/README.md), because 16 bytes are summed per instruction. Blocks live in the module's
 * memory so the loop reads them in place.
 *
 * The module is assembled here from its bytes (no toolchain at build time). In text form:
 *
 *   (func (export "sum") (param $p i32) (param $n i32) (result i32)
 *     (local $acc v128) (local $e i32) (local $s i64)
 *     e = p + (n & ~15)
 *     loop while p < e:                       ;; 16 bytes: eight little-endian u16 words
 *       acc = i32x4.add(acc, i32x4.extadd_pairwise_i16x8_u(v128.load(p)));  p += 16
 *     s = u64(acc[0]) + u64(acc[1]) + u64(acc[2]) + u64(acc[3])
 *     e = p + (n & 15)
 *     loop while e - p >= 2:  s += i32.load16_u(p);  p += 2
 *     if p < e:  s += i32.load8_u(p)           ;; odd trailing byte, zero-padded
 *     4 x:  s = (s & 0xffff) + (s >> 16)       ;; end-around carry
 *     return i32(s)
 *
 * The i32x4 lanes cannot overflow for n < 512 KiB (each step adds at most 2 x 65535), far above
 * the largest TCP segment. The result is the 16-bit one's-complement sum in the little-endian
 * domain of checksum.ts, pairing bytes from p.
 */

import v8 from 'node:v8';

export type WasmSum = (ptr: number, len: number) => number;

const BODY = [
  // locals: one v128, one i32, one i64
  0x03, 0x01, 0x7b, 0x01, 0x7f, 0x01, 0x7e,
  // e = p + (n & -16)
  0x20, 0, 0x20, 1, 0x41, 0x70, 0x71, 0x6a, 0x21, 3,
  0x02, 0x40, 0x03, 0x40,
  0x20, 0, 0x20, 3, 0x4f, 0x0d, 1, // br_if out when p >= e
  0x20, 2, 0x20, 0, 0xfd, 0x00, 0x00, 0x00, 0xfd, 0x7f, 0xfd, 0xae, 0x01, 0x21, 2,
  0x20, 0, 0x41, 0x10, 0x6a, 0x21, 0,
  0x0c, 0,
  0x0b, 0x0b,
  // s = sum of the four lanes
  0x20, 2, 0xfd, 0x1b, 0, 0xad,
  0x20, 2, 0xfd, 0x1b, 1, 0xad, 0x7c,
  0x20, 2, 0xfd, 0x1b, 2, 0xad, 0x7c,
  0x20, 2, 0xfd, 0x1b, 3, 0xad, 0x7c,
  0x21, 4,
  // e = p + (n & 15)
  0x20, 0, 0x20, 1, 0x41, 0x0f, 0x71, 0x6a, 0x21, 3,
  0x02, 0x40, 0x03, 0x40,
  0x20, 3, 0x20, 0, 0x6b, 0x41, 0x02, 0x49, 0x0d, 1, // br_if out when e - p < 2
  0x20, 4, 0x20, 0, 0x2f, 0x00, 0x00, 0xad, 0x7c, 0x21, 4,
  0x20, 0, 0x41, 0x02, 0x6a, 0x21, 0,
  0x0c, 0,
  0x0b, 0x0b,
  0x20, 0, 0x20, 3, 0x49, 0x04, 0x40,
  0x20, 4, 0x20, 0, 0x2d, 0x00, 0x00, 0xad, 0x7c, 0x21, 4,
  0x0b,
  ...[0, 1, 2, 3].flatMap(() => [0x20, 4, 0x42, 0xff, 0xff, 0x03, 0x83, 0x20, 4, 0x42, 0x10, 0x88, 0x7c, 0x21, 4]),
  0x20, 4, 0xa7,
  0x0b,
];

function leb(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
}
const section = (id: number, bytes: number[]): number[] => [id, ...leb(bytes.length), ...bytes];
const name = (s: string): number[] => [s.length, ...Buffer.from(s)];

const MODULE_BYTES = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
  ...section(1, [1, 0x60, 2, 0x7f, 0x7f, 1, 0x7f]), // type: (i32, i32) -> i32
  ...section(2, [1, ...name('env'), ...name('memory'), 0x02, 0x00, 0x01]), // import memory
  ...section(3, [1, 0]),
  ...section(7, [1, ...name('sum'), 0x00, 0]),
  ...section(10, [1, ...leb(BODY.length), ...BODY]),
]);

let compiled: WebAssembly.Module | null | undefined;

/** The compiled module, or null where WebAssembly SIMD is unavailable (JS loop then). */
function checksumModule(): WebAssembly.Module | null {
  if (compiled === undefined) {
    try {
      // Compile with the optimising tier at once: with V8's dynamic tiering the loop may run for
      // a long time in the baseline tier (~3 GB/s instead of ~20 GB/s). meshcap has no other wasm.
      v8.setFlagsFromString('--no-wasm-dynamic-tiering');
      compiled = process.env.MESHCAP_NO_WASM ? null : new WebAssembly.Module(MODULE_BYTES);
    } catch {
      compiled = null;
    }
  }
  return compiled;
}

/** Memory of `bytes` (rounded up to 64 KiB pages) with the checksum bound to it, or null. */
export function checksumMemory(bytes: number): { memory: WebAssembly.Memory; sum: WasmSum } | null {
  const mod = checksumModule();
  if (!mod) return null;
  const pages = Math.ceil(bytes / 65536);
  // Never grown: views over memory.buffer (the blocks) would be detached.
  const memory = new WebAssembly.Memory({ initial: pages, maximum: pages });
  const instance = new WebAssembly.Instance(mod, { env: { memory } });
  return { memory, sum: instance.exports.sum as WasmSum };
}
