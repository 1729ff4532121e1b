/**
 * The bookkeeping of StreamTaps calls, the same whichever door serves them (grpc-tap-server.ts,
 * h2-tap-server.ts): each call's identity (from its first message), the stream counters, the "tap
 * stream started / ended" log lines, and errors counted against the call.
 */
import type { Logger } from 'pino';
import type { PipelineStats } from '../control/stats.js';
import type { IngestErrorReason, StreamIdentity, TapEventHandler } from './tap-event.js';
import { TraceDecoder, type StreamState } from './trace-decoder.js';

const SOURCE = 'grpc';

/** What a door's calls share: the decoder into the pipeline, counters, the log. */
export class TapStreamDoor {
  readonly decoder: TraceDecoder;
  private anonymous = 0;

  constructor(
    readonly handler: TapEventHandler,
    readonly stats: PipelineStats,
    readonly log: Logger,
  ) {
    this.decoder = new TraceDecoder(handler);
  }

  /** Names a call whose first message has no identifier (never seen from Envoy; counted). */
  readonly nextAnonymous = (): StreamIdentity => ({ nodeId: `anonymous-${++this.anonymous}`, tapId: '', source: SOURCE });

  /** A call begins; `peer` names the client in logs and errors. */
  open(peer: string, version: string): TapStream {
    return new TapStream(this, peer, version);
  }
}

/** One call. */
export class TapStream {
  readonly state: StreamState = { identity: null, messages: 0 };
  /** finish() was called. */
  finished = false;

  constructor(
    private readonly door: TapStreamDoor,
    readonly peer: string,
    readonly version: string,
  ) {
    door.stats.grpcStreamsActive++;
    door.stats.grpcStreamsTotal++;
  }

  /** One StreamTapsRequest, decoded into the pipeline (valid only during the call: views are taken). */
  message(msg: Buffer): void {
    const d = this.door;
    d.handler.onIngestMessage(SOURCE, msg.length);
    const first = this.state.identity === null;
    d.decoder.decodeStreamTapsRequest(msg, this.state, SOURCE, d.nextAnonymous);
    if (first && this.state.identity) d.log.info({ peer: this.peer, version: this.version, node: this.state.identity.nodeId, tap_id: this.state.identity.tapId }, 'tap stream started');
  }

  /** Counts and logs an error of this call, under its identity once known. */
  error(reason: IngestErrorReason, detail: string): void {
    this.door.handler.onIngestError(this.state.identity ?? { nodeId: '', tapId: '', source: SOURCE }, reason, detail);
  }

  /** The call is over (once; later calls do nothing). */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    const s = this.state;
    this.door.stats.grpcStreamsActive--;
    this.door.log.info({ peer: this.peer, version: this.version, node: s.identity?.nodeId, tap_id: s.identity?.tapId, messages: s.messages }, 'tap stream ended');
  }
}
