/**
 * The --watch door: files written the way Envoy's file_per_tap sink writes them (one file per
 * connection, `<prefix>_<trace id>.<ext>`, appended as the connection goes, cut anywhere by the
 * ofstream's buffering), followed while they grow. The real Envoy trace goes through a real
 * Pipeline + FileSink into pcapng.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { TapDirWatcher, watchedFormat, type TapDirWatcherOptions } from '../../src/ingest/tap-dir-watcher.js';
import {
  encodeTrace,
  envoyJson,
  expectedH2Info,
  fixture,
  fixtureBufferedTrace,
  fixtureStreamedSegments,
  h2Info,
  sleep,
  testPipeline,
  waitFor,
  varint,
  type TestPipeline,
} from '../helpers/envoy-tap-emulation.js';

let tmp: string;
let dir: string;
let tp: TestPipeline;
const watchers: TapDirWatcher[] = [];

function watcher(opts: Partial<TapDirWatcherOptions> = {}): TapDirWatcher {
  const w = new TapDirWatcher({ dir, maxMessageBytes: 1024 * 1024, pollIntervalMs: 50, settleMs: 100, ...opts }, tp.pipeline, tp.log);
  watchers.push(w);
  return w;
}


/** PROTO_BINARY_LENGTH_DELIMITED: varint32 length + message. */
const delimited = (msgs: Buffer[]): Buffer => Buffer.concat(msgs.flatMap((m) => [varint(m.length), m]));

/** Appends `data` to `file` in pieces of the given sizes, letting the watcher read between them. */
async function appendInPieces(w: TapDirWatcher, file: string, data: Buffer, sizes: number[]): Promise<void> {
  let pos = 0;
  let i = 0;
  while (pos < data.length) {
    const n = sizes[i++ % sizes.length]!;
    fs.appendFileSync(file, data.subarray(pos, pos + n));
    pos += n;
    await w.scan();
  }
}

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-watch-'));
  dir = path.join(tmp, 'taps');
  fs.mkdirSync(dir);
  tp = testPipeline(path.join(tmp, 'out.pcapng'));
});

afterEach(async () => {
  await Promise.all(watchers.splice(0).map((w) => w.stop()));
  await tp.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Odd piece sizes: every message is cut somewhere, length prefixes included. */
const PIECES = [1, 1, 700, 3, 4093, 17, 2, 8192, 333];

describe('tap directory watcher', () => {
  it('follows a growing .pb_length_delimited file of streamed segments, messages cut across writes', async () => {
    const w = watcher();
    await w.start();
    const file = path.join(dir, 'tap_12.pb_length_delimited');
    await appendInPieces(w, file, delimited(fixtureStreamedSegments(12).map(encodeTrace)), PIECES);
    await waitFor(() => tp.stats.flowsClosed === 1, 'the closed event');
    expect(w.counters.messages).toBe(8);
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(tp.errors()).toEqual({});
  });

  it('reads what Envoy appended just before stop(): nothing written before shutdown is lost', async () => {
    // Polling only, and too slowly to notice the file on its own: stop() must do a last scan.
    const w = watcher({ useFsWatch: false, pollIntervalMs: 60_000 });
    await w.start();
    fs.writeFileSync(path.join(dir, 'tap_3.pb_length_delimited'), delimited(fixtureStreamedSegments(3).map(encodeTrace)));
    await w.stop();
    expect(w.counters.messages).toBe(8);
    expect(tp.stats.flowsClosed).toBe(1);
  });

  it('follows a growing .json file (pretty JSON objects back to back), boundaries anywhere', async () => {
    const w = watcher();
    await w.start();
    const file = path.join(dir, 'tap_7.json');
    const text = fixtureStreamedSegments(7)
      .map((s) => envoyJson(s, { alwaysPrint: true }))
      .join('');
    await appendInPieces(w, file, Buffer.from(text), PIECES);
    await waitFor(() => tp.stats.flowsClosed === 1, 'the closed event');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual(expectedH2Info());
    expect(tp.stats.ingestMessages.get('file')).toBe(8);
  });

  it('picks files up by itself (fs.watch, and polling alone), each file its own Envoy namespace', async () => {
    const w1 = watcher();
    await w1.start();
    // Buffered .json and .pb_length_delimited files of connections with the same trace id.
    fs.writeFileSync(path.join(dir, 'tap_0.json'), envoyJson(fixtureBufferedTrace(0), { alwaysPrint: true }));
    fs.writeFileSync(path.join(dir, 'other_0.pb_length_delimited'), fixture('tap2pcap_h2_ipv4.v3.len_delimited.bin'));
    await waitFor(() => tp.stats.flowsClosed === 2, 'both files');
    await w1.stop();
    const w2 = watcher({ useFsWatch: false, existing: 'skip' });
    await w2.start();
    expect(w2.counters.messages).toBe(0); // existing files skipped
    fs.writeFileSync(path.join(dir, 'late_5.json'), envoyJson(fixtureBufferedTrace(5), { alwaysPrint: true }));
    await waitFor(() => tp.stats.flowsClosed === 3, 'the polled file');
    expect(tp.stats.flowsOpened).toBe(3);
    await tp.close();
    expect(await h2Info(tp.out)).toEqual([...expectedH2Info(), ...expectedH2Info(), ...expectedH2Info()]);
  });

  it('a PROTO_BINARY .pb (buffered trace) is decoded once it has stopped changing; .pb_text too', async () => {
    const w = watcher({ settleMs: 1000 });
    await w.start();
    const pb = fixture('tap2pcap_h2_ipv4.v3.pb');
    const file = path.join(dir, 'tap_3.pb');
    fs.writeFileSync(file, pb.subarray(0, 5000)); // Envoy mid-write
    await w.scan();
    await sleep(100);
    fs.appendFileSync(file, pb.subarray(5000));
    await w.scan();
    expect(w.counters.messages).toBe(0); // not settled yet: nothing decoded from a partial file
    await waitFor(() => tp.stats.flowsClosed === 1, 'the settled .pb');
    fs.writeFileSync(path.join(dir, 'tap_4.pb_text'), fixture('tap2pcap_h2_ipv4.pb_text'));
    await waitFor(() => tp.stats.flowsClosed === 2, 'the .pb_text');
    await tp.close();
    expect(await h2Info(tp.out)).toEqual([...expectedH2Info(), ...expectedH2Info()]);
    expect(tp.errors()).toEqual({});
  });

  it('bad input: garbage, an object over the cap, a length prefix over the cap, a truncated file replaced by a restarted Envoy: counted, logged, the door keeps working', async () => {
    const w = watcher({ maxMessageBytes: 64 * 1024 });
    await w.start();
    const good = envoyJson(fixtureBufferedTrace(1), { alwaysPrint: true });
    const huge = `{"socket_buffered_trace": {"events": [{"read": {"data": {"as_bytes": "${'QUFB'.repeat(30_000)}"}}}]}}`;
    fs.writeFileSync(path.join(dir, 'tap_1.json'), `garbage before the object\n${huge}${good}`);
    // A length prefix of 1 MB (over the 64 KiB cap): the framing can't be trusted after it.
    fs.writeFileSync(path.join(dir, 'tap_2.pb_length_delimited'), Buffer.concat([varint(1_000_000), Buffer.alloc(100)]));
    // Envoy crashed mid-object...
    const trunc = path.join(dir, 'tap_3.json');
    fs.writeFileSync(trunc, good.slice(0, 3000));
    await w.scan();
    await waitFor(() => tp.stats.flowsClosed === 1, 'the good object after garbage and the huge one');
    expect(tp.errors()).toEqual({ 'file/malformed_json': 1, 'file/message_too_large': 2 });
    // ... and the restarted Envoy reused the name (std::ofstream truncates it) for another
    // connection; the file is larger than before by the time meshcap looks again.
    const next = fixtureStreamedSegments(3)
      .map((s) => envoyJson(s, { alwaysPrint: true }))
      .join('');
    fs.writeFileSync(trunc, next);
    await w.scan();
    await waitFor(() => tp.stats.flowsClosed === 2, 'the rewritten file');
    expect(tp.errors()).toEqual({ 'file/malformed_json': 2, 'file/message_too_large': 2 });
    const warned = tp.logs.filter((l) => l.level === 40 && l.source === 'file').map((l) => `${l.node}: ${l.msg}`);
    expect(warned.some((m) => /tap_1\.json: unexpected byte/.test(m))).toBe(true);
    expect(warned.some((m) => /tap_1\.json: JSON object exceeds 65536 bytes/.test(m))).toBe(true);
    expect(warned.some((m) => /tap_2\.pb_length_delimited: length-delimited message of 1000000 bytes exceeds/.test(m))).toBe(true);
    expect(warned.some((m) => /tap_3\.json: stream ended inside a JSON object/.test(m))).toBe(true);
    // The rewritten file is a new Envoy namespace.
    expect(tp.logs.some((l) => l.node === `file:${trunc}#1`)).toBe(true);
    // Garbage appended to the abandoned file is not read.
    fs.appendFileSync(path.join(dir, 'tap_2.pb_length_delimited'), Buffer.alloc(10));
    await w.scan();
    expect(tp.errors()['file/message_too_large']).toBe(2);
    await tp.close();
    expect(await h2Info(tp.out)).toEqual([...expectedH2Info(), ...expectedH2Info()]);
  });

  it('a removed file is forgotten and its incomplete message reported', async () => {
    const w = watcher();
    await w.start();
    const file = path.join(dir, 'tap_9.pb_length_delimited');
    const data = delimited(fixtureStreamedSegments(9).map(encodeTrace));
    fs.writeFileSync(file, data.subarray(0, 200));
    await w.scan();
    fs.rmSync(file);
    await w.scan();
    expect(tp.errors()).toEqual({ 'file/malformed_protobuf': 1 });
    expect(tp.logs.some((l) => /removed with \d+ bytes of an incomplete length-delimited message/.test(l.msg))).toBe(true);
  });

  it('waits for a directory that does not exist yet', async () => {
    fs.rmSync(dir, { recursive: true });
    const w = watcher();
    await w.start();
    expect(tp.logs.some((l) => /cannot read the watched tap directory/.test(l.msg))).toBe(true);
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'tap_0.pb_length_delimited'), fixture('tap2pcap_h2_ipv4.v3.len_delimited.bin'));
    await waitFor(() => tp.stats.flowsClosed === 1, 'the file in the new directory');
  });

  it('follows only the names file_per_tap writes', () => {
    expect(watchedFormat('tap_1234.pb_length_delimited')).toBe('pb_length_delimited');
    expect(watchedFormat('tap_1234.json')).toBe('json');
    expect(watchedFormat('tap_1234.pb')).toBe('pb');
    expect(watchedFormat('tap_1234.pb_text')).toBe('pb_text');
    expect(watchedFormat('.tap_1.json')).toBeNull();
    expect(watchedFormat('tap_1.json.tmp')).toBeNull();
    expect(watchedFormat('README')).toBeNull();
  });
});
