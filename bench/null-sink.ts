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
 * `--write-dir DIR --direct`: the same by direct I/O, as meshcap writes: each message copied once
 * into 4 MiB page-aligned buffers (32 MiB in all, as meshcap's default --buffer-size), every full
 * buffer written with O_DIRECT from libuv's pool, one write in flight; a message that finds no free
 * buffer is dropped and counted. A copy-once writer without a thread of its own: each write's
 * completion waits on the busy event loop, which is what it shows (e2e.ts --direct-sink).
 *
 * `--hand-off`: also hand every message to a second thread, as a meshcap that ran its capture
 * pipeline beside the gRPC thread would: the messages received in one event-loop turn go in one
 * postMessage, each message's memory transferred (grpc-js gives every message of 4 KiB or more a
 * memory of its own; smaller ones are copied), and the thread copies each message once into a
 * shared 64 MiB area (the capture's one copy) and nothing else. At most 64 MiB is in flight (the
 * streams are paused beyond it). The ceiling of such a two-thread design on this machine, before
 * any capture work (e2e.ts --hand-off).
 *
 * `--raw-h2`: the same counting without grpc-js: a node:http2 server with the same windows that
 * parses gRPC's 5-byte message prefixes itself, in the DATA chunks as they come (no copy, no
 * reassembly), and answers with an empty message and grpc-status 0. The ceiling of ingest on
 * node:http2 alone, to set against grpc-js's (e2e.ts --raw-h2).
 *
 * Run by the benchmarks through child_process.fork (IPC: { id, cmd: 'stats' | 'stop' }); also runs
 * alone: node dist/bench/null-sink.js --listen unix:/tmp/null.sock
 */
import fs from 'node:fs';
import http2 from 'node:http2';
import { Worker } from 'node:worker_threads';
import * as grpc from '@grpc/grpc-js';
import { CONNECTION_WINDOW, STREAM_TAPS_PATHS, STREAM_WINDOW, streamTapsService, widenConnectionWindows, widenStreamWindow } from '../src/ingest/grpc-tap-server.js';

const EMPTY = Buffer.alloc(0);

const argv = process.argv.slice(2);
const listen = argv[argv.indexOf('--listen') + 1] ?? 'unix:/tmp/meshcap-null.sock';
const appendPath = argv.includes('--append') ? argv[argv.indexOf('--append') + 1]! : null;
const appendFd = appendPath ? fs.openSync(appendPath, 'w') : -1;
const writeDir = argv.includes('--write-dir') ? argv[argv.indexOf('--write-dir') + 1]! : null;

const stats = { messages: 0, bytes: 0, streamsActive: 0, streamsTotal: 0, writtenBytes: 0, droppedBytes: 0, handedOffBytes: 0 };

/** --hand-off: the second thread, what is in flight to it, and the streams paused meanwhile. */
const HAND_OFF_MAX = 64 * 1024 * 1024;
const HAND_OFF_THREAD = `
const { parentPort } = require('node:worker_threads');
const area = Buffer.from(new SharedArrayBuffer(64 * 1024 * 1024));
let at = 0;
parentPort.on('message', (batch) => {
  let bytes = 0;
  for (let i = 0; i < batch.length; i += 3) {
    const msg = Buffer.from(batch[i], batch[i + 1], batch[i + 2]);
    if (at + msg.length > area.length) at = 0;
    area.fill(msg, at, at + msg.length); // one native memcpy into shared memory, as meshcap's copyBytes
    at += msg.length;
    bytes += msg.length;
  }
  parentPort.postMessage(bytes);
});
`;
const handOff = argv.includes('--hand-off') ? new Worker(HAND_OFF_THREAD, { eval: true }) : null;
let batch: Array<ArrayBufferLike | number> = [];
let transfer: ArrayBuffer[] = [];
let inFlight = 0;
const paused = new Set<grpc.ServerReadableStream<Buffer, Buffer>>();
handOff?.on('message', (bytes: number) => {
  inFlight -= bytes;
  stats.handedOffBytes += bytes;
  if (inFlight < HAND_OFF_MAX / 2) {
    for (const call of paused) call.resume();
    paused.clear();
  }
});
function sendBatch(): void {
  handOff!.postMessage(batch, transfer);
  batch = [];
  transfer = [];
}
function toThread(msg: Buffer, call: grpc.ServerReadableStream<Buffer, Buffer>): void {
  // A message that owns its memory is transferred; one in Node's shared pool is copied first.
  const own = msg.byteOffset + msg.length === msg.buffer.byteLength && msg.byteOffset <= 16 && !(msg.buffer instanceof SharedArrayBuffer);
  let m = msg;
  if (!own) {
    m = Buffer.allocUnsafeSlow(msg.length); // its own memory: Node's pool cannot be transferred
    msg.copy(m);
  }
  if (batch.length === 0) setImmediate(sendBatch);
  batch.push(m.buffer, m.byteOffset, m.length);
  transfer.push(m.buffer as ArrayBuffer);
  inFlight += m.length;
  if (inFlight > HAND_OFF_MAX && !paused.has(call)) {
    paused.add(call);
    call.pause();
  }
}

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
/** --direct: 4 MiB page-aligned staging buffers (a WebAssembly.Memory is page-aligned), one filling. */
const DIRECT = argv.includes('--direct');
const STAGE = 4 * 1024 * 1024;
const STAGES = 8;
const stageMem = DIRECT ? Buffer.from(new WebAssembly.Memory({ initial: (STAGE * STAGES) / 65536 }).buffer) : Buffer.alloc(0);
const freeStages: number[] = Array.from({ length: STAGES }, (_, i) => i);
const fullStages: number[] = [];
let filling = -1;
let filled = 0;
let directFileBytes = RING_FILE;
function openNextDirect(): void {
  if (fileFd >= 0) fs.closeSync(fileFd);
  const f = `${writeDir}/null-${files.length}.bin`;
  files.push(f);
  if (files.length > 2) fs.rm(files[files.length - 3]!, { force: true }, () => {});
  fileFd = fs.openSync(f, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_DIRECT);
  directFileBytes = 0;
}
function pumpDirect(): void {
  if (writing || fullStages.length === 0) return;
  writing = true;
  if (directFileBytes >= RING_FILE) openNextDirect();
  const i = fullStages.shift()!;
  fs.write(fileFd, stageMem, i * STAGE, STAGE, directFileBytes, (err, n) => {
    if (err) throw err;
    stats.writtenBytes += n;
    freeStages.push(i);
    writing = false;
    pumpDirect();
  });
  directFileBytes += STAGE;
}
function toDiskDirect(msg: Buffer): void {
  let at = 0;
  while (at < msg.length) {
    if (filling < 0) {
      if (freeStages.length === 0) {
        stats.droppedBytes += msg.length - at;
        return;
      }
      filling = freeStages.shift()!;
      filled = 0;
    }
    const n = msg.copy(stageMem, filling * STAGE + filled, at, Math.min(msg.length, at + STAGE - filled));
    at += n;
    filled += n;
    if (filled === STAGE) {
      fullStages.push(filling);
      filling = -1;
      pumpDirect();
    }
  }
}

function toDisk(msg: Buffer): void {
  if (DIRECT) return toDiskDirect(msg);
  if (pendingBytes + msg.length > MAX_PENDING) {
    stats.droppedBytes += msg.length;
    return;
  }
  pending.push(msg);
  pendingBytes += msg.length;
  if (!writing) pump();
}

/** The grpc-js server meshcap's door is: the same service definition and HTTP/2 windows, only the handler differs. */
function grpcServer(): () => void {
  const server = new grpc.Server({ 'grpc.max_receive_message_length': 16 * 1024 * 1024, 'grpc.max_send_message_length': 1024 });
  if (!widenStreamWindow(server)) throw new Error('grpc-js internals changed: cannot widen the HTTP/2 windows as meshcap does');
  for (const path of STREAM_TAPS_PATHS) {
    server.addService(streamTapsService(path), {
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
          if (handOff) toThread(msg, call);
        });
        call.on('end', () => {
          finish();
          callback(null, EMPTY);
        });
        call.on('error', finish);
        call.on('cancelled', finish);
      },
    });
  }
  server.bindAsync(listen, grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) throw err;
    widenConnectionWindows(server, new Set(), (e) => {
      throw e;
    });
    ready();
  });
  return () => server.forceShutdown();
}

/** --raw-h2: StreamTaps on node:http2 alone, messages counted from their prefixes as the DATA chunks pass. */
function rawH2Server(): () => void {
  const server = http2.createServer({ settings: { initialWindowSize: STREAM_WINDOW } });
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on('session', (session) => {
    sessions.add(session);
    session.on('close', () => sessions.delete(session));
    const widen = () => session.setLocalWindowSize(CONNECTION_WINDOW);
    if (session.connecting) session.once('connect', widen);
    else widen();
  });
  server.on('stream', (stream, headers) => {
    if (!STREAM_TAPS_PATHS.includes(String(headers[':path']))) {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '12' }, { endStream: true });
      return;
    }
    stats.streamsActive++;
    stats.streamsTotal++;
    // The 5-byte prefix (flag, u32 length) may straddle chunks: its bytes so far, then the message's.
    let prefixHave = 0;
    let size = 0;
    let left = 0;
    stream.on('data', (chunk: Buffer) => {
      let i = 0;
      while (i < chunk.length) {
        if (left === 0 && prefixHave < 5) {
          if (prefixHave >= 1) size = size * 256 + chunk[i]!;
          i++;
          if (++prefixHave === 5) {
            left = size;
            if (left === 0) endMessage();
          }
          continue;
        }
        const n = Math.min(left, chunk.length - i);
        i += n;
        left -= n;
        if (left === 0) endMessage();
      }
    });
    const endMessage = () => {
      stats.messages++;
      stats.bytes += size;
      prefixHave = 0;
      size = 0;
    };
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        stats.streamsActive--;
      }
    };
    stream.on('end', () => {
      finish();
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      stream.end(Buffer.alloc(5)); // one empty message
    });
    stream.on('error', finish);
    stream.on('close', finish);
  });
  server.listen(listen.startsWith('unix:') ? listen.slice(5) : Number(listen.split(':').pop()), ready);
  return () => {
    for (const s of sessions) s.destroy();
    server.close();
  };
}

function ready(): void {
  process.send?.({ type: 'ready' });
  if (!process.send) console.error(`null sink listening on ${listen}`);
}

if (listen.startsWith('unix:')) fs.rmSync(listen.slice(5), { force: true });
const stop = argv.includes('--raw-h2') ? rawH2Server() : grpcServer();

process.on('message', (m: { id: number; cmd: string }) => {
  if (m.cmd === 'stats') process.send!({ id: m.id, ...stats });
  else if (m.cmd === 'stop') {
    stop();
    if (appendFd >= 0) fs.closeSync(appendFd);
    if (fileFd >= 0) fs.closeSync(fileFd);
    process.send!({ id: m.id, ok: true }, () => process.exit(0));
  }
});
process.on('disconnect', () => process.exit(0));
