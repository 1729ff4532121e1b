import net from 'node:net';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { formatEndpoint, parseIp } from '../../src/flow/address.js';

/** What parseIp must answer for an IPv4 text: Node's own reading of it. */
const reference4 = (text: string): number[] | null => (net.isIPv4(text) ? text.split('.').map(Number) : null);

describe('parseIp', () => {
  it('reads IPv4 exactly as net.isIPv4 does, for canonical quads and near misses alike', () => {
    const octet = fc.oneof(fc.integer({ min: 0, max: 255 }).map(String), fc.constantFrom('256', '999', '01', '00', '1a', '', '-1', ' 1', '1 '));
    const text = fc.oneof(
      fc.tuple(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 255 })).map((q) => q.join('.')),
      fc.array(octet, { minLength: 1, maxLength: 6 }).map((q) => q.join('.')),
      fc.string({ maxLength: 16 }),
    );
    fc.assert(
      fc.property(text, (t) => {
        const got = parseIp(t);
        const want = reference4(t);
        if (want) expect(got && !got.v6 ? Array.from(got.ip) : null).toEqual(want);
        else expect(got === null || got.v6 || t.includes(':')).toBe(true);
      }),
      { numRuns: 5000 },
    );
  });

  it('reads IPv6, maps ::ffff:a.b.c.d to IPv4 and drops zone ids', () => {
    expect(parseIp('::ffff:10.1.2.3')).toEqual({ v6: false, ip: Uint8Array.from([10, 1, 2, 3]) });
    expect(parseIp('fe80::1%eth0')).toEqual({ v6: true, ip: Uint8Array.from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]) });
    expect(parseIp('10.0.0.1%eth0')).toEqual({ v6: false, ip: Uint8Array.from([10, 0, 0, 1]) });
    expect(parseIp('envoy.local')).toBeNull();
  });

  it('formats endpoints as address:port, IPv6 in brackets', () => {
    expect(formatEndpoint({ v6: false, ip: Uint8Array.from([10, 0, 0, 255]), port: 443, synthetic: false })).toBe('10.0.0.255:443');
    expect(formatEndpoint({ v6: true, ip: parseIp('2001:db8::7')!.ip, port: 8443, synthetic: false })).toBe('[2001:db8:0:0:0:0:0:7]:8443');
  });
});
