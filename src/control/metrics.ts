/**
 * Prometheus metrics (prom-client), all named meshcap_* with units in the name, read from the
 * plain counters in PipelineStats and the sinks at scrape time.
 */
import client from 'prom-client';
import type { PipelineStats } from './stats.js';

export interface SinkCounters {
  readonly name: string;
  packetsWritten: number;
  bytesWritten: number;
  filesCompleted?: number;
  directBytesWritten?: number;
}

export function createMetrics(stats: PipelineStats, sinks: () => SinkCounters[]): client.Registry {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry, prefix: 'meshcap_' });

  const fromMap = (name: string, help: string, label: string, map: () => Map<string, number>): void => {
    new client.Counter({
      name,
      help,
      labelNames: [label],
      registers: [registry],
      collect() {
        this.reset();
        for (const [k, v] of map()) this.inc({ [label]: k }, v);
      },
    });
  };
  const counter = (name: string, help: string, value: () => number): void => {
    new client.Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(value());
      },
    });
  };
  const gauge = (name: string, help: string, value: () => number): void => {
    new client.Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(value());
      },
    });
  };

  fromMap('meshcap_ingest_messages_total', 'Tap messages received, by door (grpc, admin, udp, file).', 'source', () => stats.ingestMessages);
  fromMap('meshcap_ingest_bytes_total', 'Bytes of tap messages received, by door.', 'source', () => stats.ingestBytes);
  new client.Counter({
    name: 'meshcap_ingest_errors_total',
    help: 'Tap input rejected or repaired, by door and reason (malformed_protobuf, unknown_flow, timestamp_backwards, ...).',
    labelNames: ['source', 'reason'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [key, v] of stats.ingestErrors) {
        const [source, reason] = key.split('\u0000');
        this.inc({ source: source!, reason: reason! }, v);
      }
    },
  });
  fromMap('meshcap_dropped_packets_total', 'Packets missing from the capture, by cause (envoy_seq_gap, envoy_truncated, no_buffer, sink_backpressure, sink_error, ...).', 'cause', () => stats.drops as Map<string, number>);
  counter('meshcap_lost_bytes_total', 'Payload bytes Envoy reported (seq_num gaps) that never reached meshcap.', () => stats.lostBytes);
  counter('meshcap_flows_opened_total', 'Tapped connections opened.', () => stats.flowsOpened);
  counter('meshcap_flows_closed_total', 'Tapped connections closed by Envoy.', () => stats.flowsClosed);
  counter('meshcap_flows_expired_total', 'Tapped connections freed after the idle timeout.', () => stats.flowsExpired);
  gauge('meshcap_flows_active', 'Tapped connections open now.', () => stats.flowsActive);
  counter('meshcap_packets_total', 'Synthetic packets produced.', () => stats.packets);
  counter('meshcap_payload_bytes_total', 'Payload bytes placed into synthetic packets.', () => stats.payloadBytes);
  gauge('meshcap_grpc_streams_active', 'StreamTaps streams open now.', () => stats.grpcStreamsActive);
  counter('meshcap_grpc_streams_total', 'StreamTaps streams accepted.', () => stats.grpcStreamsTotal);
  new client.Counter({
    name: 'meshcap_sink_packets_written_total',
    help: 'Packets written by each sink.',
    labelNames: ['sink'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of sinks()) this.inc({ sink: s.name }, s.packetsWritten);
    },
  });
  new client.Counter({
    name: 'meshcap_sink_written_bytes_total',
    help: 'Bytes written by each sink (file headers and framing included).',
    labelNames: ['sink'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of sinks()) this.inc({ sink: s.name }, s.bytesWritten);
    },
  });
  /** Summed over the sinks that keep it. */
  const sinkTotal = (value: (s: SinkCounters) => number | undefined) => (): number => sinks().reduce((n, s) => n + (value(s) ?? 0), 0);
  counter('meshcap_capture_files_completed_total', 'Capture files completed (renamed from .part).', sinkTotal((s) => s.filesCompleted));
  counter(
    'meshcap_capture_direct_io_bytes_total',
    "Of the file sink's written bytes, those written by direct I/O (O_DIRECT, bypassing the page cache); 0 on filesystems without it.",
    sinkTotal((s) => s.directBytesWritten),
  );
  return registry;
}
