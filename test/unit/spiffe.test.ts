/**
 * SPIFFE IDs: validation by the SPIFFE-ID spec, extraction from a certificate's URI SAN (real
 * certificates made with openssl), allowlist globs, and the file-name mapping collect uses.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  isSpiffeId,
  parseSubjectAltName,
  safeComponent,
  SpiffeMatcher,
  spiffeIdError,
  spiffeIdOf,
  spiffePatternError,
  spiffeToPathComponent,
} from '../../src/control/spiffe.js';
import { TestPki, type LeafCertificate } from '../helpers/pki.js';

describe('SPIFFE ID validation', () => {
  it('accepts IDs the spec allows', () => {
    for (const id of ['spiffe://example.org', 'spiffe://example.org/ns/default/sa/web', 'spiffe://a-b_c.d/x.y-z_1/A', 'spiffe://cluster.local/ns/x/sa/y']) {
      expect(spiffeIdError(id), id).toBeNull();
    }
  });

  it('rejects what the spec forbids, naming the problem', () => {
    const bad: Record<string, RegExp> = {
      'https://example.org/x': /scheme/,
      'spiffe://': /empty trust domain/,
      'spiffe:///path': /empty trust domain/,
      'spiffe://Example.org/x': /trust domain/,
      'spiffe://example.org:8443/x': /trust domain/,
      'spiffe://user@example.org/x': /trust domain/,
      'spiffe://example.org/': /empty path segment/,
      'spiffe://example.org//x': /empty path segment/,
      'spiffe://example.org/a/../b': /"\.\."/,
      'spiffe://example.org/./b': /"\."/,
      'spiffe://example.org/a b': /characters/,
      'spiffe://example.org/a?q=1': /characters/,
      'spiffe://example.org/a#f': /characters/,
      'spiffe://example.org/%41': /characters/,
    };
    for (const [id, re] of Object.entries(bad)) expect(spiffeIdError(id), id).toMatch(re);
    expect(spiffeIdError(`spiffe://example.org/${'a'.repeat(2048)}`)).toMatch(/longer/);
  });
});

describe('subjectAltName parsing', () => {
  it('splits Node’s text form, JSON-quoted values included', () => {
    expect(parseSubjectAltName('DNS:localhost, IP Address:127.0.0.1, URI:spiffe://t/x')).toEqual([
      ['DNS', 'localhost'],
      ['IP Address', '127.0.0.1'],
      ['URI', 'spiffe://t/x'],
    ]);
    // A value with ", " inside is quoted so it cannot forge another entry.
    expect(parseSubjectAltName('URI:"spiffe://t/x, URI:spiffe://t/admin", DNS:a')).toEqual([
      ['URI', 'spiffe://t/x, URI:spiffe://t/admin'],
      ['DNS', 'a'],
    ]);
    expect(parseSubjectAltName(undefined)).toEqual([]);
  });
});

describe('spiffeIdOf (real certificates)', () => {
  let pki: TestPki;
  let one: LeafCertificate;
  let two: LeafCertificate;
  let none: LeafCertificate;
  let notSpiffe: LeafCertificate;
  beforeAll(async () => {
    pki = await TestPki.create();
    const ca = await pki.ca('ca');
    [one, two, none, notSpiffe] = await Promise.all([
      pki.leaf(ca, 'one', { dns: ['x.example'], uri: ['spiffe://test.example/ns/a/sa/b'] }),
      pki.leaf(ca, 'two', { uri: ['spiffe://test.example/a', 'spiffe://test.example/b'] }),
      pki.leaf(ca, 'none', { dns: ['x.example'] }),
      pki.leaf(ca, 'https', { uri: ['https://test.example/a'] }),
    ]);
  });
  afterAll(() => pki.remove());

  it('reads the one URI SAN of an X509-SVID', () => {
    expect(spiffeIdOf(fs.readFileSync(one.cert))).toBe('spiffe://test.example/ns/a/sa/b');
  });

  it('refuses certificates that are not X509-SVIDs, with the reason', () => {
    for (const [leaf, re] of [
      [two, /2 URI SANs/],
      [none, /no URI SAN/],
      [notSpiffe, /not a SPIFFE ID/],
    ] as const) {
      const why: { reason?: string } = {};
      expect(spiffeIdOf(fs.readFileSync(leaf.cert), why)).toBeNull();
      expect(why.reason).toMatch(re);
    }
  });
});

describe('SpiffeMatcher', () => {
  const m = new SpiffeMatcher(['spiffe://cluster.local/ns/*/sa/meshcap', 'spiffe://prod.example/**', 'spiffe://cluster.local/ns/shop/sa/web-?']);

  it('matches * within a segment, ** across segments, ? one character', () => {
    expect(m.match('spiffe://cluster.local/ns/shop/sa/meshcap')).toBe('spiffe://cluster.local/ns/*/sa/meshcap');
    expect(m.allows('spiffe://cluster.local/ns/a/b/sa/meshcap')).toBe(false); // * does not cross '/'
    expect(m.allows('spiffe://prod.example/ns/a/sa/b')).toBe(true);
    expect(m.allows('spiffe://prod.example')).toBe(false);
    expect(m.allows('spiffe://prod.example.evil/x')).toBe(false);
    expect(m.allows('spiffe://cluster.local/ns/shop/sa/web-1')).toBe(true);
    expect(m.allows('spiffe://cluster.local/ns/shop/sa/web-12')).toBe(false);
  });

  it('treats everything else literally (dots are not regex wildcards)', () => {
    const lit = new SpiffeMatcher(['spiffe://a.b/x']);
    expect(lit.allows('spiffe://aXb/x')).toBe(false);
    expect(lit.allows('spiffe://a.b/x')).toBe(true);
  });

  it('never matches invalid IDs or null', () => {
    const all = new SpiffeMatcher(['spiffe://**']);
    expect(all.allows('spiffe://t/x')).toBe(true);
    expect(all.allows('spiffe://t/../x')).toBe(false);
    expect(all.allows(null)).toBe(false);
  });

  it('refuses invalid patterns when built', () => {
    expect(spiffePatternError('https://x/**')).toMatch(/spiffe:\/\//);
    expect(spiffePatternError('spiffe://x/a b')).toMatch(/characters/);
    expect(() => new SpiffeMatcher(['spiffe://UPPER/x'])).toThrow(/trust domain/);
  });
});

describe('file names', () => {
  it('maps SPIFFE IDs to one safe, distinct path component', () => {
    expect(spiffeToPathComponent('spiffe://cluster.local/ns/shop/sa/web')).toBe('cluster.local+ns+shop+sa+web');
    expect(spiffeToPathComponent('spiffe://t/a_b/c')).not.toBe(spiffeToPathComponent('spiffe://t/a/b_c'));
    expect(spiffeToPathComponent('spiffe://..')).toBe('+..');
    expect(spiffeToPathComponent('spiffe://t/../x')).toBeNull();
    expect(isSpiffeId('spiffe://t/x')).toBe(true);
  });

  it('sanitizes free text', () => {
    expect(safeComponent('../../etc/passwd')).toBe('_.._.._etc_passwd');
    expect(safeComponent('')).toBe('_');
    expect(safeComponent('x'.repeat(100))).toHaveLength(64);
  });
});
