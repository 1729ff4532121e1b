/**
 * Prometheus metrics of the broker sink (`meshcap serve --broker`) and of `meshcap collect`, read
 * from the plain counters of those objects at scrape time. Drops beyond the spool cap are counted
 * in the pipeline's meshcap_dropped_packets_total{cause="broker_spool_full"}.
 */
import client from 'prom-client';
import type { Collector } from '../cli/collect.js';
import type { BrokerSink } from '../sink/broker-sink.js';
import type { TlsFiles } from './tls-files.js';

type Labels = Record<string, string>;

function counter(registry: client.Registry, name: string, help: string, labelNames: string[], values: () => Array<[Labels, number]>): void {
  new client.Counter({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [l, v] of values()) this.inc(l, v);
    },
  });
}

function gauge(registry: client.Registry, name: string, help: string, labelNames: string[], values: () => Array<[Labels, number]>): void {
  new client.Gauge({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [l, v] of values()) this.set(l, v);
    },
  });
}

function tlsMetrics(registry: client.Registry, prefix: string, files: () => TlsFiles[]): void {
  gauge(registry, `${prefix}_tls_cert_expiry_timestamp_seconds`, 'When the certificate in use expires (Unix time).', ['cert'], () =>
    files().map((f) => [{ cert: f.paths.cert }, Math.floor(f.current.info.notAfter.getTime() / 1000)]),
  );
  counter(registry, `${prefix}_tls_reloads_total`, 'Certificate files reloaded after they changed on disk, by result.', ['result'], () => {
    let ok = 0;
    let failed = 0;
    for (const f of files()) {
      ok += f.reloads;
      failed += f.reloadFailures;
    }
    return [
      [{ result: 'ok' }, ok],
      [{ result: 'failed' }, failed],
    ];
  });
}

/** Registers meshcap_broker_* metrics for a broker sink (call once, after creating the sink). */
export function registerBrokerMetrics(registry: client.Registry, sink: BrokerSink): void {
  const lanes = () => sink.lanes;
  const perLane = (f: (l: BrokerSink['lanes'][number]) => number): Array<[Labels, number]> => lanes().map((l) => [{ lane: l.label }, f(l)]);
  const perEndpoint = (f: (c: BrokerSink['lanes'][number]['endpointCounters'] extends Map<string, infer V> ? V : never) => number): Array<[Labels, number]> => {
    const out: Array<[Labels, number]> = [];
    for (const l of lanes()) for (const [broker, c] of l.endpointCounters) out.push([{ broker }, f(c)]);
    return out;
  };

  gauge(registry, 'meshcap_broker_connected', '1 while a TLS connection to this broker is established.', ['broker'], () => perEndpoint((c) => (c.connected ? 1 : 0)));
  counter(registry, 'meshcap_broker_connections_total', 'TLS connections to this broker established.', ['broker'], () => perEndpoint((c) => c.connections));
  counter(registry, 'meshcap_broker_disconnects_total', 'Established connections to this broker that were lost.', ['broker'], () => perEndpoint((c) => c.disconnects));
  counter(
    registry,
    'meshcap_broker_connect_failures_total',
    'Connection attempts that failed, by broker and reason (refused, timeout, unreachable, broker_identity_mismatch, broker_cert_untrusted, broker_cert_expired, rejected_by_broker, tls_error, protocol, closed, other).',
    ['broker', 'reason'],
    () => {
      const out: Array<[Labels, number]> = [];
      for (const l of lanes()) for (const [broker, c] of l.endpointCounters) for (const [reason, n] of c.failures) out.push([{ broker, reason }, n]);
      return out;
    },
  );
  counter(registry, 'meshcap_broker_accepted_packets_total', 'Packets the broker sink took from the pipeline (queued for delivery).', ['lane'], () => perLane((l) => l.acceptedPackets));
  counter(registry, 'meshcap_broker_sent_packets_total', 'Packets sent to brokers for the first time.', ['lane'], () => perLane((l) => l.sentPackets));
  counter(registry, 'meshcap_broker_resent_packets_total', 'Packets sent again after a broken connection (unacknowledged, or within the replay window of a plain broker).', ['lane'], () => perLane((l) => l.resentPackets));
  counter(registry, 'meshcap_broker_sent_bytes_total', 'Capture bytes sent to brokers (records; headers and framing excluded), resends included.', ['lane'], () => perLane((l) => l.sentBytes));
  counter(registry, 'meshcap_broker_delivered_packets_total', 'Packets acknowledged by meshcap collect, or presumed delivered to a plain broker (beyond the replay window, or confirmed by a graceful close).', ['lane'], () => perLane((l) => l.deliveredPackets));
  counter(registry, 'meshcap_broker_dropped_packets_total', 'Packets the broker sink dropped (queue and spool full, spool disk slow or failing); also in meshcap_dropped_packets_total.', ['lane'], () => perLane((l) => l.droppedPackets));
  gauge(registry, 'meshcap_broker_queue_bytes', 'Bytes waiting in memory to be sent (resends included).', ['lane'], () => perLane((l) => l.queuedBytes));
  gauge(registry, 'meshcap_broker_unconfirmed_bytes', 'Bytes sent and not yet acknowledged / presumed delivered (kept for resending).', ['lane'], () => perLane((l) => l.inflightBytes));
  gauge(registry, 'meshcap_broker_spool_bytes', 'Bytes in the on-disk spool.', ['lane'], () => perLane((l) => l.spool?.bytes ?? 0));
  gauge(registry, 'meshcap_broker_spool_packets', 'Packets in the on-disk spool not yet delivered.', ['lane'], () => perLane((l) => l.spool?.records ?? 0));
  gauge(registry, 'meshcap_broker_spool_max_bytes', 'Spool cap.', ['lane'], () => perLane((l) => l.spool?.opts.maxBytes ?? 0));
  gauge(registry, 'meshcap_broker_undelivered_packets', 'Packets accepted and not yet delivered (queued, spooled or unconfirmed).', ['lane'], () => perLane((l) => l.nextSeq - l.ackedSeq));
  tlsMetrics(registry, 'meshcap_broker', () => [sink.opts.tls]);
}

/** Registers meshcap_collect_* metrics for `meshcap collect`. */
export function registerCollectMetrics(registry: client.Registry, collector: Collector): void {
  const c = collector.counters;
  const one = (v: () => number) => (): Array<[Labels, number]> => [[{}, v()]];
  counter(registry, 'meshcap_collect_connections_total', 'Sidecar connections accepted (TLS verified and SPIFFE ID allowed).', [], one(() => c.connections));
  gauge(registry, 'meshcap_collect_connections_active', 'Sidecar connections open now.', [], one(() => c.active));
  gauge(registry, 'meshcap_collect_streams', 'Sidecar streams known since start.', [], one(() => collector.streamCount));
  counter(
    registry,
    'meshcap_collect_rejected_total',
    'Connections refused, by reason (not_allowed, no_spiffe_id, client_cert_untrusted, client_cert_expired, no_client_cert, tls_version, tls_handshake, too_many_connections, shutting_down).',
    ['reason'],
    () => [...c.rejected].map(([reason, n]) => [{ reason }, n] as [Labels, number]),
  );
  counter(registry, 'meshcap_collect_packets_total', 'Packets written to captures.', [], one(() => c.packets));
  counter(registry, 'meshcap_collect_written_bytes_total', 'Record bytes written to captures.', [], one(() => c.bytes));
  counter(registry, 'meshcap_collect_duplicate_packets_total', 'Packets a sidecar resent that were written already (skipped).', [], one(() => c.duplicates));
  counter(registry, 'meshcap_collect_gap_packets_total', 'Packets missing in a sidecar stream (dropped by the sidecar, or lost when it stopped uncleanly).', [], one(() => c.gaps));
  counter(registry, 'meshcap_collect_files_completed_total', 'Capture files completed.', [], one(() => c.filesCompleted));
  counter(registry, 'meshcap_collect_protocol_errors_total', 'Connections closed for a protocol error.', [], one(() => c.protocolErrors));
  counter(registry, 'meshcap_collect_write_errors_total', 'Capture writes that failed (the sidecar resends).', [], one(() => c.writeErrors));
  tlsMetrics(registry, 'meshcap_collect', () => [collector.opts.tls]);
}
