/**
 * The UDP door with real datagrams on loopback, shaped like Envoy's contrib UDP sink sends them:
 * one TraceWrapper per datagram, JSON pretty-printed without default values, PROTO_BINARY, or
 * PROTO_TEXT. The real Envoy trace goes through a real Pipeline + FileSink into pcapng.
 */
import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { detectDatagramFormat, parseUdpListen, UdpTapListener } from '../../src/ingest/udp-tap-listener.js';
import {
  encodeTrace,
  envoyJson,
  expectedH2Info,
  fixture,
  fixtureBufferedTrace,
  fixtureStreamedSegments,
  h2Info,
  testPipeline,
  waitFor,
  type TestPipeline,
} from '../helpers/envoy-tap-emulation.js';

let tmp: string;
let tp: TestPipeline;
let listener: UdpTapListener;
const senders: dgram.Socket[] = [];

async function sender(type: 'udp4' | 'udp6' = 'udp4'): Promise<dgram.Socket> {
  const s = dgram.createSocket({ type, sendBufferSize: 1024 * 1024 });
  await new Promise<void>((resolve) => s.bind(0, type === 'udp4' ? '127.0.0.1' : '::1', () => resolve()));
  senders.push(s);
  return s;
}

function send(s: dgram.Socket, msg: Buffer | string, to: UdpTapListener = listener): Promise<void> {
  const [host, port] = to.address.startsWith('[') ? [to.address.slice(1, to.address.indexOf(']')), Number(to.address.split(':').pop())] : to.address.split(':');
  return new Promise((resolve, reject) => s.send(typeof msg === 'string' ? Buffer.from(msg) : msg, Number(port), String(host), (err) => (err ? reject(err) : resolve())));
}

beforeEach(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-udp-'));
  tp = testPipeline(path.join(tmp, 'out.pcapng'));
  listener = new UdpTapListener({ listen: '127.0.0.1:0' }, tp.pipeline, tp.log);
  await listener.start();
});

afterEach(async () => {
  for (const s of senders.splice(0)) s.close();
  await listener.stop();
  await tp.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('UDP tap listener', () => {
  it('a buffered trace as one PROTO_BINARY datagram of 16 KB becomes the six HTTP/2 frames', async () => {
    const s = await sender();
    const bin = fixture('tap2pcap_h2_ipv4.v3.pb');
    expect(bin.length).toBeGreaterThan(9000);
    await send(s, bin);
    await waitFor(() => tp.stats.flowsClosed === 1, 'the trace');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(listener.counters).toMatchObject({ datagrams: 1, accepted: 1, binary: 1 });
    expect(tp.stats.ingestMessages.get('udp')).toBe(1);
  });

  it('streamed segments from one socket, JSON and PROTO_BINARY alternating, one JSON datagram over 9 KB', async () => {
    const s = await sender();
    const segs = fixtureStreamedSegments(11);
    const datagrams = segs.map((seg, i) => (i % 2 === 1 ? Buffer.from(envoyJson(seg, { alwaysPrint: false })) : encodeTrace(seg)));
    const json = datagrams.filter((_d, i) => i % 2 === 1);
    expect(Math.max(...json.map((d) => d.length))).toBeGreaterThan(9 * 1024); // the 7519-byte write as base64 JSON
    // The UDP sink prints without default values.
    expect(envoyJson(segs[0]!, { alwaysPrint: false })).not.toContain('"resolver_name"');
    expect(envoyJson(segs[0]!, { alwaysPrint: true })).toContain('"resolver_name": ""');
    for (const d of datagrams) await send(s, d);
    await waitFor(() => tp.stats.flowsClosed === 1, 'the closed event');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(listener.counters).toMatchObject({ datagrams: segs.length, accepted: segs.length, json: 4, binary: 4 });
    expect(tp.errors()).toEqual({});
  });

  it('a PROTO_TEXT datagram (the fixture in text format, 29 KB) is decoded too', async () => {
    const s = await sender();
    await send(s, fixture('tap2pcap_h2_ipv4.pb_text'));
    await waitFor(() => tp.stats.flowsClosed === 1, 'the trace');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(listener.counters.text).toBe(1);
  });

  it('each sender address is its own Envoy: equal trace ids from two sockets are two connections', async () => {
    const a = await sender();
    const b = await sender();
    await send(a, encodeTrace(fixtureBufferedTrace(1)));
    await send(b, envoyJson(fixtureBufferedTrace(1), { alwaysPrint: false }));
    await waitFor(() => tp.stats.flowsClosed === 2, 'both traces');
    expect(tp.stats.flowsOpened).toBe(2);
    const nodes = tp.logs.filter((l) => /new sender/.test(l.msg)).map((l) => l.sender);
    expect(nodes).toEqual([`127.0.0.1:${a.address().port}`, `127.0.0.1:${b.address().port}`]);
    await tp.close();
    expect(await h2Info(tp.out)).toEqual([...expectedH2Info(), ...expectedH2Info()]);
  });

  it('bad datagrams (garbage, truncated JSON, JSON/binary that is not a TraceWrapper, empty) are counted and logged; the next good one arrives', async () => {
    const s = await sender();
    const json = envoyJson(fixtureBufferedTrace(2), { alwaysPrint: false });
    await send(s, Buffer.from([0xff, 0xfe, 0x00, 0x13, 0x37, 0x99, 0x01])); // garbage
    await send(s, json.slice(0, json.length - 40)); // truncated JSON
    await send(s, '{\n "hello": "world"\n}'); // JSON, not a trace
    await send(s, Buffer.from([0x0a, 0x03, 0x08, 0x96, 0x01])); // protobuf, an HTTP trace field with junk
    await send(s, Buffer.alloc(0));
    await send(s, 'socket_buffered_trace { trace_id: oops }'); // text that does not parse
    await send(s, json); // good
    await waitFor(() => tp.stats.flowsClosed === 1, 'the good trace');
    expect(listener.counters).toMatchObject({ datagrams: 7, accepted: 1, rejected: 6 });
    const errors = tp.errors();
    expect(errors['udp/malformed_protobuf']).toBe(1);
    expect(errors['udp/malformed_json']).toBe(1);
    expect(errors['udp/malformed_text']).toBe(1);
    expect((errors['udp/empty_trace'] ?? 0) + (errors['udp/http_trace_unsupported'] ?? 0)).toBe(3);
    const warned = tp.logs.filter((l) => l.level === 40 && l.source === 'udp');
    expect(warned.length).toBe(6);
    expect(warned.every((l) => String(l.node).startsWith('udp:127.0.0.1:'))).toBe(true);
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
  });

  it('listens on [::1] too', async () => {
    const v6 = new UdpTapListener({ listen: '[::1]:0' }, tp.pipeline, tp.log);
    try {
      await v6.start();
    } catch (err) {
      if (/EADDRNOTAVAIL|EAFNOSUPPORT/.test((err as Error).message)) return; // no IPv6 loopback here
      throw err;
    }
    try {
      expect(v6.address).toMatch(/^\[::1\]:\d+$/);
      const s = await sender('udp6');
      await send(s, fixture('tap2pcap_h2_ipv4.v3.pb'), v6);
      await waitFor(() => tp.stats.flowsClosed === 1, 'the trace');
      expect(tp.logs.some((l) => /^\[::1\]:\d+$/.test(String(l.sender)))).toBe(true);
    } finally {
      await v6.stop();
    }
  });

  it('a busy port is a clear start error', async () => {
    const other = new UdpTapListener({ listen: listener.address }, tp.pipeline, tp.log);
    await expect(other.start()).rejects.toThrow(/cannot listen on UDP 127\.0\.0\.1:\d+: .*EADDRINUSE/);
    await other.stop();
  });
});

describe('UDP door rules', () => {
  it('listens on loopback only', () => {
    expect(parseUdpListen('127.0.0.1:9411')).toEqual({ host: '127.0.0.1', port: 9411 });
    expect(parseUdpListen('[::1]:9411')).toEqual({ host: '::1', port: 9411 });
    expect(parseUdpListen('localhost:9411')).toEqual({ host: '127.0.0.1', port: 9411 });
    expect(() => parseUdpListen('0.0.0.0:9411')).toThrow(/refusing.*loopback/);
    expect(() => parseUdpListen('10.1.2.3:9411')).toThrow(/refusing/);
    expect(() => parseUdpListen('9411')).toThrow(/HOST:PORT/);
    expect(() => parseUdpListen('127.0.0.1:70000')).toThrow(/out of range/);
  });

  it('tells JSON, text and binary datagrams apart by their first bytes', () => {
    expect(detectDatagramFormat(Buffer.from('{\n "socket_streamed_trace_segment": {}\n}'))).toBe('json');
    expect(detectDatagramFormat(Buffer.from('  \n{"a":1}\n'))).toBe('json');
    expect(detectDatagramFormat(Buffer.from('socket_buffered_trace {\n}'))).toBe('text');
    expect(detectDatagramFormat(Buffer.from('socket_streamed_trace_segment: {}'))).toBe('text');
    expect(detectDatagramFormat(fixture('tap2pcap_h2_ipv4.v3.pb'))).toBe('binary');
    // 0x0a is both a newline and the tag of field 1: a binary message starting 0x0a 0x7b is not JSON.
    expect(detectDatagramFormat(Buffer.from([0x0a, 0x7b, 0x01, 0x02]))).toBe('binary');
  });
});
