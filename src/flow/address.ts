/**
 * Turns Envoy's description of a connection endpoint into the IP address and port the synthetic
 * packets carry.
 *
 * Real socket addresses are used as they are, with IPv4-mapped IPv6 (::ffff:a.b.c.d) normalised to
 * IPv4 and zone ids dropped. Endpoints that have no IP get deterministic synthetic addresses from
 * ranges that never appear on a real network, so a capture always dissects and the same endpoint
 * always gets the same address (documented in docs/synthetic-addresses.md):
 *
 *   kind                         IPv4 (default)        IPv6 (when the other side is IPv6)
 *   Unix pipe (path)             198.18.x.y            fd00:6d63:1::/48 + hash
 *   Envoy internal (listener)    198.19.x.y            fd00:6d63:2::/48 + hash
 *   unknown (not sent by Envoy)  198.19.255.x (x=1,2)  fd00:6d63:3::1 / ::2
 *
 * Ports: a synthetic local (Envoy) side gets 1024 + hash % 48128; a synthetic remote side gets
 * 49152 + trace_id % 16384, so concurrent connections to one pipe stay distinct.
 */
import net from 'node:net';
import type { TapAddress } from '../ingest/tap-event.js';

export interface Endpoint {
  v6: boolean;
  /** 4 or 16 bytes, network order. */
  ip: Uint8Array;
  port: number;
  /** True when meshcap made the address up (pipe, internal, unknown). */
  synthetic: boolean;
}

/** Parses a literal IPv4/IPv6 address, or returns null. */
export function parseIp(text: string): { v6: boolean; ip: Uint8Array } | null {
  const v4 = dottedQuad(text);
  if (v4) return { v6: false, ip: v4 };
  const addr = text.includes('%') ? text.slice(0, text.indexOf('%')) : text;
  if (net.isIPv4(addr)) return { v6: false, ip: Uint8Array.from(addr.split('.').map(Number)) };
  if (!net.isIPv6(addr)) return null;
  const ip = parseIpv6(addr);
  // ::ffff:a.b.c.d is an IPv4 peer on a dual-stack socket: show it as IPv4.
  if (ip.subarray(0, 10).every((b) => b === 0) && ip[10] === 0xff && ip[11] === 0xff) {
    return { v6: false, ip: ip.slice(12) };
  }
  return { v6: true, ip };
}

/**
 * The common case, a canonical dotted quad ("10.1.2.3"), parsed by hand: once per connection, and
 * net.isIPv4 + split was a visible share of opening one. Anything else (leading zeros, zone ids,
 * IPv6) returns null and takes the general path.
 */
function dottedQuad(text: string): Uint8Array | null {
  const n = text.length;
  if (n < 7 || n > 15) return null;
  const ip = new Uint8Array(4);
  let part = 0;
  let i = 0;
  while (i < n) {
    const start = i;
    let v = 0;
    while (i < n) {
      const c = text.charCodeAt(i) - 48;
      if (c < 0 || c > 9) break;
      v = v * 10 + c;
      i++;
    }
    const digits = i - start;
    if (digits === 0 || digits > 3 || v > 255 || (digits > 1 && text.charCodeAt(start) === 48)) return null;
    ip[part++] = v;
    if (i === n) break;
    if (part === 4 || text.charCodeAt(i) !== 46) return null;
    i++;
    if (i === n) return null;
  }
  return part === 4 ? ip : null;
}

function parseIpv6(addr: string): Uint8Array {
  let text = addr;
  const out = new Uint8Array(16);
  // A trailing dotted quad (::ffff:1.2.3.4) becomes two hex groups.
  const lastColon = text.lastIndexOf(':');
  const tail = text.slice(lastColon + 1);
  if (tail.includes('.')) {
    const q = tail.split('.').map(Number);
    text = `${text.slice(0, lastColon + 1)}${((q[0]! << 8) | q[1]!).toString(16)}:${((q[2]! << 8) | q[3]!).toString(16)}`;
  }
  const [head, rest] = text.includes('::') ? text.split('::') : [text, undefined];
  const headGroups = head ? head.split(':') : [];
  const tailGroups = rest !== undefined && rest !== '' ? rest.split(':') : [];
  const groups = [...headGroups, ...new Array(8 - headGroups.length - tailGroups.length).fill('0'), ...tailGroups];
  groups.forEach((g, i) => {
    const v = parseInt(g, 16);
    out[i * 2] = v >>> 8;
    out[i * 2 + 1] = v & 0xff;
  });
  return out;
}

/** FNV-1a, 32 bits: small, stable across versions and platforms. */
export function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

type Role = 'local' | 'remote';

/**
 * Resolves both endpoints of a connection. The family of synthetic endpoints follows the real
 * side when there is one, so both ends of a flow are always the same IP version.
 */
export function resolveEndpoints(local: TapAddress, remote: TapAddress, traceId: number | string): { local: Endpoint; remote: Endpoint } {
  const l = real(local);
  const r = real(remote);
  const v6 = (l ?? r)?.v6 ?? false;
  return {
    local: l && l.v6 === v6 ? l : synthetic(local, 'local', v6, traceId),
    remote: r && r.v6 === v6 ? r : synthetic(remote, 'remote', v6, traceId),
  };
}

function real(a: TapAddress): Endpoint | null {
  if (a.kind !== 'socket') return null;
  const p = parseIp(a.address);
  return p ? { v6: p.v6, ip: p.ip, port: a.port, synthetic: false } : null;
}

function synthetic(a: TapAddress, role: Role, v6: boolean, traceId: number | string): Endpoint {
  let name: string;
  let net4: number; // second octet under 198.x
  let net6: number; // third hextet under fd00:6d63::/32
  switch (a.kind) {
    case 'pipe':
      name = `pipe:${a.path}`;
      net4 = 18;
      net6 = 1;
      break;
    case 'internal':
      name = `internal:${a.listener}/${a.endpointId}`;
      net4 = 19;
      net6 = 2;
      break;
    default:
      // A socket address that is not an IP literal (a hostname) is hashed like a name.
      if (a.kind === 'socket') {
        name = `socket:${a.address}`;
        net4 = 19;
        net6 = 2;
        break;
      }
      return unknownEndpoint(role, v6, traceId);
  }
  const h = fnv1a(name);
  const port = role === 'local' ? 1024 + (h % 48128) : clientPort(traceId);
  if (!v6) {
    // Keep 198.19.255.0/24 for unknown endpoints.
    const hi = net4 === 19 ? (h >>> 8) % 255 : (h >>> 8) & 0xff;
    return { v6, ip: Uint8Array.from([198, net4, hi, (h & 0xff) || 1]), port, synthetic: true };
  }
  const ip = new Uint8Array(16);
  ip.set([0xfd, 0x00, 0x6d, 0x63, 0, net6]);
  const h2 = fnv1a(`${name}#2`);
  for (let i = 0; i < 4; i++) {
    ip[8 + i] = (h >>> (24 - 8 * i)) & 0xff;
    ip[12 + i] = (h2 >>> (24 - 8 * i)) & 0xff;
  }
  return { v6, ip, port, synthetic: true };
}

function unknownEndpoint(role: Role, v6: boolean, traceId: number | string): Endpoint {
  const last = role === 'local' ? 1 : 2;
  const port = role === 'local' ? 1024 : clientPort(traceId);
  if (!v6) return { v6, ip: Uint8Array.from([198, 19, 255, last]), port, synthetic: true };
  const ip = new Uint8Array(16);
  ip.set([0xfd, 0x00, 0x6d, 0x63, 0, 3]);
  ip[15] = last;
  return { v6, ip, port, synthetic: true };
}

function clientPort(traceId: number | string): number {
  const n = typeof traceId === 'number' ? traceId : fnv1a(traceId);
  return 49152 + (n % 16384);
}

export function formatEndpoint(e: Endpoint): string {
  if (!e.v6) return `${e.ip[0]}.${e.ip[1]}.${e.ip[2]}.${e.ip[3]}:${e.port}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((e.ip[i]! << 8) | e.ip[i + 1]!).toString(16));
  return `[${groups.join(':')}]:${e.port}`;
}
