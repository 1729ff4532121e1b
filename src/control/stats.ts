/**
 * Plain counters updated on the data path; prom-client reads them at scrape time (metrics.ts), so
 * the hot loop never touches a metrics library.
 */
import type { IngestErrorReason } from '../ingest/tap-event.js';

/** Why packets (or the bytes they would have carried) are missing; `cause` label of drops. */
export type DropCause =
  /** Envoy's seq_num jumped: bytes lost before meshcap saw them. */
  | 'envoy_seq_gap'
  /** Envoy cut an event body at max_buffered_*_bytes. */
  | 'envoy_truncated'
  /** Envoy stopped recording a direction of a buffered trace at max_buffered_*_bytes. */
  | 'envoy_buffer_limit'
  /** Every output block was still held by a slow sink. */
  | 'no_buffer'
  /** A sink's own queue was full (slow disk, slow consumer). */
  | 'sink_backpressure'
  /** A sink failed to write (disk full, I/O error). */
  | 'sink_error'
  /** A new flow found the flow table full. */
  | 'flow_table_full'
  /** An event Envoy already delivered (seq_num behind). */
  | 'duplicate_event'
  /** An event rejected as bad input. */
  | 'bad_input'
  /** The broker sink's memory queue and on-disk spool were both full (broker down or slow too long). */
  | 'broker_spool_full';

export class PipelineStats {
  readonly ingestMessages = new Map<string, number>();
  readonly ingestBytes = new Map<string, number>();
  readonly ingestErrors = new Map<string, number>();
  readonly drops = new Map<DropCause, number>();
  lostBytes = 0;
  flowsOpened = 0;
  flowsClosed = 0;
  flowsExpired = 0;
  flowsActive = 0;
  packets = 0;
  payloadBytes = 0;
  grpcStreamsActive = 0;
  grpcStreamsTotal = 0;

  message(source: string, bytes: number): void {
    this.ingestMessages.set(source, (this.ingestMessages.get(source) ?? 0) + 1);
    this.ingestBytes.set(source, (this.ingestBytes.get(source) ?? 0) + bytes);
  }

  error(source: string, reason: IngestErrorReason): void {
    const key = `${source}\u0000${reason}`;
    this.ingestErrors.set(key, (this.ingestErrors.get(key) ?? 0) + 1);
  }

  drop(cause: DropCause, packets: number): void {
    this.drops.set(cause, (this.drops.get(cause) ?? 0) + packets);
  }

  dropsOf(cause: DropCause): number {
    return this.drops.get(cause) ?? 0;
  }

  totalDrops(): number {
    let n = 0;
    for (const v of this.drops.values()) n += v;
    return n;
  }
}
