/**
 * Drives one or more load generator processes (bench/loadgen.ts) as one load.
 */
import { addSent, zeroSent, type LoadgenStart, type Sent } from '../loadgen.js';
import { DEFAULT_WORKLOAD, type WorkloadOptions } from './workload.js';
import { IpcChild, loadgenScript } from './procs.js';

export interface LoadOptions {
  target: string;
  /** Emulated sidecars (HTTP/2 connections, one StreamTaps stream each), spread over `procs`. */
  sidecars: number;
  procs?: number;
  /** Message bytes per second in total; 0 = as fast as flow control allows. */
  rate?: number;
  durationMs: number;
  workload?: Partial<WorkloadOptions>;
  chunkBytes?: number;
  nodePrefix?: string;
}

export interface LoadDone {
  sent: Sent;
  /** grpc-status of every stream (0 = OK; null = no status: the stream broke). */
  statuses: Array<number | null>;
  messages: string[];
  cpuSeconds: number;
  wallMs: number;
  offeredMsgBytes: number | null;
  errors: string[];
}

export interface ScriptInfo {
  total: Omit<Sent, 'wireBytes'>;
  chunks: number;
  payloadPerMsgByte: number;
  bigShareBytes: number;
}

export class Load {
  readonly done: Promise<LoadDone>;
  private constructor(
    readonly procs: IpcChild[],
    readonly info: ScriptInfo,
    done: Array<Promise<Record<string, unknown>>>,
  ) {
    this.done = Promise.all(done).then((ds) => {
      const out: LoadDone = { sent: zeroSent(), statuses: [], messages: [], cpuSeconds: 0, wallMs: 0, offeredMsgBytes: null, errors: [] };
      for (const d of ds) {
        addSent(out.sent, (d.sent ?? {}) as Partial<Sent>);
        for (const s of (d.statuses ?? []) as Array<{ status: number | null; message: string }>) {
          out.statuses.push(s.status);
          if (s.status !== 0) out.messages.push(s.message);
        }
        out.cpuSeconds += Number(d.cpuSeconds ?? 0);
        out.wallMs = Math.max(out.wallMs, Number(d.wallMs ?? 0));
        if (d.offeredMsgBytes != null) out.offeredMsgBytes = (out.offeredMsgBytes ?? 0) + Number(d.offeredMsgBytes);
        if (d.error) out.errors.push(String(d.error));
      }
      return out;
    });
    void this.done.finally(() => Promise.all(procs.map((p) => p.kill())));
  }

  get pids(): number[] {
    return this.procs.map((p) => p.pid);
  }

  static async start(o: LoadOptions): Promise<Load> {
    const n = Math.max(1, Math.min(o.procs ?? 1, o.sidecars));
    const procs = Array.from({ length: n }, () => IpcChild.fork(loadgenScript()));
    const done = procs.map((p) => p.next('done'));
    for (const d of done) d.catch(() => {});
    const infos = await Promise.all(
      procs.map((p, i) => {
        const sidecars = Math.floor(o.sidecars / n) + (i < o.sidecars % n ? 1 : 0);
        const start: LoadgenStart = {
          target: o.target,
          sidecars,
          nodePrefix: `${o.nodePrefix ?? 'sidecar'}-p${i}`,
          workload: { ...DEFAULT_WORKLOAD, ...o.workload },
          chunkBytes: o.chunkBytes ?? 256 * 1024,
          rate: ((o.rate ?? 0) * sidecars) / o.sidecars,
          durationMs: o.durationMs,
        };
        return p.request<ScriptInfo>('start', start as unknown as Record<string, unknown>);
      }),
    );
    return new Load(procs, infos[0]!, done);
  }

  async sent(): Promise<Sent> {
    const all = await Promise.all(this.procs.map((p) => p.request<{ sent: Sent }>('stats').catch(() => ({ sent: zeroSent() }))));
    const s = zeroSent();
    for (const a of all) addSent(s, a.sent);
    return s;
  }

  async stop(): Promise<LoadDone> {
    await Promise.all(this.procs.map((p) => p.request('stop').catch(() => {})));
    return await this.done;
  }
}
