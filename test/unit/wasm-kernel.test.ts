/**
 * The packet kernel's committed bytes (src/packet/kernel-wasm.ts) are what src/packet/kernel.wat
 * assembles to: editing the .wat without regenerating fails here, not in production.
 */
import { describe, expect, it } from 'vitest';
// @ts-expect-error plain ESM script without types
import { assembleKernel } from '../../scripts/build-wasm.mjs';
import { KERNEL_WASM } from '../../src/packet/kernel-wasm.js';
import { kernelMemory } from '../../src/packet/wasm-kernel.js';

describe('packet kernel', () => {
  it('committed bytes equal the assembled kernel.wat (run node scripts/build-wasm.mjs after editing it)', async () => {
    const bytes: Buffer = await assembleKernel();
    expect(Buffer.compare(bytes, KERNEL_WASM)).toBe(0);
  });

  it('sum: the RFC 1071 sum of any range, odd lengths and offsets included', () => {
    const k = kernelMemory(65536)!;
    expect(k).not.toBeNull();
    const mem = new Uint8Array(k.memory.buffer);
    for (let i = 0; i < 4096; i++) mem[i] = (i * 7919 + 13) & 0xff;
    for (const [p, n] of [[0, 0], [0, 1], [1, 2], [3, 17], [5, 1460], [64, 4000], [7, 4089]] as const) {
      let ref = 0;
      for (let i = 0; i < n; i += 2) ref += mem[p + i]! | ((i + 1 < n ? mem[p + i + 1]! : 0) << 8);
      while (ref > 0xffff) ref = (ref & 0xffff) + (ref >>> 16);
      expect(k.sum(p, n)).toBe(ref);
    }
  });
});
