/**
 * Comparing a meshcap capture with the real traffic it was made from, as Wireshark sees both:
 * conversations and per-direction payload (tshark follow), and what the application dissectors
 * report per TCP direction. Shared by the real-traffic tests of every door and of live viewers.
 */
import type { Recording, ScenarioName } from './record-traffic.js';
import { tsharkFields, type FollowedStream } from './tshark.js';

export const key = (e: { addr: string; port: number }): string => `${e.addr}|${e.port}`;

/** A conversation, independent of which side tshark lists first. */
export const pairKey = (f: FollowedStream): string => [key(f.a), key(f.b)].sort().join(' <-> ');

/** Per-direction byte streams keyed "src|port>dst|port". */
export function directions(streams: FollowedStream[]): Map<string, Buffer> {
  const m = new Map<string, Buffer>();
  for (const f of streams) {
    m.set(`${key(f.a)}>${key(f.b)}`, f.aToB);
    m.set(`${key(f.b)}>${key(f.a)}`, f.bToA);
  }
  return m;
}

export const onPorts = (streams: FollowedStream[], ports: number[]): FollowedStream[] =>
  streams.filter((f) => ports.includes(f.a.port) || ports.includes(f.b.port));

/** Per TCP direction ("src|port>dst|port"), each dissector field's values in frame order. */
export type Dissection = Map<string, Record<string, string[]>>;

export const HTTP1_FIELDS = ['http.request.method', 'http.request.uri', 'http.request.version', 'http.response.code', 'http.content_length_header', 'http.transfer_encoding'];
export const HTTP2_FIELDS = ['http2.type', 'http2.streamid', 'http2.flags', 'http2.length', 'http2.header.name', 'http2.header.value'];
export const GRPC_FIELDS = ['grpc.message_length', 'grpc.compressed_flag'];

/** Which fields to compare for a scenario, and the display filter that selects its PDUs. */
export function dissectionSpec(name: ScenarioName): { fields: string[]; filter: string } {
  if (name === 'h2c') return { fields: HTTP2_FIELDS, filter: 'http2' };
  if (name === 'grpc') return { fields: [...HTTP2_FIELDS, ...GRPC_FIELDS], filter: 'http2' };
  return { fields: HTTP1_FIELDS, filter: 'http' };
}

/**
 * What Wireshark's application dissectors report, flattened per TCP direction: for each field,
 * the list of all its values in frame order. Segmentation-independent: a PDU shows up once, in
 * the frame that completes it, whatever the TCP segment boundaries were.
 */
export async function dissect(file: string, rec: Recording, protoFields: string[], filterProto: string): Promise<Dissection> {
  const ports = rec.serverPorts.map((p) => `tcp.port==${p}`).join(' || ');
  const head = ['ip.src', 'ipv6.src', 'tcp.srcport', 'ip.dst', 'ipv6.dst', 'tcp.dstport'];
  const rows = await tsharkFields(file, [...head, ...protoFields], {
    filter: `(${ports}) && ${filterProto}`,
    decodeAs: rec.decodeAs,
    aggregator: '\u001f',
  });
  const out: Dissection = new Map();
  for (const r of rows) {
    const dir = `${r[0] || r[1]}|${r[2]}>${r[3] || r[4]}|${r[5]}`;
    let d = out.get(dir);
    if (!d) out.set(dir, (d = Object.fromEntries(protoFields.map((f) => [f, [] as string[]]))));
    protoFields.forEach((f, i) => {
      const v = r[head.length + i]!;
      if (v !== '') d![f]!.push(...v.split('\u001f'));
    });
  }
  return out;
}
