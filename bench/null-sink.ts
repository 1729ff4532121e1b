/**
 * The null gRPC sink: the baseline of the end-to-end benchmarks. A grpc-js server for
 * /envoy.service.tap.v3.TapSinkService/StreamTaps, configured as meshcap's is (identity
 * deserializer, 16 MiB message limit, the same widened HTTP/2 windows: 4 MiB per stream through
 * the SETTINGS initial window, 16 MiB per connection through setLocalWindowSize — see
 * src/ingest/grpc-tap-server.ts), that only counts messages and bytes. Whatever meshcap does beyond
 * this is its own cost: the ratio is the share of the platform's gRPC ingest that meshcap keeps.
 *
 * `--append FILE`: also write every message to FILE at once (fs.writeSync), the floor of the latency
 * benchmark (gRPC delivery + one write + the observer's polling).
 *
 * `--write-dir DIR`: also write what it receives to disk as a capture writer at its best would: the
 * messages received since the last write go out in one fs.writev as soon as the previous write
 * completed, into a ring of 256 MB files (2 kept), at most 16 MiB waiting (beyond that messages are
 * dropped and counted). The ceiling of gRPC ingest + disk on this machine, for the captured figure.
 *
 * Run by the benchmarks through child_process.fork (IPC: { id, cmd: 'stats' | 'stop' }); also runs
 * alone: node dist/bench/null-sink.js --listen unix:/tmp/null.sock
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { STREAM_TAPS_PATHS, streamTapsService, widenConnectionWindows, widenStreamWindow } from '../src/ingest/grpc-tap-server.js';

const EMPTY = Buffer.alloc(0);

const argv = process.argv.slice(2);
const listen = argv[argv.indexOf('--listen') + 1] ?? 'unix:/tmp/meshcap-null.sock';
const appendPath = argv.includes('--append') ? argv[argv.indexOf('--append') + 1]! : null;
const appendFd = appendPath ? fs.openSync(appendPath, 'w') : -1;
const writeDir = argv.includes('--write-dir') ? argv[argv.indexOf('--write-dir') + 1]! : null;

const stats = { messages: 0, bytes: 0, streamsActive: 0, streamsTotal: 0, writtenBytes: 0, droppedBytes: 0 };

/** The --write-dir writer: writev of everything pending, one write in flight, ring of 2 × 256 MB. */
const RING_FILE = 256e6;
const MAX_PENDING = 16 * 1024 * 1024;
let pending: Buffer[] = [];
let pendingBytes = 0;
let writing = false;
let fileFd = -1;
let fileBytes = RING_FILE;
const files: string[] = [];
function openNext(): void {
  if (fileFd >= 0) fs.closeSync(fileFd);
  const f = `${writeDir}/null-${files.length}.bin`;
  files.push(f);
  if (files.length > 2) fs.rmSync(files[files.length - 3]!, { force: true });
  fileFd = fs.openSync(f, 'w');
  fileBytes = 0;
}
function pump(): void {
  if (pending.length === 0) {
    writing = false;
    return;
  }
  writing = true;
  if (fileBytes >= RING_FILE) openNext();
  const batch = pending;
  const bytes = pendingBytes;
  pending = [];
  pendingBytes = 0;
  fs.writev(fileFd, batch, (err, n) => {
    if (err) throw err;
    stats.writtenBytes += n;
    fileBytes += n;
    pump();
  });
}
function toDisk(msg: Buffer): void {
  if (pendingBytes + msg.length > MAX_PENDING) {
    stats.droppedBytes += msg.length;
    return;
  }
  pending.push(msg);
  pendingBytes += msg.length;
  if (!writing) pump();
}

const server = new grpc.Server({ 'grpc.max_receive_message_length': 16 * 1024 * 1024, 'grpc.max_send_message_length': 1024 });
// The same service definition and HTTP/2 windows as meshcap's tap server: only the handler differs.
if (!widenStreamWindow(server)) throw new Error('grpc-js internals changed: cannot widen the HTTP/2 windows as meshcap does');

for (const path of STREAM_TAPS_PATHS) {
  server.addService(
    streamTapsService(path),
    {
      StreamTaps: (call: grpc.ServerReadableStream<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => {
        stats.streamsActive++;
        stats.streamsTotal++;
        let done = false;
        const finish = () => {
          if (!done) {
            done = true;
            stats.streamsActive--;
          }
        };
        call.on('data', (msg: Buffer) => {
          stats.messages++;
          stats.bytes += msg.length;
          if (appendFd >= 0) fs.writeSync(appendFd, msg);
          if (writeDir) toDisk(msg);
        });
        call.on('end', () => {
          finish();
          callback(null, EMPTY);
        });
        call.on('error', finish);
        call.on('cancelled', finish);
      },
    },
  );
}

if (listen.startsWith('unix:')) fs.rmSync(listen.slice(5), { force: true });
server.bindAsync(listen, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) throw err;
  widenConnectionWindows(server, new Set(), (e) => {
    throw e;
  });
  process.send?.({ type: 'ready' });
  if (!process.send) console.error(`null sink listening on ${listen}`);
});

process.on('message', (m: { id: number; cmd: string }) => {
  if (m.cmd === 'stats') process.send!({ id: m.id, ...stats });
  else if (m.cmd === 'stop') {
    server.forceShutdown();
    if (appendFd >= 0) fs.closeSync(appendFd);
    if (fileFd >= 0) fs.closeSync(fileFd);
    process.send!({ id: m.id, ok: true }, () => process.exit(0));
  }
});
process.on('disconnect', () => process.exit(0));
