/**
 * The Internet checksum (RFC 1071) for IPv4 headers and TCP segments.
 *
 * Speed matters: the TCP checksum reads every payload byte. The sum is taken over native
 * little-endian 32-bit words of an aligned Uint32Array view (a one's-complement sum is independent
 * of byte order up to a final byte swap, RFC 1071 §2(B)), with two accumulators, in a function of
 * its own so V8 optimises it alone. Results stay in that "LE domain": a 16-bit value whose low byte
 * goes first on the wire, which is exactly how `writeChecksumLE` stores it.
 */
import os from 'node:os';

if (os.endianness() !== 'LE') {
  throw new Error('meshcap: the packet checksum code assumes a little-endian host');
}

/** Folds an unfolded sum into a 16-bit one's-complement sum (2^16 ≡ 1 mod 65535). */
export function fold(acc: number): number {
  const r = acc % 65535;
  return r === 0 && acc !== 0 ? 0xffff : r;
}

/** Byte-swaps a 16-bit value (LE domain <-> big-endian domain). */
export function swap16(v: number): number {
  return ((v & 0xff) << 8) | (v >>> 8);
}

/**
 * Unfolded sum of the little-endian 16-bit words of u8[start, end), pairing bytes from `start`.
 * `u32` must be a Uint32Array over the same ArrayBuffer as `u8`, starting at byte offset 0 of it.
 */
export function sumLE(u8: Uint8Array, u32: Uint32Array, start: number, end: number): number {
  if ((start & 1) !== 0) {
    // Shifting a byte string by one byte swaps its sum: sum the string with a zero byte in front
    // (pairs from start-1, minus the byte at start-1, which sat in the low half of its word).
    return swap16(fold(sumEven(u8, u32, start - 1, end) - u8[start - 1]!));
  }
  return sumEven(u8, u32, start, end);
}

function sumEven(u8: Uint8Array, u32: Uint32Array, start: number, end: number): number {
  let acc = 0;
  let i = start;
  if (end - i >= 2 && (i & 3) === 2) {
    acc = u8[i]! | (u8[i + 1]! << 8);
    i += 2;
  }
  const wordEnd = end & ~3;
  if (wordEnd > i) {
    acc += sumWords(u32, i >>> 2, wordEnd >>> 2);
    i = wordEnd;
  }
  if (end - i >= 2) {
    acc += u8[i]! | (u8[i + 1]! << 8);
    i += 2;
  }
  if (i < end) acc += u8[i]!; // a trailing odd byte is padded with zero on the right
  return acc;
}

/** The hot loop: 32-bit words, two accumulators. Exact in doubles for up to 2^20 words. */
function sumWords(u32: Uint32Array, from: number, to: number): number {
  let a = 0;
  let b = 0;
  let i = from;
  const pairs = to - ((to - from) & 1);
  for (; i < pairs; i += 2) {
    a += u32[i]!;
    b += u32[i + 1]!;
  }
  if (i < to) a += u32[i]!;
  return a + b;
}

/** Byte-wise sum of any Buffer range (slow path: snaplen-truncated segments, tests). */
export function sumBytesLE(buf: Uint8Array, start: number, end: number): number {
  let acc = 0;
  let i = start;
  for (; i + 1 < end; i += 2) acc += buf[i]! | (buf[i + 1]! << 8);
  if (i < end) acc += buf[i]!;
  return acc;
}

/**
 * Sums u8[start, end) (see sumLE) plus `init`, folds, and stores the checksum at u8[off]: one
 * call that returns nothing, so the large intermediate sum never crosses a call boundary that V8
 * might not inline (where it would be boxed: an allocation per packet).
 */
export function checksumInto(u8: Uint8Array, u32: Uint32Array, start: number, end: number, init: number, off: number): void {
  const c = ~fold(init + sumLE(u8, u32, start, end)) & 0xffff;
  u8[off] = c & 0xff;
  u8[off + 1] = c >>> 8;
}

/** Stores the checksum of an unfolded LE-domain sum at u8[off], in wire order. */
export function writeChecksumLE(u8: Uint8Array, off: number, acc: number): void {
  const c = ~fold(acc) & 0xffff;
  u8[off] = c & 0xff;
  u8[off + 1] = c >>> 8;
}
