/**
 * Per-viewer filters of the live endpoint: which flows a viewer sees.
 *
 * Syntax (docs/live.md): clauses separated by spaces or commas, each `key=value` (or `key value`):
 *
 *   host=ADDR | host=CIDR     either endpoint's IP address (IPv4 or IPv6; 10.0.0.0/8, fd00::/8)
 *   port=N | port=N-M         either endpoint's TCP port
 *   node=NAME                 the Envoy node id; `*` matches any run of characters, `?` one
 *   flow=ID                   the Envoy connection (trace_id, as in the first packet's comment)
 *
 * Clauses with the same key are alternatives (any of them), different keys must all match:
 * `host=10.0.0.5 host=10.0.0.6 port=443` is (host 10.0.0.5 or 10.0.0.6) and port 443. An empty
 * filter matches everything. A filter decides per flow (all packets of a connection or none).
 */
import { parseIp } from '../flow/address.js';

/** What a filter looks at: one flow's endpoints and identity. */
export interface FlowMeta {
  /** Envoy node id, null when unknown. */
  nodeId: string | null;
  /** Envoy trace id (connection id), as text; null when unknown. */
  traceId: string | null;
  /** Both endpoints' addresses (4 or 16 bytes, network order) and ports. */
  addrs: Uint8Array[];
  ports: number[];
}

/** The flow metadata FlowTable.flowInfo() gives (TcpFlow satisfies it). */
export interface LiveFlowInfo {
  readonly nodeId: string;
  readonly traceId: number | string;
  readonly local: { readonly ip: Uint8Array; readonly port: number };
  readonly remote: { readonly ip: Uint8Array; readonly port: number };
}

export class FilterError extends Error {}

interface Cidr {
  ip: Uint8Array;
  bits: number;
}

export interface LiveFilter {
  /** Canonical text (keys sorted, one clause each), for logs and audit. */
  readonly text: string;
  /** True when the filter needs the Envoy node or trace id (not in the frame headers). */
  readonly needsIdentity: boolean;
  matches(meta: FlowMeta): boolean;
}

const KEYS = new Set(['host', 'port', 'node', 'flow']);
const ALIASES: Record<string, string> = { trace: 'flow', net: 'host' };
export const MAX_FILTER_LENGTH = 2048;

/** Parses a filter; throws FilterError with a message a user can act on. Empty text → null. */
export function parseLiveFilter(text: string | null | undefined): LiveFilter | null {
  if (text === null || text === undefined) return null;
  if (text.length > MAX_FILTER_LENGTH) throw new FilterError(`filter is longer than ${MAX_FILTER_LENGTH} characters`);
  const tokens = text.split(/[\s,]+/).filter(Boolean);
  if (tokens.length === 0) return null;
  const hosts: Cidr[] = [];
  const ports: Array<[number, number]> = [];
  const nodes: RegExp[] = [];
  const flows = new Set<string>();
  const canon: Record<string, string[]> = { host: [], port: [], node: [], flow: [] };
  for (let i = 0; i < tokens.length; i++) {
    const tok = tokens[i]!;
    let key: string;
    let value: string;
    const eq = tok.indexOf('=');
    if (eq > 0) {
      key = tok.slice(0, eq).toLowerCase();
      value = tok.slice(eq + 1);
    } else {
      key = tok.toLowerCase();
      if (key === 'and' || key === 'or' || key === 'not' || key === '!' || key === '&&' || key === '||') {
        throw new FilterError(
          `"${tok}" is not supported: write clauses like "host=10.0.0.5 port=443"; clauses with the same key are alternatives, different keys must all match`,
        );
      }
      if (!KEYS.has(ALIASES[key] ?? key)) throw new FilterError(`unknown filter clause "${tok}": expected host=, port=, node= or flow=`);
      value = tokens[++i] ?? '';
    }
    key = ALIASES[key] ?? key;
    if (!KEYS.has(key)) throw new FilterError(`unknown filter key "${key}": expected host, port, node or flow`);
    if (value === '') throw new FilterError(`filter clause "${key}" needs a value`);
    switch (key) {
      case 'host': {
        const c = parseCidr(value);
        hosts.push(c);
        canon.host!.push(value.replace(/^\[|\]$/g, ''));
        break;
      }
      case 'port': {
        const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(value);
        const lo = m ? Number(m[1]) : NaN;
        const hi = m ? Number(m[2] ?? m[1]) : NaN;
        if (!m || lo < 1 || hi > 65535 || lo > hi) throw new FilterError(`port "${value}": expected a port 1-65535 or a range like 8000-8100`);
        ports.push([lo, hi]);
        canon.port!.push(lo === hi ? String(lo) : `${lo}-${hi}`);
        break;
      }
      case 'node':
        nodes.push(globToRegExp(value));
        canon.node!.push(value);
        break;
      case 'flow':
        if (!/^\d{1,20}$/.test(value)) throw new FilterError(`flow "${value}": expected an Envoy trace_id (a decimal number, as in the first packet's comment)`);
        flows.add(BigInt(value).toString());
        canon.flow!.push(BigInt(value).toString());
        break;
    }
  }
  const textOut = Object.entries(canon)
    .flatMap(([k, vs]) => vs.map((v) => `${k}=${v}`))
    .join(' ');
  return {
    text: textOut,
    needsIdentity: nodes.length > 0 || flows.size > 0,
    matches(meta: FlowMeta): boolean {
      if (hosts.length > 0 && !hosts.some((c) => meta.addrs.some((a) => inCidr(a, c)))) return false;
      if (ports.length > 0 && !ports.some(([lo, hi]) => meta.ports.some((p) => p >= lo && p <= hi))) return false;
      if (nodes.length > 0 && (meta.nodeId === null || !nodes.some((r) => r.test(meta.nodeId!)))) return false;
      if (flows.size > 0 && (meta.traceId === null || !flows.has(meta.traceId))) return false;
      return true;
    },
  };
}

function parseCidr(value: string): Cidr {
  const slash = value.indexOf('/');
  const addrText = (slash >= 0 ? value.slice(0, slash) : value).replace(/^\[|\]$/g, '');
  const parsed = parseIp(addrText);
  if (!parsed) throw new FilterError(`host "${value}": expected an IPv4 or IPv6 address, optionally with /prefix (host names are not resolved)`);
  const max = parsed.ip.length * 8;
  let bits = max;
  if (slash >= 0) {
    const b = value.slice(slash + 1);
    if (!/^\d{1,3}$/.test(b) || Number(b) > max) throw new FilterError(`host "${value}": prefix length must be 0-${max}`);
    bits = Number(b);
  }
  return { ip: parsed.ip, bits };
}

function inCidr(addr: Uint8Array, c: Cidr): boolean {
  if (addr.length !== c.ip.length) return false;
  let bits = c.bits;
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff;
    if ((addr[i]! & mask) !== (c.ip[i]! & mask)) return false;
  }
  return true;
}

function globToRegExp(glob: string): RegExp {
  const re = glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`);
}

/** Flow metadata from the flow table's record of an open flow. */
export function metaFromFlowInfo(info: LiveFlowInfo): FlowMeta {
  return {
    nodeId: info.nodeId,
    traceId: String(info.traceId),
    addrs: [info.local.ip, info.remote.ip],
    ports: [info.local.port, info.remote.port],
  };
}

const ETH_LEN = 14;

/**
 * Flow metadata read from a synthetic frame's own headers (Ethernet + IPv4/IPv6 + TCP), for a flow
 * the flow table no longer holds (opened and closed between two flushes). Node and trace id are
 * taken from the flow's introductory packet comment when given. Null when the frame is too short
 * or not IP.
 */
export function metaFromFrame(buf: Uint8Array, off: number, len: number, intro: { nodeId: string; traceId: string } | null): FlowMeta | null {
  if (len < ETH_LEN + 20) return null;
  const etherType = (buf[off + 12]! << 8) | buf[off + 13]!;
  let src: Uint8Array;
  let dst: Uint8Array;
  let tcp: number;
  if (etherType === 0x0800) {
    const ihl = (buf[off + ETH_LEN]! & 0x0f) * 4;
    src = copy(buf, off + ETH_LEN + 12, 4);
    dst = copy(buf, off + ETH_LEN + 16, 4);
    tcp = off + ETH_LEN + ihl;
  } else if (etherType === 0x86dd) {
    if (len < ETH_LEN + 40 + 4) return null;
    src = copy(buf, off + ETH_LEN + 8, 16);
    dst = copy(buf, off + ETH_LEN + 24, 16);
    tcp = off + ETH_LEN + 40;
  } else return null;
  if (tcp + 4 > off + len) return null;
  return {
    nodeId: intro?.nodeId ?? null,
    traceId: intro?.traceId ?? null,
    addrs: [src, dst],
    ports: [(buf[tcp]! << 8) | buf[tcp + 1]!, (buf[tcp + 2]! << 8) | buf[tcp + 3]!],
  };
}

/** A copy (Buffer#slice would be a view into a block that is reused). */
function copy(buf: Uint8Array, off: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  for (let i = 0; i < len; i++) out[i] = buf[off + i]!;
  return out;
}

const INTRO = /^meshcap: envoy node=(\S+) tap_id=\S* trace_id=(\S+) /;

/** Node and trace id from the comment FlowTable puts on a flow's first packet, if it is one. */
export function parseIntroComment(comment: Buffer | null): { nodeId: string; traceId: string } | null {
  if (!comment || comment.length < 22 || comment[0] !== 0x6d /* m */) return null;
  const m = INTRO.exec(comment.toString('utf8', 0, Math.min(comment.length, 4096)));
  return m ? { nodeId: m[1]!, traceId: m[2]! } : null;
}
