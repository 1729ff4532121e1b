import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { GrpcMessageReader, type FramingError } from '../../src/ingest/grpc-message-reader.js';

/** gRPC's framing of one message: flag, u32 big-endian length, bytes. */
function frame(body: Uint8Array, compressed = false): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out[0] = compressed ? 1 : 0;
  out.writeUInt32BE(body.length, 1);
  out.set(body, 5);
  return out;
}

/** Cuts `wire` at the given (sorted, deduplicated) offsets. */
function cut(wire: Buffer, at: number[]): Buffer[] {
  const points = [...new Set(at.map((a) => a % (wire.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of [...points, wire.length]) {
    chunks.push(wire.subarray(from, p));
    from = p;
  }
  return chunks;
}

function collect(max: number, chunks: Buffer[], end = true): { messages: Array<[Buffer, boolean]>; errors: FramingError[] } {
  const messages: Array<[Buffer, boolean]> = [];
  const errors: FramingError[] = [];
  // A message is valid only during the call: keep copies, as a consumer that kept it would have to.
  const r = new GrpcMessageReader(max, (m, c) => messages.push([Buffer.from(m), c]), (e) => errors.push(e));
  for (const c of chunks) r.push(c);
  if (end) r.end();
  return { messages, errors };
}

describe('GrpcMessageReader', () => {
  it('gives back every message, whole and in order, however the DATA chunks cut them', () => {
    const body = fc.oneof(fc.uint8Array({ maxLength: 40 }), fc.uint8Array({ minLength: 1000, maxLength: 5000 }));
    fc.assert(
      fc.property(fc.array(fc.tuple(body, fc.boolean()), { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 30 }), (msgs, at) => {
        const wire = Buffer.concat(msgs.map(([b, c]) => frame(b, c)));
        const got = collect(1 << 20, cut(wire, at));
        expect(got.errors).toEqual([]);
        expect(got.messages.map(([m, c]) => [Array.from(m), c])).toEqual(msgs.map(([b, c]) => [Array.from(b), c]));
      }),
      { numRuns: 2000 },
    );
  });

  it('hands a message that lies in one chunk on as a view of that chunk (no copy)', () => {
    const chunk = Buffer.concat([frame(Buffer.from('abc')), frame(Buffer.from('defgh'))]);
    const seen: Buffer[] = [];
    const r = new GrpcMessageReader(100, (m) => seen.push(m), () => {});
    r.push(chunk);
    expect(seen.map((m) => m.toString())).toEqual(['abc', 'defgh']);
    expect(seen.every((m) => m.buffer === chunk.buffer)).toBe(true);
  });

  it('refuses a message over the limit from its prefix alone, and reads nothing after it', () => {
    const wire = Buffer.concat([frame(Buffer.alloc(10)), frame(Buffer.alloc(101)), frame(Buffer.alloc(3))]);
    const got = collect(100, cut(wire, [12, 16]), false);
    expect(got.messages.length).toBe(1);
    expect(got.errors).toEqual([{ kind: 'too_large', size: 101 }]);
  });

  it('reports a request that ends inside a prefix or a body', () => {
    expect(collect(100, [frame(Buffer.alloc(10)).subarray(0, 3)]).errors).toEqual([{ kind: 'truncated', inPrefix: true, missing: 2 }]);
    expect(collect(100, [frame(Buffer.alloc(10)).subarray(0, 8)]).errors).toEqual([{ kind: 'truncated', inPrefix: false, missing: 7 }]);
    expect(collect(100, [frame(Buffer.alloc(0)), frame(Buffer.alloc(2))]).errors).toEqual([]);
  });
});
