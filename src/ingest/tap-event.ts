/**
 * TapEvent: the one shape every door in (gRPC, admin /tap, UDP, files) produces. Nothing
 * downstream knows which door an event came through.
 *
 * Decoders reuse one TapEvent object per stream and hand it to the pipeline synchronously, so the
 * per-event path allocates nothing for the event itself; `payload` is a view into the received
 * message (no copy). Consumers must not keep references to the event or its payload after
 * `onEvent` returns.
 */

/** Where an endpoint of a tapped connection lives, as Envoy described it. */
export type TapAddress =
  | { kind: 'socket'; address: string; port: number }
  | { kind: 'pipe'; path: string }
  | { kind: 'internal'; listener: string; endpointId: string }
  | { kind: 'unknown' };

export interface TapConnection {
  /** Envoy's own side (the listener for downstream connections). */
  local: TapAddress;
  /** The peer Envoy talks to. */
  remote: TapAddress;
}

export const enum EventKind {
  /** A connection was opened (streamed `connection` segment or buffered trace header). */
  Connection = 0,
  /** Bytes Envoy received from the peer: remote → local. */
  Read = 1,
  /** Bytes Envoy sent to the peer: local → remote. */
  Write = 2,
  /** Envoy closed the socket. */
  Closed = 3,
}

/** Flags on a Closed event synthesised from a buffered trace. */
export const enum TraceTruncation {
  None = 0,
  /** Envoy stopped recording reads at max_buffered_rx_bytes. */
  Read = 1,
  /** Envoy stopped recording writes at max_buffered_tx_bytes. */
  Write = 2,
}

/** Who sent a stream of events: one Envoy (node) and one tap configuration. */
export interface StreamIdentity {
  nodeId: string;
  tapId: string;
  /** Which door: 'grpc', 'admin', 'udp', 'file'. For logs and metrics only. */
  source: string;
}

export interface TapEvent {
  kind: EventKind;
  /**
   * Envoy's trace id (its connection id), unique only per Envoy node. A number when it fits in
   * 2^53, otherwise its decimal string, so one id always maps to one key.
   */
  traceId: number | string;
  /** Wall-clock time of the event, seconds since the epoch (0 when Envoy sent none). */
  tsSec: number;
  /** Nanoseconds within tsSec. */
  tsNsec: number;
  /** True when the event carried a timestamp. */
  hasTimestamp: boolean;
  /** Read/Write payload: a view into the received message, never a copy. */
  payload: Buffer | null;
  /** Body.truncated: Envoy cut this body at max_buffered_*_bytes. */
  truncated: boolean;
  /** Write.end_stream: Envoy half-closed after this write. */
  endStream: boolean;
  /** SocketEvent.seq_num (Envoy >= 1.37), -1 when absent. */
  seqNum: number;
  /** Connection description (Connection events, and per-event connection on Envoy >= 1.34). */
  connection: TapConnection | null;
  /** TraceTruncation bits, on the Closed event that ends a buffered trace. */
  traceTruncation: number;
}

export function newTapEvent(): TapEvent {
  return {
    kind: EventKind.Connection,
    traceId: 0,
    tsSec: 0,
    tsNsec: 0,
    hasTimestamp: false,
    payload: null,
    truncated: false,
    endStream: false,
    seqNum: -1,
    connection: null,
    traceTruncation: TraceTruncation.None,
  };
}

export function resetTapEvent(ev: TapEvent): void {
  ev.kind = EventKind.Connection;
  ev.traceId = 0;
  ev.tsSec = 0;
  ev.tsNsec = 0;
  ev.hasTimestamp = false;
  ev.payload = null;
  ev.truncated = false;
  ev.endStream = false;
  ev.seqNum = -1;
  ev.connection = null;
  ev.traceTruncation = TraceTruncation.None;
}

/** Why a message or event was rejected; the `reason` label of meshcap_ingest_errors_total. */
export type IngestErrorReason =
  | 'malformed_protobuf'
  | 'malformed_json'
  | 'malformed_text'
  | 'message_too_large'
  | 'missing_identifier'
  | 'http_trace_unsupported'
  | 'empty_trace'
  | 'unknown_flow'
  | 'closed_unknown_flow'
  | 'timestamp_backwards'
  | 'flow_table_full'
  | 'stream_aborted'
  | 'io_error';

/** What the pipeline offers to every door. */
export interface TapEventHandler {
  onEvent(stream: StreamIdentity, ev: TapEvent): void;
  /** A door rejected input; counted and logged with context, never thrown. */
  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void;
  /** A message was accepted by a door (for meshcap_ingest_messages_total / bytes). */
  onIngestMessage(source: string, bytes: number): void;
}
