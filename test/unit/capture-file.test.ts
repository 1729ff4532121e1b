/**
 * CaptureFile: appends land byte for byte whatever path they take. Whole pages go by direct I/O
 * when the memory offset and the file offset agree modulo 4 KiB (what the pipeline's block lead
 * arranges), everything else through the page cache.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { blockMemory } from '../../src/packet/wasm-kernel.js';
import { CaptureFile } from '../../src/sink/capture-file.js';
import { directIoSupported } from '../helpers/direct-io.js';

const PAGE = 4096;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-capfile-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A page-aligned shared memory (as BlockPool's) filled with a pattern. */
function memory(bytes: number): Uint8Array {
  const m = new Uint8Array(blockMemory(bytes).buffer);
  for (let i = 0; i < m.length; i++) m[i] = (i * 131 + (i >>> 12)) & 0xff;
  return m;
}

describe('CaptureFile', () => {
  const mem = memory(8 << 20);
  const header = Buffer.from('header of 28 bytes, unaligned');

  /**
   * Appends: congruent large ones (their memory offset ≡ file offset mod 4 KiB, as Block.start makes
   * them), a misaligned large one, and small ones. Returns the expected file and the bytes that
   * should have gone direct.
   */
  function run(file: CaptureFile): { expected: Buffer; wholePages: number } {
    const parts: Buffer[] = [];
    let wholePages = 0;
    const append = (off: number, len: number, congruent: boolean): void => {
      const view = mem.subarray(off, off + len);
      if (congruent) expect((off - file.size) & (PAGE - 1)).toBe(0);
      if (congruent && len >= 64 * 1024) {
        const head = (PAGE - (file.size & (PAGE - 1))) & (PAGE - 1);
        wholePages += (len - head) & ~(PAGE - 1);
      }
      file.append(view);
      parts.push(Buffer.from(view));
    };
    file.append(header);
    parts.push(header);
    let block = PAGE; // each "block" starts at a page boundary of the memory, as in a BlockPool
    for (const len of [1 << 20, 300_001, 65_536 + 12, 4_000, 777_777]) {
      append(block + (file.size & (PAGE - 1)), len, true);
      block += 2 << 20;
      if (block + (2 << 20) > mem.length) block = PAGE;
    }
    append(PAGE + ((file.size + 8) & (PAGE - 1)), 500_000, false); // off by 8 bytes: page cache
    append(PAGE + (file.size & (PAGE - 1)), 1 << 20, true);
    return { expected: Buffer.concat(parts), wholePages };
  }

  it('writes every byte in order; whole pages of congruent appends go direct where the filesystem allows', () => {
    const p = path.join(dir, 'direct.pcapng');
    const file = CaptureFile.create(p, true);
    const { expected, wholePages } = run(file);
    file.close();
    expect(fs.readFileSync(p).equals(expected)).toBe(true);
    expect(file.size).toBe(expected.length);
    expect(file.directBytes + file.cachedBytes).toBe(expected.length);
    if (directIoSupported(dir)) {
      expect(wholePages).toBeGreaterThan(2 << 20);
      expect(file.directBytes).toBe(wholePages);
    } else {
      expect(file.directBytes).toBe(0);
    }
    expect(fs.statSync(p).mode & 0o777).toBe(0o600);
  });

  it('without direct I/O writes the same bytes through the page cache', () => {
    const p = path.join(dir, 'cached.pcapng');
    const file = CaptureFile.create(p, false);
    const { expected } = run(file);
    file.close();
    expect(file.direct).toBe(false);
    expect(file.directBytes).toBe(0);
    expect(fs.readFileSync(p).equals(expected)).toBe(true);
  });

  it('truncate cuts the file back (a failed append is undone) and later appends continue from there', () => {
    const p = path.join(dir, 'cut.pcapng');
    const file = CaptureFile.create(p, true);
    file.append(header);
    file.append(mem.subarray(PAGE + header.length, PAGE + header.length + (200 << 10)));
    const keep = file.size;
    file.append(mem.subarray(8 * PAGE, 8 * PAGE + 100_000));
    file.truncate(keep);
    const tail = mem.subarray(PAGE, PAGE + 5000);
    file.append(tail);
    file.close();
    const got = fs.readFileSync(p);
    expect(got.length).toBe(keep + tail.length);
    expect(got.subarray(keep).equals(Buffer.from(tail))).toBe(true);
    expect(got.subarray(header.length, keep).equals(Buffer.from(mem.subarray(PAGE + header.length, PAGE + header.length + (200 << 10))))).toBe(true);
  });
});
