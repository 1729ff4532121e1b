/**
 * The pipeline: every door in calls it with TapEvents; it owns the flow table, the slicer and the
 * block pool, and hands finished blocks to the sinks (doors out).
 *
 *   ingest (TapEvent) → FlowTable (TCP state) → Slicer (frames into a Block) → sinks
 *
 * Blocks go to the sinks when full and at least every flush interval, so readers of the files see
 * fresh packets. Nothing here waits on a sink: when every block is held by slow sinks, packets are
 * dropped and counted (`no_buffer`) and marked in the capture.
 */
import type { Logger } from 'pino';
import { LogLimiter } from './control/log-limiter.js';
import type { PipelineStats } from './control/stats.js';
import type { RecordFramer } from './format/record-framer.js';
import { FlowTable } from './flow/flow-table.js';
import type { IngestErrorReason, StreamIdentity, TapEvent, TapEventHandler } from './ingest/tap-event.js';
import { BlockPool, type Block } from './packet/block.js';
import { Slicer, type BlockOutput } from './packet/slicer.js';
import type { BlockSink } from './sink/sink.js';

export interface PipelineOptions {
  framer: RecordFramer;
  snaplen: number;
  mss4: number;
  mss6: number;
  blockSize: number;
  blockCount: number;
  flushIntervalMs: number;
  idleTimeoutMs: number;
  maxFlows: number;
  /** Map the blocks' pages at start (false: as they are first filled; one-shot conversions). */
  prefault?: boolean;
}

export const DEFAULT_PIPELINE: Omit<PipelineOptions, 'framer'> = {
  snaplen: 262144,
  mss4: 1460,
  mss6: 1440,
  blockSize: 4 * 1024 * 1024,
  blockCount: 8,
  flushIntervalMs: 250,
  idleTimeoutMs: 300_000,
  maxFlows: 1_000_000,
};

export class Pipeline implements TapEventHandler, BlockOutput {
  current: Block | null = null;
  readonly flows: FlowTable;
  private readonly pool: BlockPool;
  private readonly sinks: BlockSink[] = [];
  /** The sink that lays out blocks for its disk (the file sink), if any. */
  private layout: BlockSink | null = null;
  private readonly limiter: LogLimiter;
  private flushTimer: NodeJS.Timeout | null = null;
  private sweepTimer: NodeJS.Timeout | null = null;
  private readonly releaseBlock = (block: Block): void => {
    if (--block.refs <= 0) this.pool.release(block);
  };

  constructor(
    readonly opts: PipelineOptions,
    readonly stats: PipelineStats,
    private readonly log: Logger,
  ) {
    // Snaplen bounds the biggest record; jumbo MSS needs blocks that hold a whole frame.
    this.pool = new BlockPool(opts.blockCount, Math.max(opts.blockSize, 2 * (opts.mss4 + 1024)), opts.framer, true, opts.prefault ?? true);
    this.limiter = new LogLimiter(log);
    const slicer = new Slicer(this, { snaplen: opts.snaplen });
    this.flows = new FlowTable(slicer, opts, stats, log);
  }

  /** Empty blocks left in the pool (a one-shot producer waits for sinks when this runs low). */
  get freeBlocks(): number {
    return this.pool.available;
  }

  addSink(sink: BlockSink): void {
    this.sinks.push(sink);
    if (!this.layout && sink.nextBlockLead) this.layout = sink;
  }

  /** Starts the flush and idle-sweep timers (not used by one-shot conversion). */
  start(): void {
    this.flushTimer = setInterval(() => this.flush(), this.opts.flushIntervalMs);
    this.flushTimer.unref();
    const sweepEvery = Math.min(10_000, Math.max(1000, this.opts.idleTimeoutMs / 4));
    this.sweepTimer = setInterval(() => this.flows.sweep(Date.now()), sweepEvery);
    this.sweepTimer.unref();
  }

  onEvent(stream: StreamIdentity, ev: TapEvent): void {
    this.flows.handle(stream, ev, Date.now());
  }

  onIngestMessage(source: string, bytes: number): void {
    this.stats.message(source, bytes);
  }

  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void {
    const source = stream?.source ?? 'unknown';
    this.stats.error(source, reason);
    this.limiter.warn(`${source}/${reason}`, { reason, source, node: stream?.nodeId, tap_id: stream?.tapId }, detail);
  }

  /** BlockOutput: hand the current block to the sinks, take an empty one. */
  rotate(): Block | null {
    const full = this.current;
    if (full && full.count > 0) this.dispatch(full);
    else if (full) this.pool.release(full);
    this.current = this.take();
    return this.current;
  }

  /** Hands a partly filled block to the sinks now. */
  flush(): void {
    if (this.current && this.current.count > 0) {
      this.dispatch(this.current);
      this.current = this.take();
    }
  }

  /** An empty block, laid out for the file sink's disk (after the previous one was dispatched). */
  private take(): Block | null {
    const block = this.pool.acquire();
    if (block && this.layout) block.lead(this.layout.nextBlockLead!());
    return block;
  }

  /** Flushes, stops timers, closes every sink. */
  async close(): Promise<void> {
    if (this.flushTimer) clearInterval(this.flushTimer);
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.flush();
    await Promise.all(this.sinks.map((s) => s.close()));
  }

  private dispatch(block: Block): void {
    if (this.sinks.length === 0) {
      this.pool.release(block);
      return;
    }
    block.refs = this.sinks.length;
    for (const sink of this.sinks) sink.write(block, this.releaseBlock);
  }
}
