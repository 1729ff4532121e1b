/**
 * `meshcap serve`: the sidecar. Listens for Envoy tap streams, writes captures, serves metrics,
 * and on SIGTERM/SIGINT flushes and closes everything within 5 s, exiting 0.
 */
import path from 'node:path';
import { loadServeConfig, SERVE_OPTIONS, type ServeConfig } from '../config.js';
import { ConfigError, usage } from '../flags.js';
import { ControlServer } from '../control/http-server.js';
import { createLogger } from '../control/logger.js';
import { createMetrics } from '../control/metrics.js';
import { registerLiveMetrics } from '../control/live-metrics.js';
import { registerBrokerMetrics } from '../control/broker-metrics.js';
import { TlsFilesError } from '../control/tls-files.js';
import { createBrokerSink, type BrokerSink } from '../sink/broker-sink.js';
import { SpoolLockedError } from '../sink/spool.js';
import { PipelineStats } from '../control/stats.js';
import { framerFor } from '../format/index.js';
import { AdminTapClient } from '../ingest/admin-tap-client.js';
import { GrpcTapServer } from '../ingest/grpc-tap-server.js';
import { H2TapServer } from '../ingest/h2-tap-server.js';
import { TapDirWatcher } from '../ingest/tap-dir-watcher.js';
import { UdpTapListener } from '../ingest/udp-tap-listener.js';
import { Pipeline } from '../pipeline.js';
import { FileSink } from '../sink/file-sink.js';
import { createLiveSink, type LiveServer } from '../sink/live-server.js';

export const SERVE_USAGE = `Usage: meshcap serve [options]

With no options: listens on unix:./meshcap.sock, writes ./captures/meshcap.pcapng,
serves metrics on 127.0.0.1:9464. Every option can also be set in a JSON --config
file (same names) or as MESHCAP_<NAME> in the environment (e.g. MESHCAP_GRPC_LISTEN).

${usage(SERVE_OPTIONS)}
`;

const BLOCK_BYTES = 1024 * 1024;
const SHUTDOWN_DEADLINE_MS = 4500;

export async function serve(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(SERVE_USAGE);
    return 0;
  }
  const cfg = loadServeConfig(argv, process.env, process.cwd());
  const log = createLogger(cfg.logLevel);
  const stats = new PipelineStats();
  const framer = framerFor(cfg.format);
  const pipeline = new Pipeline(
    {
      framer,
      snaplen: cfg.snaplen,
      mss4: cfg.mss,
      mss6: cfg.mss6,
      blockSize: BLOCK_BYTES,
      blockCount: Math.max(4, cfg.bufferMiB),
      flushIntervalMs: cfg.flushIntervalMs,
      idleTimeoutMs: cfg.idleTimeoutSec * 1000,
      maxFlows: cfg.maxFlows,
    },
    stats,
    log,
  );

  // Live viewers start first: a bad certificate or token file stops meshcap before any file is made.
  let live: LiveServer | null = null;
  if (cfg.live.listen || cfg.live.insecureLoopback) {
    live = createLiveSink(
      {
        listen: cfg.live.listen,
        certFile: cfg.live.cert,
        keyFile: cfg.live.key,
        caFile: cfg.live.ca,
        tokenFile: cfg.live.tokenFile,
        authMode: cfg.live.authMode,
        insecureLoopback: cfg.live.insecureLoopback,
        viewerBufferBytes: cfg.live.viewerBufferMiB * 1024 * 1024,
        maxViewers: cfg.live.maxViewers,
        snaplen: cfg.snaplen,
        flowInfo: (id) => pipeline.flows.flowInfo(id),
      },
      log,
    );
    try {
      await live.start();
    } catch (err) {
      throw new ConfigError((err as Error).message);
    }
  }

  let shutdown: (why: string) => void = () => {};
  const fileSink = new FileSink(
    {
      path: cfg.write,
      framer,
      snaplen: cfg.snaplen,
      maxFileBytes: cfg.fileSizeMB * 1_000_000,
      rotateSeconds: cfg.rotateSeconds,
      ringFiles: cfg.ring,
      maxFiles: cfg.autostop.files,
      // Half the buffer may wait for the disk; beyond that blocks are dropped and counted.
      maxQueuedBlocks: Math.max(2, Math.floor(cfg.bufferMiB / 2)),
      onAutostop: (why) => shutdown(`autostop ${why}`),
    },
    stats,
    log,
  );
  // The capture file exists before the first tap stream is accepted.
  await fileSink.ready;
  pipeline.addSink(fileSink);
  if (live) pipeline.addSink(live);
  let broker: BrokerSink | null = null;
  if (cfg.broker) {
    try {
      broker = createBrokerSink(cfg.broker, cfg.snaplen, stats, log);
    } catch (err) {
      if (err instanceof TlsFilesError || err instanceof SpoolLockedError) throw new ConfigError(err.message);
      throw err;
    }
    pipeline.addSink(broker);
  }

  const metrics = createMetrics(stats, () => [fileSink, ...(live ? [live] : []), ...(broker ? [broker] : [])]);
  if (live) registerLiveMetrics(metrics, live);
  if (broker) registerBrokerMetrics(metrics, broker);
  const control = cfg.metricsListen ? new ControlServer(metrics) : null;
  if (control && cfg.metricsListen) await control.listen(cfg.metricsListen);

  // The experimental node:http2 door replaces grpc-js's when asked for (README, Performance).
  const grpc = new (process.env.MESHCAP_INGEST_H2 === '1' ? H2TapServer : GrpcTapServer)({ listen: cfg.grpcListen, maxMessageBytes: cfg.maxMessageBytes }, pipeline, stats, log);
  await grpc.start();
  // Doors for stock Envoy: admin /tap clients, UDP sink listeners, file_per_tap directories.
  const udps = cfg.udpListen.map((listen) => new UdpTapListener({ listen }, pipeline, log));
  for (const u of udps) await u.start();
  const watchers = cfg.watch.map((dir) => new TapDirWatcher({ dir, maxMessageBytes: cfg.maxMessageBytes }, pipeline, log));
  const admins = cfg.envoyAdmin.flatMap((adminUrl) =>
    cfg.tapConfigIds.map(
      (configId) =>
        new AdminTapClient(
          { adminUrl, configId, maxBufferedBytes: cfg.adminMaxBufferedBytes, maxObjectBytes: Math.max(cfg.maxMessageBytes, 3 * cfg.adminMaxBufferedBytes) },
          pipeline,
          log,
        ),
    ),
  );
  if (cfg.tapConfigIds.length > 1) {
    log.warn({ config_ids: cfg.tapConfigIds }, 'Envoy allows one attached /tap stream per process: several config ids on one Envoy take turns at best; give the tapped sockets one shared config_id');
  }
  broker?.start();
  pipeline.start();
  for (const w of watchers) await w.start();
  for (const a of admins) a.start();
  if (control) control.ready = true;
  log.info(
    {
      grpc_listen: grpc.bound,
      envoy_admin: admins.map((a) => `${a.url.origin} config_id=${a.configId}`),
      udp_listen: udps.map((u) => u.address),
      watch: watchers.map((w) => w.dir),
      live: live ? liveAddresses(live) : 'off',
      brokers: broker ? broker.opts.brokers.map((b) => b.label) : 'off',
      write: cfg.write === '-' ? 'stdout' : path.resolve(cfg.write),
      format: cfg.format,
      metrics: control ? `http://${control.address}/metrics` : 'off',
    },
    `meshcap serving: tap sink on ${[...grpc.bound, ...udps.map((u) => `udp:${u.address}`)].join(', ')}` +
      (admins.length ? `; attaching to Envoy admin ${admins.map((a) => `${a.url.origin} (config_id ${a.configId})`).join(', ')}` : '') +
      (watchers.length ? `; watching ${watchers.map((w) => w.dir).join(', ')}` : '') +
      `; writing ${cfg.write === '-' ? 'standard output' : path.resolve(cfg.write)}`,
  );
  logLimits(cfg, log);

  return await new Promise<number>((resolve) => {
    let stopping = false;
    shutdown = (why: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'shutting down: flushing captures');
      const deadline = setTimeout(() => {
        log.error('shutdown took longer than 5 s; exiting with what is written');
        resolve(1);
      }, SHUTDOWN_DEADLINE_MS);
      deadline.unref();
      void (async () => {
        await Promise.all([...admins.map((a) => a.stop()), ...udps.map((u) => u.stop()), ...watchers.map((w) => w.stop())]);
        await grpc.stop(500);
        await pipeline.close();
        if (control) await control.close();
        clearTimeout(deadline);
        log.info({ packets: stats.packets, flows: stats.flowsOpened, dropped: stats.totalDrops() }, 'meshcap stopped');
        log.flush();
        resolve(0);
      })();
    };
    process.once('SIGTERM', () => shutdown('SIGTERM'));
    process.once('SIGINT', () => shutdown('SIGINT'));
    if (cfg.autostop.durationSec) setTimeout(() => shutdown(`autostop duration:${cfg.autostop.durationSec}`), cfg.autostop.durationSec * 1000).unref();
    if (cfg.autostop.packets) {
      const t = setInterval(() => {
        if (fileSink.packetsWritten >= cfg.autostop.packets) {
          clearInterval(t);
          shutdown(`autostop packets:${cfg.autostop.packets}`);
        }
      }, 100);
      t.unref();
    }
  });
}

function liveAddresses(live: LiveServer): string[] {
  const { tls, insecure } = live.addresses;
  const out: string[] = [];
  if (tls) out.push(`tls://${tls.address}:${tls.port} (and wss://…/live)`);
  if (insecure) out.push(`pcap-over-ip (UNAUTHENTICATED) ${insecure.address}:${insecure.port}`);
  return out;
}

function logLimits(cfg: ServeConfig, log: ReturnType<typeof createLogger>): void {
  log.debug({ mss: cfg.mss, mss6: cfg.mss6, snaplen: cfg.snaplen, flush_interval_ms: cfg.flushIntervalMs, idle_timeout_s: cfg.idleTimeoutSec, max_flows: cfg.maxFlows }, 'limits');
}
