/**
 * The load generator: N emulated Envoy sidecars, each one HTTP/2 connection over the target's Unix
 * socket with one StreamTaps client stream, replaying a seeded workload (bench/lib/workload.ts:
 * many interleaved connections, 64 KiB and 4 KiB events with seq_num) in a loop, as fast as HTTP/2
 * flow control lets it or at a given rate, for a bounded time.
 *
 * Runs as a child of the benchmark (child_process.fork), driven over IPC:
 *   { cmd: 'start', target, sidecars, nodePrefix, workload, chunkBytes, rate, durationMs }
 *       builds the script, connects every sidecar, starts sending; replies with the script's totals
 *   { cmd: 'stats' }   counts sent so far
 *   { cmd: 'stop' }    stop sending now (the run also stops by itself after durationMs)
 * and sends { type: 'done', sent, statuses, cpu } when every stream has ended (half-closed by the
 * generator, status received from the server). Counts are exact: whole messages, each with the
 * packets meshcap must make of it.
 */
import { performance } from 'node:perf_hooks';
import { TapStream, type StreamEnd } from './lib/h2client.js';
import { GRPC_FRAME_HEAD, identifierRequest } from './lib/tapwire.js';
import { buildScript, type Chunk, type WorkloadOptions } from './lib/workload.js';

export interface LoadgenStart {
  target: string;
  sidecars: number;
  nodePrefix: string;
  workload: WorkloadOptions;
  chunkBytes: number;
  /** Message bytes per second over all sidecars of this generator; 0 = as fast as possible. */
  rate: number;
  durationMs: number;
}

export interface Sent {
  messages: number;
  msgBytes: number;
  payload: number;
  packets: number;
  dataEvents: number;
  opened: number;
  closed: number;
  /** Bytes on the wire (gRPC frames). */
  wireBytes: number;
}

export const zeroSent = (): Sent => ({ messages: 0, msgBytes: 0, payload: 0, packets: 0, dataEvents: 0, opened: 0, closed: 0, wireBytes: 0 });

export function addSent(a: Sent, b: Partial<Sent>): Sent {
  for (const k of Object.keys(a) as Array<keyof Sent>) a[k] += b[k] ?? 0;
  return a;
}

function addChunk(s: Sent, c: Chunk): void {
  s.messages += c.messages;
  s.msgBytes += c.msgBytes;
  s.payload += c.payload;
  s.packets += c.packets;
  s.dataEvents += c.dataEvents;
  s.opened += c.opened;
  s.closed += c.closed;
  s.wireBytes += c.buf.length;
}

const sent = zeroSent();
let stopping = false;
let startedAt = 0;

async function run(o: LoadgenStart, reply: (body: Record<string, unknown>) => void): Promise<void> {
  const script = buildScript(o.workload, o.chunkBytes);
  const streams: TapStream[] = [];
  for (let i = 0; i < o.sidecars; i++) streams.push(await TapStream.open(o.target));
  const stopAt = performance.now() + o.durationMs;
  const perSidecar = o.rate > 0 ? o.rate / o.sidecars : 0;
  startedAt = Date.now();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  reply({ total: script.total, chunks: script.chunks.length, payloadPerMsgByte: script.payloadPerMsgByte, bigShareBytes: script.bigShareBytes, startedAt });

  let lagMax = 0;
  const sidecar = async (i: number, s: TapStream): Promise<StreamEnd> => {
    const id = identifierRequest(`${o.nodePrefix}-${i}`, 'bench');
    sent.messages++;
    sent.msgBytes += id.length - GRPC_FRAME_HEAD;
    sent.wireBytes += id.length;
    await s.write(id);
    let k = 0;
    let mine = 0;
    let n = 0;
    try {
      while (!stopping) {
        const now = performance.now();
        if (now >= stopAt) break;
        const c = script.chunks[k]!;
        if (perSidecar > 0) {
          const due = t0 + (mine / perSidecar) * 1000;
          if (due > now + 1) await new Promise((r) => setTimeout(r, due - now));
          else lagMax = Math.max(lagMax, (now - due) * perSidecar / 1000);
        }
        if (stopping || s.broken) break;
        const p = s.write(c.buf);
        addChunk(sent, c);
        mine += c.msgBytes;
        if (p) await p;
        else if (++n % 8 === 0) await new Promise((r) => setImmediate(r));
        k = (k + 1) % script.chunks.length;
      }
    } catch {
      /* the server went away: reported by end() */
    }
    return await s.end(20_000);
  };
  const statuses = await Promise.all(streams.map((s, i) => sidecar(i, s)));
  const cpu = process.cpuUsage(cpu0);
  const wallMs = performance.now() - t0;
  process.send!({ type: 'done', sent, statuses, cpuSeconds: (cpu.user + cpu.system) / 1e6, wallMs, lagMaxBytes: lagMax, offeredMsgBytes: o.rate > 0 ? (o.rate * Math.min(wallMs, o.durationMs)) / 1000 : null });
}

process.on('message', (m: { id: number; cmd: string } & Partial<LoadgenStart>) => {
  const reply = (body: Record<string, unknown>) => process.send!({ id: m.id, ...body });
  if (m.cmd === 'start') {
    run(m as unknown as LoadgenStart, reply).catch((err: Error) => {
      process.send!({ id: m.id, error: err.stack ?? err.message });
      process.send!({ type: 'done', error: err.message, sent });
    });
  } else if (m.cmd === 'stats') reply({ sent, startedAt });
  else if (m.cmd === 'stop') {
    stopping = true;
    reply({ ok: true });
  }
});
process.on('disconnect', () => process.exit(0));
