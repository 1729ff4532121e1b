/**
 * Flow-level behaviour, judged by tshark: half-close, upstream connections, address families and
 * synthetic addresses, gaps, duplicates, idle timeout. Traces are encoded the way Envoy encodes
 * them (protobufjs over our protos) and go through the real decoder, pipeline and file sink.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/control/logger.js';
import { PipelineStats } from '../../src/control/stats.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { TraceDecoder } from '../../src/ingest/trace-decoder.js';
import { DEFAULT_PIPELINE, Pipeline } from '../../src/pipeline.js';
import { FileSink } from '../../src/sink/file-sink.js';
import { tcpExpertProblems, tsharkFields } from '../helpers/tshark.js';

const Wrapper = loadSchema().lookupType('envoy.data.tap.v3.TraceWrapper');
const stream = { nodeId: 'node-a', tapId: 'tap', source: 'test' };

type Addr = { socket_address: { address: string; port_value: number } } | { pipe: { path: string } };
const sock = (address: string, port: number): Addr => ({ socket_address: { address, port_value: port } });

function seg(traceId: number, piece: Record<string, unknown>): Buffer {
  return Buffer.from(Wrapper.encode(Wrapper.fromObject({ socket_streamed_trace_segment: { trace_id: traceId, ...piece } })).finish());
}
const conn = (id: number, local: Addr, remote: Addr): Buffer => seg(id, { connection: { local_address: local, remote_address: remote } });
let clock = 1_700_000_000;
const ts = (): { seconds: number; nanos: number } => ({ seconds: clock++, nanos: 500 });
const read = (id: number, data: string | Buffer, extra: Record<string, unknown> = {}): Buffer =>
  seg(id, { event: { timestamp: ts(), read: { data: { as_bytes: Buffer.from(data) } }, ...extra } });
const write = (id: number, data: string | Buffer, extra: Record<string, unknown> = {}, endStream = false): Buffer =>
  seg(id, { event: { timestamp: ts(), write: { data: { as_bytes: Buffer.from(data) }, end_stream: endStream }, ...extra } });
const closed = (id: number, extra: Record<string, unknown> = {}): Buffer => seg(id, { event: { timestamp: ts(), closed: {}, ...extra } });

async function capture(messages: Buffer[], opts: { idleTimeoutMs?: number; after?: (p: Pipeline) => void } = {}): Promise<{ file: string; stats: PipelineStats }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-flow-'));
  const file = path.join(dir, 'out.pcapng');
  const stats = new PipelineStats();
  const log = silentLogger();
  const pipeline = new Pipeline({ ...DEFAULT_PIPELINE, framer: pcapngFramer, blockSize: 256 * 1024, idleTimeoutMs: opts.idleTimeoutMs ?? 300_000 }, stats, log);
  pipeline.addSink(new FileSink({ path: file, framer: pcapngFramer, snaplen: 262144, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 16 }, stats, log));
  const decoder = new TraceDecoder(pipeline);
  for (const m of messages) decoder.decodeTraceWrapper(m, stream);
  opts.after?.(pipeline);
  await pipeline.close();
  return { file, stats };
}

describe('FlowTable', () => {
  it('half-closes on write.end_stream and tears down cleanly on close', async () => {
    const { file } = await capture([
      conn(1, sock('10.0.0.1', 443), sock('10.0.0.2', 40000)),
      read(1, 'GET / HTTP/1.1\r\nHost: a\r\n\r\n'),
      write(1, 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi', {}, true),
      read(1, 'late bytes from the client after the server FIN'),
      closed(1),
    ]);
    const rows = await tsharkFields(file, ['tcp.srcport', 'tcp.flags.str', 'tcp.len'], {});
    expect(rows.map((r) => `${r[0]} ${r[1]!.replace(/·/g, '.')} ${r[2]}`)).toEqual([
      '40000 ..........S. 0',
      '443 .......A..S. 0',
      '40000 .......A.... 0',
      '40000 .......AP... 27',
      '443 .......AP... 59',
      '443 .......A...F 0', // end_stream: Envoy's FIN right after its last write
      '40000 .......AP... 47',
      '40000 .......A...F 0', // close: the peer's FIN, Envoy's final ACK
      '443 .......A.... 0',
    ]);
    expect(await tcpExpertProblems(file)).toEqual([]);
    const [[completeness]] = await tsharkFields(file, ['tcp.completeness'], { twoPass: true, filter: 'frame.number == 1' });
    expect(completeness).toBe('31');
  });

  it('makes Envoy the client of an upstream connection (ephemeral local port)', async () => {
    const { file } = await capture([conn(2, sock('10.0.0.5', 45678), sock('10.0.0.9', 8080)), write(2, 'request'), read(2, 'response'), closed(2)]);
    const rows = await tsharkFields(file, ['ip.src', 'tcp.srcport', 'tcp.flags.syn', 'tcp.flags.ack', 'frame.packet_flags_direction'], { filter: 'tcp.flags.syn == 1' });
    // SYN from Envoy (outbound), SYN-ACK from the upstream server (inbound).
    expect(rows).toEqual([
      ['10.0.0.5', '45678', '1', '0', '0x00000002'],
      ['10.0.0.9', '8080', '1', '1', '0x00000001'],
    ]);
  });

  it('normalises IPv4-mapped IPv6 and writes IPv6 flows with the IPv6 MSS', async () => {
    const big = Buffer.alloc(5000, 0x61);
    const { file } = await capture([
      conn(3, sock('::ffff:127.0.0.1', 15006), sock('::ffff:127.0.0.7', 50000)),
      read(3, 'x'),
      closed(3),
      conn(4, sock('2001:db8::1', 443), sock('2001:db8::2', 51000)),
      write(4, big),
      closed(4),
    ]);
    const v4 = await tsharkFields(file, ['ip.src', 'ip.dst'], { filter: 'tcp.port == 15006 && tcp.len > 0' });
    expect(v4).toEqual([['127.0.0.7', '127.0.0.1']]);
    const v6 = await tsharkFields(file, ['ipv6.src', 'tcp.len', 'tcp.options.mss_val'], { filter: 'ipv6 && (tcp.len > 0 || tcp.flags.syn == 1)' });
    expect(v6.map((r) => r[0])).toContain('2001:db8::1');
    expect(v6.filter((r) => r[2]).map((r) => r[2])).toEqual(['1440', '1440']);
    expect(v6.filter((r) => Number(r[1]) > 0).map((r) => r[1])).toEqual(['1440', '1440', '1440', '680']);
    expect(await tcpExpertProblems(file)).toEqual([]);
  });

  it('maps Unix pipes and unknown endpoints to documented synthetic addresses, deterministically', async () => {
    const msgs = [conn(5, { pipe: { path: '/var/run/app.sock' } }, { pipe: { path: '' } }), read(5, 'ping'), closed(5)];
    const a = await capture(msgs);
    const b = await capture(msgs);
    const rows = await tsharkFields(a.file, ['ip.src', 'tcp.srcport', 'ip.dst', 'tcp.dstport'], { filter: 'tcp.len > 0' });
    expect(rows[0]![0]).toMatch(/^198\.18\.\d+\.\d+$/);
    expect(rows[0]![2]).toMatch(/^198\.18\.\d+\.\d+$/);
    expect(Number(rows[0]![1])).toBe(49152 + 5); // the peer: port from the trace id
    expect(await tsharkFields(b.file, ['ip.src', 'tcp.srcport', 'ip.dst', 'tcp.dstport'], { filter: 'tcp.len > 0' })).toEqual(rows);
  });

  it('shows bytes Envoy lost (seq_num gap) as a gap, with a comment and a drop count', async () => {
    const { file, stats } = await capture([
      conn(6, sock('10.0.0.1', 443), sock('10.0.0.2', 40001)),
      read(6, 'hello', { seq_num: 1 }),
      write(6, 'world', { seq_num: 6 }),
      write(6, 'after the gap', { seq_num: 511 }), // 500 bytes never arrived
      closed(6, { seq_num: 524 + 1 }),
    ]);
    expect(stats.lostBytes).toBe(500);
    expect(stats.dropsOf('envoy_seq_gap')).toBe(1);
    const rows = await tsharkFields(file, ['tcp.len', 'frame.comment', 'tcp.analysis.lost_segment'], { filter: 'tcp.analysis.lost_segment' });
    expect(rows).toHaveLength(1);
    expect(rows[0]![0]).toBe('13');
    expect(rows[0]![1]).toContain('500 bytes missing before this segment');
  });

  it('attributes a gap after a truncated body to the truncated direction', async () => {
    const { file, stats } = await capture([
      conn(7, sock('10.0.0.1', 443), sock('10.0.0.2', 40002)),
      read(7, 'first 4', { seq_num: 1 }),
      seg(7, { event: { timestamp: ts(), write: { data: { as_bytes: Buffer.from('cut'), truncated: true } }, seq_num: 8 } }), // really 1000 bytes
      read(7, 'next', { seq_num: 1008 }),
      write(7, 'more', { seq_num: 1012 }),
      closed(7, { seq_num: 1017 }),
    ]);
    expect(stats.lostBytes).toBe(997);
    expect(stats.dropsOf('envoy_truncated')).toBe(1);
    const rows = await tsharkFields(file, ['tcp.srcport', 'tcp.len'], { filter: 'tcp.analysis.lost_segment' });
    expect(rows).toEqual([['443', '4']]); // the server→client direction resumes after the hole
  });

  it('skips events Envoy already delivered instead of showing retransmissions', async () => {
    const { file, stats } = await capture([
      conn(8, sock('10.0.0.1', 443), sock('10.0.0.2', 40003)),
      read(8, 'abcdef', { seq_num: 1 }),
      read(8, 'abcdef', { seq_num: 1 }), // replayed
      read(8, 'defghi', { seq_num: 4 }), // half overlaps: only 'ghi' is new
      closed(8, { seq_num: 11 }),
    ]);
    expect(stats.dropsOf('duplicate_event')).toBe(1);
    const rows = await tsharkFields(file, ['tcp.payload'], { filter: 'tcp.len > 0' });
    expect(rows.map((r) => Buffer.from(r[0]!.replace(/:/g, ''), 'hex').toString())).toEqual(['abcdef', 'ghi']);
    expect(await tcpExpertProblems(file)).toEqual([]);
  });

  it('writes handshake and teardown for a connection that carried no data', async () => {
    const { file } = await capture([conn(9, sock('10.0.0.1', 443), sock('10.0.0.2', 40004)), closed(9)]);
    const [[completeness]] = await tsharkFields(file, ['tcp.completeness'], { twoPass: true, filter: 'frame.number == 1' });
    expect(completeness).toBe('23'); // SYN, SYN-ACK, ACK, FIN; no data
  });

  it('frees idle flows and keeps counting them', async () => {
    const { stats } = await capture([conn(10, sock('10.0.0.1', 443), sock('10.0.0.2', 40005)), read(10, 'x')], {
      idleTimeoutMs: 1,
      after: (p) => {
        expect(p.flows.size).toBe(1);
        expect(p.flows.sweep(Date.now() + 10)).toBe(1);
        expect(p.flows.size).toBe(0);
      },
    });
    expect(stats.flowsExpired).toBe(1);
    expect(stats.flowsActive).toBe(0);
  });
});
