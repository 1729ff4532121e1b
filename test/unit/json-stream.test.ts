import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ConcatJsonSplitter } from '../../src/ingest/json-stream.js';

type Err = [reason: string, detail: string];

function harness(maxObjectBytes = 1 << 20) {
  const objects: string[] = [];
  const errors: Err[] = [];
  const splitter = new ConcatJsonSplitter({
    maxObjectBytes,
    onObject: (t) => objects.push(t),
    onError: (r, d) => errors.push([r, d]),
  });
  return { splitter, objects, errors };
}

// Pretty-printed like Envoy's admin /tap output, with the awkward cases inside strings.
const OBJECTS = [
  { socket_streamed_trace_segment: { trace_id: '1', note: 'braces } { and "quotes" and \\ backslash' } },
  { a: 'ends with a backslash \\', b: '\\"', c: [{ d: {} }, '}'] },
  { utf8: 'héllo wörld 🙂 ✓', nested: { deeper: { deepest: ['{', '}', '\\\\'] } } },
];
const TEXTS = OBJECTS.map((o) => JSON.stringify(o, null, 2));
const STREAM = Buffer.from(TEXTS.join(''), 'utf8');

describe('ConcatJsonSplitter', () => {
  it('counts the whole chunks an object in progress keeps alive, and lets them go when it ends', () => {
    const h = harness();
    const cut = TEXTS[0]!.length + 10; // inside the second object
    const a = Buffer.from(STREAM.subarray(0, cut)); // chunks of their own, as the file reader's
    const b = Buffer.from(STREAM.subarray(cut, cut + 20));
    const c = Buffer.from(STREAM.subarray(cut + 20));
    h.splitter.push(a);
    expect(h.objects).toHaveLength(1);
    expect(h.splitter.retainedBytes).toBe(a.buffer.byteLength);
    h.splitter.push(b);
    expect(h.splitter.retainedBytes).toBe(a.buffer.byteLength + b.buffer.byteLength);
    h.splitter.push(c);
    expect(h.objects).toEqual(TEXTS);
    expect(h.splitter.retainedBytes).toBe(0);
  });

  it('splits objects written back to back with no delimiter', () => {
    const h = harness();
    h.splitter.push(STREAM);
    h.splitter.end();
    expect(h.errors).toEqual([]);
    expect(h.objects).toEqual(TEXTS);
    expect(h.objects.map((t) => JSON.parse(t))).toEqual(OBJECTS);
  });

  it('gives the same result whatever byte the chunk boundary falls on', () => {
    for (let i = 0; i <= STREAM.length; i++) {
      const h = harness();
      h.splitter.push(STREAM.subarray(0, i));
      h.splitter.push(STREAM.subarray(i));
      h.splitter.end();
      expect(h.errors, `split at ${i}`).toEqual([]);
      expect(h.objects, `split at ${i}`).toEqual(TEXTS);
    }
  });

  it('handles two boundaries anywhere, and one byte per chunk (splitting UTF-8 characters)', () => {
    for (let i = 0; i <= STREAM.length; i += 3) {
      for (let j = i; j <= STREAM.length; j += 7) {
        const h = harness();
        h.splitter.push(STREAM.subarray(0, i));
        h.splitter.push(STREAM.subarray(i, j));
        h.splitter.push(STREAM.subarray(j));
        h.splitter.end();
        expect(h.objects).toEqual(TEXTS);
      }
    }
    const h = harness();
    for (let i = 0; i < STREAM.length; i++) h.splitter.push(STREAM.subarray(i, i + 1));
    h.splitter.end();
    expect(h.errors).toEqual([]);
    expect(h.objects).toEqual(TEXTS);
  });

  it('round-trips arbitrary JSON objects under arbitrary chunking (property)', () => {
    const obj = fc.dictionary(fc.string({ unit: 'binary' }), fc.jsonValue());
    fc.assert(
      fc.property(fc.array(obj, { maxLength: 5 }), fc.boolean(), fc.array(fc.nat(), { maxLength: 8 }), (objs, pretty, cuts) => {
        const texts = objs.map((o) => JSON.stringify(o, null, pretty ? 2 : undefined));
        const buf = Buffer.from(texts.join(pretty ? '\n' : ''), 'utf8');
        const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
        const h = harness();
        let prev = 0;
        for (const p of [...points, buf.length]) {
          h.splitter.push(buf.subarray(prev, p));
          prev = p;
        }
        h.splitter.end();
        expect(h.errors).toEqual([]);
        expect(h.objects).toEqual(texts);
      }),
      { numRuns: 300 },
    );
  });

  it('delivers many objects from one chunk', () => {
    const texts = Array.from({ length: 2000 }, (_, i) => JSON.stringify({ i, s: `x{${i}}"` }));
    const h = harness();
    h.splitter.push(Buffer.from(texts.join('\n')));
    h.splitter.end();
    expect(h.errors).toEqual([]);
    expect(h.objects).toEqual(texts);
  });

  it('skips an object larger than maxObjectBytes once, then resumes with the next', () => {
    const small1 = '{"a":1}';
    // Braces and quotes inside the big object's strings must not end it early.
    const big = JSON.stringify({ pad: 'x'.repeat(100), tricky: '}}}"{', nested: { n: [{}, {}] } });
    const small2 = '{"b":"}"}';
    const input = Buffer.from(small1 + big + small2);
    for (const chunking of ['whole', 'bytewise']) {
      const h = harness(64);
      if (chunking === 'whole') h.splitter.push(input);
      else for (let i = 0; i < input.length; i++) h.splitter.push(input.subarray(i, i + 1));
      h.splitter.end();
      expect(h.objects, chunking).toEqual([small1, small2]);
      expect(h.errors.map((e) => e[0]), chunking).toEqual(['object_too_large']);
    }
  });

  it('accepts an object of exactly maxObjectBytes', () => {
    const t = '{"abc":"defgh"}';
    const h = harness(t.length);
    h.splitter.push(Buffer.from(t.slice(0, 5)));
    h.splitter.push(Buffer.from(t.slice(5)));
    expect(h.objects).toEqual([t]);
    expect(h.errors).toEqual([]);
  });

  it('reports one error per run of garbage and skips to the next "{"', () => {
    const h = harness();
    h.splitter.push(Buffer.from('  {"a":1}\n xx yy \n{"b":2}]{"c":3}\r\n\t{"d":4} tail'));
    h.splitter.end();
    expect(h.objects.map((t) => JSON.parse(t))).toEqual([{ a: 1 }, { b: 2 }, { c: 3 }, { d: 4 }]);
    expect(h.errors.map((e) => e[0])).toEqual(['garbage', 'garbage', 'garbage']);
    expect(h.errors[0]![1]).toMatch(/0x78.*offset 11/);
  });

  it('reports a truncated trailing object at end()', () => {
    const h = harness();
    h.splitter.push(Buffer.from('{"a":1}{"b":"unterminated }'));
    h.splitter.end();
    expect(h.objects).toEqual(['{"a":1}']);
    expect(h.errors).toHaveLength(1);
    expect(h.errors[0]![0]).toBe('garbage');
    expect(h.errors[0]![1]).toMatch(/truncated/);
    // Reusable after end().
    h.splitter.push(Buffer.from('{"c":3}'));
    expect(h.objects).toEqual(['{"a":1}', '{"c":3}']);
  });

  it('keeps at most maxObjectBytes of an object buffered', () => {
    const max = 256 * 1024;
    const h = harness(max);
    const internals = h.splitter as unknown as { partBytes: number; parts: Buffer[] };
    const chunk = Buffer.alloc(64 * 1024, 'a'.charCodeAt(0));
    let peak = 0;
    h.splitter.push(Buffer.from('{"body":"'));
    for (let i = 0; i < 160; i++) {
      // 10 MiB of string content in one object
      h.splitter.push(chunk);
      peak = Math.max(peak, internals.partBytes, internals.parts.reduce((n, p) => n + p.length, 0));
    }
    h.splitter.push(Buffer.from('"}{"next":true}'));
    h.splitter.end();
    expect(peak).toBeLessThanOrEqual(max);
    expect(h.errors.map((e) => e[0])).toEqual(['object_too_large']);
    expect(h.objects).toEqual(['{"next":true}']);
  });

  it('is linear: a 20 MiB object in 1 KiB chunks is split quickly', () => {
    const h = harness(32 << 20);
    const text = JSON.stringify({ data: 'A'.repeat(20 << 20) });
    const buf = Buffer.from(text);
    const t0 = performance.now();
    for (let i = 0; i < buf.length; i += 1024) h.splitter.push(buf.subarray(i, i + 1024));
    expect(h.objects).toHaveLength(1);
    expect(h.objects[0]!.length).toBe(text.length);
    expect(performance.now() - t0).toBeLessThan(5000);
  });
});
