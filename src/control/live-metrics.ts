/**
 * Prometheus metrics of the live endpoint (meshcap_live_*), read from the LiveServer's counters at
 * scrape time, like metrics.ts does for the pipeline:
 *
 *   meshcap_live_viewers{protocol}                    viewers connected now (tls, wss, pcap-over-ip)
 *   meshcap_live_viewers_connected_total{protocol}    sessions accepted
 *   meshcap_live_viewers_disconnected_total{reason}   sessions ended: client_closed, slow, shutdown, error
 *   meshcap_live_viewers_refused_total{reason}        attempts refused: no_token, bad_token,
 *                                                     no_client_cert, bad_client_cert, bad_filter, ...
 *   meshcap_live_sent_bytes_total                     bytes handed to viewer connections
 *   meshcap_live_sent_packets_total                   packets handed to viewer connections
 *   meshcap_live_buffered_bytes                       bytes queued to viewers now
 */
import client from 'prom-client';
import type { LiveServer } from '../sink/live-server.js';

/** Registers the live metrics on `registry` (the one createMetrics returned). */
export function registerLiveMetrics(registry: client.Registry, live: LiveServer): void {
  const byLabel = <K extends string>(name: string, help: string, label: string, map: () => Map<K, number>, kind: 'counter' | 'gauge'): void => {
    const Ctor = kind === 'counter' ? client.Counter : client.Gauge;
    new Ctor({
      name,
      help,
      labelNames: [label],
      registers: [registry],
      collect(this: client.Counter | client.Gauge) {
        this.reset();
        for (const [k, v] of map()) {
          if (this instanceof client.Gauge) this.set({ [label]: k }, v);
          else this.inc({ [label]: k }, v);
        }
      },
    });
  };
  byLabel('meshcap_live_viewers', 'Live viewers connected now, by protocol (tls, wss, pcap-over-ip).', 'protocol', () => live.viewersByProtocol(), 'gauge');
  byLabel('meshcap_live_viewers_connected_total', 'Live viewer sessions accepted, by protocol.', 'protocol', () => live.counters.connected, 'counter');
  byLabel(
    'meshcap_live_viewers_disconnected_total',
    'Live viewer sessions ended, by reason (client_closed, slow: buffer limit reached, shutdown, error).',
    'reason',
    () => live.counters.disconnected,
    'counter',
  );
  byLabel('meshcap_live_viewers_refused_total', 'Live viewer connections refused, by reason (no_token, bad_token, bad_client_cert, ...).', 'reason', () => live.counters.refused, 'counter');
  new client.Counter({
    name: 'meshcap_live_sent_bytes_total',
    help: 'Bytes handed to live viewer connections (stream headers included).',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(live.counters.sentBytes);
    },
  });
  new client.Counter({
    name: 'meshcap_live_sent_packets_total',
    help: 'Packets handed to live viewer connections (a packet sent to two viewers counts twice).',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(live.counters.sentPackets);
    },
  });
  new client.Gauge({
    name: 'meshcap_live_buffered_bytes',
    help: 'Bytes queued to live viewers and not yet sent.',
    registers: [registry],
    collect() {
      this.set(live.bufferedBytes());
    },
  });
}
