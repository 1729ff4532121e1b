/**
 * One tap file as a stream of TapEvents in time order, decoded a batch at a time: a batch is the
 * events of the messages of one load of the file (a chunk), so memory is a chunk plus its events,
 * whatever the size of the file. TapMerge merges many readers into one time-ordered stream.
 *
 * Order. Each event gets a merge key: its timestamp; an event without one takes the previous
 * timestamp of the file (so it stays where it was), and a connection event without one sorts at 0,
 * first, as the whole-input sort of old did. Envoy writes a file in time order, and then the keys
 * are the timestamps and the merge is exactly the old stable sort of everything. Where a file is
 * not in time order, two rules keep it sane:
 *  - a connection's own events keep their file order (Envoy wrote them in the order it saw them,
 *    and their seq_nums say so): an event older than its connection's previous one takes that
 *    one's key. The old sort put it first, which misplaced its bytes in the TCP stream and dropped
 *    the event it overtook as a duplicate.
 *  - events of different connections in one file (a recorded gRPC stream) are sorted by time
 *    within a batch (stably); one older than what the file already handed out in an earlier batch
 *    takes that key, and comes out right after it.
 * Timestamps themselves are left alone (the flow table clamps and counts them per flow), and no
 * event is dropped for its time.
 *
 * Parking. TapMerge may take a reader's memory away while other files are ahead of it (many
 * files, bounded memory): park() keeps only the head key and where the batch began; resume()
 * reads that batch again and skips what was already handed out. Decoding is deterministic, so a
 * replayed batch is the same batch; reports (ingest errors, message counts) of a replay are
 * suppressed by counting them, so each is made exactly once.
 */
import path from 'node:path';
import { EventKind, newTapEvent, type IngestErrorReason, type StreamIdentity, type TapEvent, type TapEventHandler } from './tap-event.js';
import type { TapFileFormat } from './tap-file.js';
import { openMessageSource, type ChunkPool, type MessageSource } from './tap-file-source.js';
import { TraceDecoder, type StreamState } from './trace-decoder.js';

const SOURCE = 'file';

export const enum ReaderState {
  Unstarted,
  /** Holds a batch in memory; the head event can be handed out. */
  Buffered,
  /** Holds only the head key; resume() reloads the batch. */
  Parked,
  Done,
}

export class TapFileReader implements TapEventHandler {
  /** The file as an Envoy namespace: `file:` + its path (gRPC recordings name their Envoy instead). */
  private readonly fileStream: StreamIdentity;
  state = ReaderState.Unstarted;
  /** Merge key of the head event (valid while Buffered or Parked). */
  headSec = 0;
  headNsec = 0;

  private readonly src: MessageSource;
  private readonly grpc: StreamState | null;

  // The batch: reused event objects in file order, their keys, and the order to hand them out.
  private evs: TapEvent[] = [];
  private keySec: number[] = [];
  private keyNsec: number[] = [];
  private order: number[] | null = null;
  private n = 0;
  private head = 0;
  private sorted = true;
  private lastSec = 0;
  private lastNsec = 0;

  /** The newest key handed out: later events may not sort before it. */
  private floorSec = 0;
  private floorNsec = 0;
  /** The previous timestamp in file order, for events without one. */
  private prevSec = 0;
  private prevNsec = 0;

  // Where the current batch began, and what a replay of it must start from.
  private cpPos = 0;
  private cpFloorSec = 0;
  private cpFloorNsec = 0;
  private cpPrevSec = 0;
  private cpPrevNsec = 0;
  private cpReports = 0;
  /** A recorded gRPC stream's identity then (the first message sets it; a replay must too). */
  private cpIdentity: StreamIdentity | null = null;
  private batchEnd = 0;
  private batches = 0;
  private emitted = 0;

  /** Reports made in file order so far, and the most ever made (a replay stays silent below it). */
  private reportSeq = 0;
  private reported = 0;

  constructor(
    readonly index: number,
    readonly file: string,
    readonly format: TapFileFormat,
    private readonly out: TapEventHandler,
    pool: ChunkPool,
    maxMessageBytes: number,
  ) {
    this.fileStream = { nodeId: `file:${path.resolve(file)}`, tapId: path.basename(file), source: SOURCE };
    this.grpc = format === 'grpc' ? { identity: null, messages: 0 } : null;
    this.src = openMessageSource(file, format, pool, maxMessageBytes, (reason, detail) => this.onIngestError(this.grpc ? this.grpc.identity : this.fileStream, reason, detail));
  }

  /**
   * Whose events these are: the file, or for a recorded gRPC stream the Envoy its first message
   * names (set before its first event, never changed after).
   */
  get stream(): StreamIdentity {
    return this.grpc?.identity ?? this.fileStream;
  }

  /** Bytes of memory held. */
  get memory(): number {
    return this.state === ReaderState.Buffered ? this.src.memory : 0;
  }

  /** Input bytes read so far, and the file's size (known once started), for progress. */
  get consumed(): number {
    return this.src.consumed;
  }

  get size(): number {
    return Math.max(0, this.src.size);
  }

  /** Reads the first batch. False when the file holds no event. */
  start(): boolean {
    return this.fill(Infinity);
  }

  /** The next event of this file in key order (Buffered only). Valid until advance(). */
  peek(): TapEvent {
    return this.evs[this.order ? this.order[this.head]! : this.head]!;
  }

  /** Moves past the head event; false when the file has no more events. */
  advance(): boolean {
    this.floorSec = this.headSec;
    this.floorNsec = this.headNsec;
    this.emitted++;
    if (++this.head < this.n) {
      this.setHead();
      return true;
    }
    return this.fill(Infinity);
  }

  /** Gives up the batch's memory, keeping the head key and where the batch began. */
  park(): void {
    if (this.state !== ReaderState.Buffered) return;
    this.src.release();
    this.evs = [];
    this.keySec = [];
    this.keyNsec = [];
    this.order = null;
    this.n = this.head = 0;
    this.state = ReaderState.Parked;
  }

  /** Reloads the parked batch and skips the events already handed out. */
  resume(): void {
    if (this.state !== ReaderState.Parked) return;
    const batch = this.batches - 1;
    const skip = this.emitted;
    const sec = this.headSec;
    const nsec = this.headNsec;
    if (this.src.seekable) {
      this.src.seek(this.cpPos);
      this.floorSec = this.cpFloorSec;
      this.floorNsec = this.cpFloorNsec;
      this.prevSec = this.cpPrevSec;
      this.prevNsec = this.cpPrevNsec;
      this.reportSeq = this.cpReports;
      if (this.grpc) this.grpc.identity = this.cpIdentity;
      this.batches = batch;
      this.fill(this.batchEnd);
    } else {
      // Text formats restart from the beginning: the same loads give the same batches.
      this.src.seek(0);
      this.floorSec = this.floorNsec = this.prevSec = this.prevNsec = 0;
      this.reportSeq = 0;
      if (this.grpc) this.grpc.identity = null;
      this.batches = 0;
      this.fill(Infinity);
      while (this.buffered && this.batches - 1 < batch) {
        // As if its events had been handed out: the floor the next batch was decoded with.
        const last = this.at(this.n - 1);
        this.floorSec = this.keySec[last]!;
        this.floorNsec = this.keyNsec[last]!;
        this.fill(Infinity);
      }
    }
    if (!this.buffered || this.batches - 1 !== batch) throw new Error(`${this.file}: changed while being converted`);
    for (let i = 0; i < skip; i++) {
      this.floorSec = this.keySec[this.at(this.head)]!;
      this.floorNsec = this.keyNsec[this.at(this.head)]!;
      this.head++;
    }
    this.emitted = skip;
    if (this.head >= this.n) throw new Error(`${this.file}: changed while being converted`);
    this.setHead();
    if (this.headSec !== sec || this.headNsec !== nsec) throw new Error(`${this.file}: changed while being converted`);
  }

  // TapEventHandler, for the decoder -------------------------------------------------------

  onEvent(_stream: StreamIdentity, ev: TapEvent): void {
    const i = this.n++;
    let e = this.evs[i];
    if (e === undefined) {
      e = newTapEvent();
      this.evs.push(e);
    }
    // The decoder reuses its event: copy the fields (the payload stays a view into the file's chunk).
    e.kind = ev.kind;
    e.traceId = ev.traceId;
    e.tsSec = ev.tsSec;
    e.tsNsec = ev.tsNsec;
    e.hasTimestamp = ev.hasTimestamp;
    e.payload = ev.payload;
    e.truncated = ev.truncated;
    e.endStream = ev.endStream;
    e.seqNum = ev.seqNum;
    e.connection = ev.connection;
    e.traceTruncation = ev.traceTruncation;
    let sec: number;
    let nsec: number;
    if (ev.hasTimestamp) {
      sec = this.prevSec = ev.tsSec;
      nsec = this.prevNsec = ev.tsNsec;
    } else if (ev.kind === EventKind.Connection) {
      sec = nsec = 0;
    } else {
      sec = this.prevSec;
      nsec = this.prevNsec;
    }
    if (sec < this.floorSec || (sec === this.floorSec && nsec < this.floorNsec)) {
      sec = this.floorSec;
      nsec = this.floorNsec;
    }
    // A connection's events are in Envoy's order in its file (seq_num says so); sorting one back
    // before its predecessor would misplace its bytes, so it keeps its place instead.
    const before = lastOfTrace.get(ev.traceId);
    if (before !== undefined) {
      const bs = this.keySec[before]!;
      const bn = this.keyNsec[before]!;
      if (sec < bs || (sec === bs && nsec < bn)) {
        sec = bs;
        nsec = bn;
      }
    }
    lastOfTrace.set(ev.traceId, i);
    if (sec < this.lastSec || (sec === this.lastSec && nsec < this.lastNsec)) this.sorted = false;
    this.lastSec = sec;
    this.lastNsec = nsec;
    this.keySec[i] = sec;
    this.keyNsec[i] = nsec;
  }

  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void {
    if (this.fresh()) this.out.onIngestError(stream, reason, detail);
  }

  onIngestMessage(source: string, bytes: number): void {
    if (this.fresh()) this.out.onIngestMessage(source, bytes);
  }

  // -----------------------------------------------------------------------------------------

  /** A method, not a field test: TypeScript would keep the state narrowed across fill(). */
  private get buffered(): boolean {
    return this.state === ReaderState.Buffered;
  }

  /** Counts a report; true the first time it is made (not in a replay). */
  private fresh(): boolean {
    if (this.reportSeq++ < this.reported) return false;
    this.reported = this.reportSeq;
    return true;
  }

  private at(k: number): number {
    return this.order ? this.order[k]! : k;
  }

  private setHead(): void {
    const i = this.at(this.head);
    this.headSec = this.keySec[i]!;
    this.headNsec = this.keyNsec[i]!;
  }

  private checkpoint(): void {
    this.cpPos = this.src.position;
    this.cpFloorSec = this.floorSec;
    this.cpFloorNsec = this.floorNsec;
    this.cpPrevSec = this.prevSec;
    this.cpPrevNsec = this.prevNsec;
    this.cpReports = this.reportSeq;
    if (this.grpc) this.cpIdentity = this.grpc.identity;
  }

  /** Decodes the next batch (`limit`: a replay ends where the original batch ended). */
  private fill(limit: number): boolean {
    this.n = this.head = 0;
    this.order = null;
    this.sorted = true;
    this.lastSec = this.floorSec;
    this.lastNsec = this.floorNsec;
    this.emitted = 0;
    lastOfTrace.clear();
    this.checkpoint();
    shared.target = this;
    try {
      for (;;) {
        const msg = this.src.next();
        if (msg !== null) {
          this.decode(msg);
          continue;
        }
        if (this.n > 0) break;
        // Nothing of what was loaded is in the batch: a replay may begin at the next load.
        if (this.src.position !== this.cpPos || this.reportSeq !== this.cpReports) this.checkpoint();
        if (!this.src.refill(limit)) break;
      }
    } finally {
      shared.target = NOBODY;
    }
    if (this.n === 0) {
      // Done: keep nothing but what progress reports need.
      this.state = ReaderState.Done;
      this.src.release();
      this.evs = [];
      this.keySec = [];
      this.keyNsec = [];
      return false;
    }
    this.state = ReaderState.Buffered;
    this.batchEnd = this.src.position;
    this.batches++;
    if (!this.sorted) this.sortBatch();
    this.setHead();
    return true;
  }

  private decode(msg: Buffer): void {
    this.onIngestMessage(SOURCE, msg.length);
    if (this.grpc) shared.decoder.decodeStreamTapsRequest(msg, this.grpc, SOURCE, () => this.fileStream);
    else shared.decoder.decodeTraceWrapper(msg, this.fileStream);
  }

  /** A stable sort of the batch by key: file order among equal keys, as the old global sort. */
  private sortBatch(): void {
    const ks = this.keySec;
    const kn = this.keyNsec;
    const order = Array.from({ length: this.n }, (_, i) => i);
    order.sort((a, b) => ks[a]! - ks[b]! || kn[a]! - kn[b]! || a - b);
    this.order = order;
  }
}

/**
 * One decoder for every reader: a batch is decoded synchronously, one reader at a time, so the
 * decoder's events go to whichever reader is filling (thousands of files need no decoder each).
 */
const NOBODY: TapEventHandler = {
  onEvent: () => {
    throw new Error('tap event outside a batch');
  },
  onIngestError: () => {},
  onIngestMessage: () => {},
};

class SharedDecoder implements TapEventHandler {
  target: TapEventHandler = NOBODY;
  readonly decoder = new TraceDecoder(this);
  onEvent(stream: StreamIdentity, ev: TapEvent): void {
    this.target.onEvent(stream, ev);
  }
  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void {
    this.target.onIngestError(stream, reason, detail);
  }
  onIngestMessage(source: string, bytes: number): void {
    this.target.onIngestMessage(source, bytes);
  }
}

const shared = new SharedDecoder();

/**
 * Per connection (trace id), its latest event in the batch being decoded (an index into the
 * batch), so that a connection's own events keep file order; across batches the file's floor
 * already does that. One map for all readers: only one batch is decoded at a time.
 */
const lastOfTrace = new Map<number | string, number>();
