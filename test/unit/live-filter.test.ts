/**
 * Live viewer filters: parsing (errors a user can act on), canonical text, matching on flow
 * metadata, and the metadata read back from synthetic frames and first-packet comments.
 */
import { describe, expect, it } from 'vitest';
import { resolveEndpoints } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { metaFromFlowInfo, metaFromFrame, parseIntroComment, parseLiveFilter, type FlowMeta } from '../../src/sink/live-filter.js';
import { parseRequestLine, requestLine } from '../../src/sink/live-server.js';

const meta = (a: string, ap: number, b: string, bp: number, nodeId: string | null = 'sidecar~10.0.0.1~web-1.prod~prod.svc.cluster.local', traceId: string | null = '42'): FlowMeta => {
  const { local, remote } = resolveEndpoints({ kind: 'socket', address: a, port: ap } as never, { kind: 'socket', address: b, port: bp } as never, 1);
  return { nodeId, traceId, addrs: [local.ip, remote.ip], ports: [local.port, remote.port] };
};

describe('parseLiveFilter', () => {
  it('treats empty text as no filter', () => {
    expect(parseLiveFilter('')).toBeNull();
    expect(parseLiveFilter('  , ')).toBeNull();
    expect(parseLiveFilter(null)).toBeNull();
  });

  it('canonicalises: keys in a fixed order, one clause each, key=value and "key value" forms', () => {
    expect(parseLiveFilter('port 443, host=10.0.0.0/8 node=web-*  flow=0042')!.text).toBe('host=10.0.0.0/8 port=443 node=web-* flow=42');
    expect(parseLiveFilter('trace=7 net=[fd00::1]')!.text).toBe('host=fd00::1 flow=7');
  });

  it('explains what is wrong', () => {
    expect(() => parseLiveFilter('host=example.com')).toThrow(/expected an IPv4 or IPv6 address.*host names are not resolved/);
    expect(() => parseLiveFilter('host=10.0.0.0/33')).toThrow(/prefix length must be 0-32/);
    expect(() => parseLiveFilter('port=0')).toThrow(/1-65535/);
    expect(() => parseLiveFilter('port=9000-8000')).toThrow(/range/);
    expect(() => parseLiveFilter('flow=abc')).toThrow(/trace_id/);
    expect(() => parseLiveFilter('tcp port 80')).toThrow(/unknown filter clause "tcp"/);
    expect(() => parseLiveFilter('host=10.0.0.1 and port=80')).toThrow(/"and" is not supported/);
    expect(() => parseLiveFilter('color=red')).toThrow(/unknown filter key "color"/);
    expect(() => parseLiveFilter('host')).toThrow(/needs a value/);
    expect(() => parseLiveFilter('x'.repeat(3000))).toThrow(/longer than/);
  });

  it('matches hosts (either endpoint, CIDR, v4 and v6, v4-mapped addresses as v4)', () => {
    const m = meta('10.1.2.3', 443, '192.168.0.9', 50000);
    expect(parseLiveFilter('host=10.1.2.3')!.matches(m)).toBe(true);
    expect(parseLiveFilter('host=192.168.0.9')!.matches(m)).toBe(true);
    expect(parseLiveFilter('host=10.0.0.0/8')!.matches(m)).toBe(true);
    expect(parseLiveFilter('host=10.1.2.0/31')!.matches(m)).toBe(false);
    expect(parseLiveFilter('host=0.0.0.0/0')!.matches(m)).toBe(true);
    expect(parseLiveFilter('host=::ffff:10.1.2.3')!.matches(m)).toBe(true);
    expect(parseLiveFilter('host=fd00::/8')!.matches(m)).toBe(false);
    const m6 = meta('fd00:6d63::1', 443, '2001:db8::5', 50000);
    expect(parseLiveFilter('host=fd00::/8')!.matches(m6)).toBe(true);
    expect(parseLiveFilter('host=2001:db8::5')!.matches(m6)).toBe(true);
    expect(parseLiveFilter('host=10.0.0.0/8')!.matches(m6)).toBe(false);
  });

  it('matches ports and ranges, nodes with wildcards, flows by trace id', () => {
    const m = meta('10.1.2.3', 443, '192.168.0.9', 50000);
    expect(parseLiveFilter('port=443')!.matches(m)).toBe(true);
    expect(parseLiveFilter('port=50000')!.matches(m)).toBe(true);
    expect(parseLiveFilter('port=49152-65535')!.matches(m)).toBe(true);
    expect(parseLiveFilter('port=80')!.matches(m)).toBe(false);
    expect(parseLiveFilter('node=sidecar~10.0.0.1~web-1.prod~prod.svc.cluster.local')!.matches(m)).toBe(true);
    expect(parseLiveFilter('node=*~web-?.prod~*')!.matches(m)).toBe(true);
    expect(parseLiveFilter('node=web-1')!.matches(m)).toBe(false); // whole id, unless wildcards
    expect(parseLiveFilter('node=sidecar~10.0.0.1~web-1.prod~prod.svc.cluster.local')!.needsIdentity).toBe(true);
    expect(parseLiveFilter('flow=42')!.matches(m)).toBe(true);
    expect(parseLiveFilter('flow=43')!.matches(m)).toBe(false);
    // Unknown node or trace never matches a filter that asks for them.
    expect(parseLiveFilter('node=*')!.matches({ ...m, nodeId: null })).toBe(false);
    expect(parseLiveFilter('flow=42')!.matches({ ...m, traceId: null })).toBe(false);
  });

  it('combines: same key = any of, different keys = all of', () => {
    const m = meta('10.1.2.3', 443, '192.168.0.9', 50000);
    expect(parseLiveFilter('port=80 port=443')!.matches(m)).toBe(true);
    expect(parseLiveFilter('port=80,port=8080')!.matches(m)).toBe(false);
    expect(parseLiveFilter('host=10.1.2.3 port=80')!.matches(m)).toBe(false);
    expect(parseLiveFilter('host=10.9.9.9 host=10.1.2.3 port=443 node=sidecar*')!.matches(m)).toBe(true);
  });
});

describe('flow metadata for filters', () => {
  it('from the flow table (TcpFlow) and from the frame headers agree', () => {
    const { local, remote } = resolveEndpoints({ kind: 'socket', address: '10.0.0.1', port: 8443 } as never, { kind: 'socket', address: '10.0.0.2', port: 40000 } as never, 9);
    const flow = new TcpFlow(3, 'node-x', 9, local, remote, 1460, true, 'intro');
    const fromTable = metaFromFlowInfo(flow);
    expect(fromTable).toMatchObject({ nodeId: 'node-x', traceId: '9', ports: [8443, 40000] });
    // Client → server frame: Ethernet + IPv4 + TCP from the flow's template.
    const frame = flow.template(0);
    const fromFrame = metaFromFrame(frame, 0, frame.length, { nodeId: 'node-x', traceId: '9' })!;
    expect(new Set(fromFrame.ports)).toEqual(new Set([8443, 40000]));
    expect(fromFrame.addrs.map((a) => [...a].join('.')).sort()).toEqual(['10.0.0.1', '10.0.0.2']);
    // A copy: the block the frame lives in is reused for other packets.
    const reused = Buffer.from(frame);
    const kept = metaFromFrame(reused, 0, reused.length, null)!;
    reused.fill(0);
    expect(kept.addrs.map((a) => [...a].join('.')).sort()).toEqual(['10.0.0.1', '10.0.0.2']);
    const f = parseLiveFilter('host=10.0.0.2 port=8443 node=node-x flow=9')!;
    expect(f.matches(fromTable)).toBe(true);
    expect(f.matches(fromFrame)).toBe(true);
  });

  it('reads IPv6 frames, and refuses what is not IP', () => {
    const { local, remote } = resolveEndpoints({ kind: 'socket', address: 'fd00::1', port: 443 } as never, { kind: 'socket', address: 'fd00::2', port: 40000 } as never, 1);
    const flow = new TcpFlow(4, 'n', 1, local, remote, 1440, true, '');
    const m = metaFromFrame(flow.template(1), 0, flow.template(1).length, null)!;
    expect(m.ports).toEqual([443, 40000]);
    expect(m.nodeId).toBeNull();
    expect(parseLiveFilter('host=fd00::2')!.matches(m)).toBe(true);
    const arp = Buffer.alloc(60);
    arp.writeUInt16BE(0x0806, 12);
    expect(metaFromFrame(arp, 0, 60, null)).toBeNull();
  });

  it('parses the first-packet comment of a flow', () => {
    const c = Buffer.from('meshcap: envoy node=sidecar~1~a.b~c tap_id=t1 trace_id=18446744073709551615 local=10.0.0.1:443 remote=10.0.0.2:1 via=grpc');
    expect(parseIntroComment(c)).toEqual({ nodeId: 'sidecar~1~a.b~c', traceId: '18446744073709551615' });
    expect(parseIntroComment(Buffer.from('meshcap dropped 3 packet(s) before this one'))).toBeNull();
    expect(parseIntroComment(null)).toBeNull();
  });
});

describe('MESHCAP-LIVE/1 request line', () => {
  it('round-trips percent-encoded parameters and ignores unknown keys', () => {
    const line = requestLine({ token: 'a b=c%', filter: 'host=10.0.0.1 port=443', client: 'Wireshark 4.0' });
    expect(line).toBe('MESHCAP-LIVE/1 token=a%20b%3Dc%25 filter=host%3D10.0.0.1%20port%3D443 client=Wireshark%204.0\n');
    expect(parseRequestLine(`${line.trim()} future=1`)).toEqual({ token: 'a b=c%', filter: 'host=10.0.0.1 port=443', client: 'Wireshark 4.0' });
    expect(parseRequestLine('MESHCAP-LIVE/1')).toEqual({ token: null, filter: null, client: null });
  });

  it('rejects malformed lines in words', () => {
    expect(parseRequestLine('GET / HTTP/1.1')).toMatch(/expected "MESHCAP-LIVE\/1/);
    expect(parseRequestLine('MESHCAP-LIVE/9 token=x')).toMatch(/unsupported protocol version/);
    expect(parseRequestLine('MESHCAP-LIVE/1 token')).toMatch(/expected key=value/);
    expect(parseRequestLine('MESHCAP-LIVE/1 token=%zz')).toMatch(/bad percent-encoding/);
    expect(parseRequestLine('MESHCAP-LIVE/1 token=a token=b')).toMatch(/given twice/);
  });
});
