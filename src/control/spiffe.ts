/**
 * SPIFFE identities (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md and
 * X509-SVID.md): the ID lives in the one URI subjectAltName of an X.509-SVID.
 *
 *  - `spiffeIdOf(cert)` extracts and validates it (null when the certificate has no valid one, or
 *    more than one URI SAN, which the X509-SVID spec forbids).
 *  - `SpiffeMatcher` is an allowlist of globs: `*` matches within one path segment (no `/`),
 *    `**` matches anything including `/`, `?` one character other than `/`; everything else is
 *    literal. `spiffe://example.org/ns/*\/sa/web` allows service account `web` in any namespace;
 *    `spiffe://example.org/**` the whole trust domain. Patterns are validated when built.
 *  - `spiffeToPathComponent` turns an ID into one safe file-name component (injective).
 */
import { X509Certificate } from 'node:crypto';
import type { PeerCertificate } from 'node:tls';

const MAX_ID_LENGTH = 2048;
const TRUST_DOMAIN = /^[a-z0-9._-]+$/;
const SEGMENT = /^[A-Za-z0-9._-]+$/;

/** Why a string is not a SPIFFE ID, or null when it is one. */
export function spiffeIdError(id: string): string | null {
  if (id.length > MAX_ID_LENGTH) return `longer than ${MAX_ID_LENGTH} bytes`;
  if (!id.startsWith('spiffe://')) return 'scheme is not spiffe://';
  const rest = id.slice('spiffe://'.length);
  const slash = rest.indexOf('/');
  const td = slash < 0 ? rest : rest.slice(0, slash);
  if (td === '') return 'empty trust domain';
  if (!TRUST_DOMAIN.test(td)) return `trust domain "${td}" has characters other than [a-z0-9._-] (no port, user info or upper case)`;
  if (slash < 0) return null;
  const segments = rest.slice(slash + 1).split('/');
  for (const s of segments) {
    if (s === '') return 'empty path segment (or trailing slash)';
    if (s === '.' || s === '..') return 'path segment "." or ".."';
    if (!SEGMENT.test(s)) return `path segment "${s}" has characters other than [A-Za-z0-9._-]`;
  }
  return null;
}

export function isSpiffeId(id: string): boolean {
  return spiffeIdError(id) === null;
}

/**
 * Splits Node's subjectaltname text ("DNS:a, IP Address:1.2.3.4, URI:spiffe://x/y") into
 * [type, value] pairs. Values with special characters are JSON-quoted by Node (CVE-2021-44532).
 */
export function parseSubjectAltName(text: string | undefined): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  if (!text) return out;
  let i = 0;
  while (i < text.length) {
    while (text[i] === ' ' || text[i] === ',') i++;
    if (i >= text.length) break;
    const colon = text.indexOf(':', i);
    if (colon < 0) break;
    const type = text.slice(i, colon);
    i = colon + 1;
    let value: string;
    if (text[i] === '"') {
      // A JSON string: find its closing quote, skipping escapes.
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      try {
        value = JSON.parse(text.slice(i, j + 1)) as string;
      } catch {
        value = text.slice(i + 1, j);
      }
      i = j + 1;
    } else {
      const comma = text.indexOf(', ', i);
      const end = comma < 0 ? text.length : comma;
      value = text.slice(i, end);
      i = end;
    }
    out.push([type, value]);
  }
  return out;
}

/** The URI SANs of a certificate (peer certificate object, X509Certificate, or PEM/DER). */
export function uriSans(cert: PeerCertificate | X509Certificate | Buffer | string | null | undefined): string[] {
  if (!cert) return [];
  let san: string | undefined;
  if (cert instanceof X509Certificate) san = cert.subjectAltName;
  else if (typeof cert === 'string' || Buffer.isBuffer(cert)) san = new X509Certificate(cert).subjectAltName;
  else san = cert.subjectaltname;
  return parseSubjectAltName(san)
    .filter(([t]) => t === 'URI')
    .map(([, v]) => v);
}

/**
 * The SPIFFE ID of a certificate: its single URI SAN when that is a valid SPIFFE ID; null when it
 * has none, several URI SANs, or an invalid one (the reason goes to `why` when given).
 */
export function spiffeIdOf(cert: PeerCertificate | X509Certificate | Buffer | string | null | undefined, why?: { reason?: string }): string | null {
  const uris = uriSans(cert);
  if (uris.length === 0) {
    if (why) why.reason = 'no URI SAN';
    return null;
  }
  if (uris.length > 1) {
    if (why) why.reason = `${uris.length} URI SANs (an X509-SVID has exactly one)`;
    return null;
  }
  const err = spiffeIdError(uris[0]!);
  if (err) {
    if (why) why.reason = `URI SAN is not a SPIFFE ID: ${err}`;
    return null;
  }
  return uris[0]!;
}

/** Validates a glob pattern; returns the reason it is invalid, or null. */
export function spiffePatternError(pattern: string): string | null {
  if (!pattern.startsWith('spiffe://')) return 'must start with spiffe://';
  // Replace wildcards by a placeholder segment character and validate the rest as an ID.
  const probe = pattern.replace(/\*\*/g, 'x').replace(/[*?]/g, 'x');
  if (/\*\*\*/.test(pattern)) return '"***" is ambiguous';
  const err = spiffeIdError(probe);
  return err ? `not a SPIFFE ID pattern: ${err}` : null;
}

function globToRegExp(pattern: string): RegExp {
  let re = '^';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    if (c === '*' && pattern[i + 1] === '*') {
      re += '.*';
      i++;
    } else if (c === '*') {
      re += '[^/]*';
    } else if (c === '?') {
      re += '[^/]';
    } else {
      re += c.replace(/[.+^${}()|[\]\\-]/g, '\\$&');
    }
  }
  return new RegExp(`${re}$`);
}

/** An allowlist of SPIFFE ID globs. */
export class SpiffeMatcher {
  private readonly res: Array<{ pattern: string; re: RegExp }>;

  constructor(readonly patterns: string[]) {
    this.res = patterns.map((p) => {
      const err = spiffePatternError(p);
      if (err) throw new Error(`SPIFFE ID pattern "${p}": ${err}`);
      return { pattern: p, re: globToRegExp(p) };
    });
  }

  /** The first pattern that allows `id`, or null. Invalid IDs never match. */
  match(id: string | null): string | null {
    if (id === null || !isSpiffeId(id)) return null;
    for (const { pattern, re } of this.res) if (re.test(id)) return pattern;
    return null;
  }

  allows(id: string | null): boolean {
    return this.match(id) !== null;
  }
}

/**
 * A SPIFFE ID as one file-name component: `spiffe://example.org/ns/a/sa/b` →
 * `example.org+ns+a+sa+b`. Injective for valid IDs ('+' cannot occur in one), never `.`/`..`,
 * and free of '/'. Returns null for anything that is not a valid SPIFFE ID.
 */
export function spiffeToPathComponent(id: string): string | null {
  if (!isSpiffeId(id)) return null;
  const s = id.slice('spiffe://'.length).replace(/\//g, '+');
  // A trust domain may start with '.' by the character rules alone; keep the name visible and
  // never "." or "..". '+' cannot start the text otherwise, so this stays injective.
  return s.startsWith('.') ? `+${s}` : s;
}

/** Any text as a short safe file-name component ([A-Za-z0-9._-], at most `max` characters). */
export function safeComponent(text: string, max = 64): string {
  let s = text.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, max);
  if (s === '' || s.startsWith('.')) s = `_${s}`;
  return s;
}
