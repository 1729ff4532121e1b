/**
 * `meshcap convert FILE... -w OUT`: Envoy file_per_tap outputs (and recorded StreamTaps bodies)
 * into one capture, events merged across files in time order.
 */
import { ConfigError, parseFlags, usage } from '../config.js';
import { createLogger } from '../control/logger.js';
import { PipelineStats } from '../control/stats.js';
import { framerFor, type CaptureFormat } from '../format/index.js';
import { newTapEvent, type IngestErrorReason, type StreamIdentity, type TapEvent, type TapEventHandler } from '../ingest/tap-event.js';
import { TAP_FILE_FORMATS, detectTapFileFormat, readTapFile, type TapFileFormat } from '../ingest/tap-file.js';
import { DEFAULT_PIPELINE, Pipeline } from '../pipeline.js';
import { FileSink } from '../sink/file-sink.js';

const OPTIONS = [
  { name: 'write', short: 'w', kind: 'string' as const, help: 'output capture file' },
  { name: 'format', kind: 'string' as const, help: 'pcapng (default), pcap or pcap-ns' },
  { name: 'input-format', kind: 'string' as const, help: `input format, instead of guessing from the name: ${TAP_FILE_FORMATS.join(', ')}` },
  { name: 'mss', kind: 'int' as const, help: 'segment size for IPv4 flows (default 1460; IPv6: 20 less)' },
  { name: 'snaplen', short: 's', kind: 'int' as const, help: 'bytes kept of each frame (default 262144)' },
  { name: 'log-level', kind: 'string' as const, help: 'log level (default warn)' },
];

export const CONVERT_USAGE = `Usage: meshcap convert FILE... -w OUT [options]

${usage(OPTIONS)}
`;

/** Keeps every event (payload views into the file buffers) so all files can be merged by time. */
class Collector implements TapEventHandler {
  readonly events: Array<{ stream: StreamIdentity; ev: TapEvent; order: number }> = [];
  errors = 0;
  constructor(private readonly sink: TapEventHandler) {}
  onEvent(stream: StreamIdentity, ev: TapEvent): void {
    const copy = Object.assign(newTapEvent(), ev);
    if (ev.connection) copy.connection = ev.connection;
    this.events.push({ stream, ev: copy, order: this.events.length });
  }
  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void {
    this.errors++;
    this.sink.onIngestError(stream, reason, detail);
  }
  onIngestMessage(source: string, bytes: number): void {
    this.sink.onIngestMessage(source, bytes);
  }
}

export async function convert(argv: string[]): Promise<number> {
  const flags = parseFlags(argv, OPTIONS, true);
  const files = flags._;
  const out = flags.write as string | undefined;
  if (!out || files.length === 0) throw new ConfigError(`convert needs input files and -w OUT\n\n${CONVERT_USAGE}`);
  const format = (flags.format as string | undefined) ?? 'pcapng';
  if (!['pcapng', 'pcap', 'pcap-ns'].includes(format)) throw new ConfigError(`"format": must be pcapng, pcap or pcap-ns, got "${format}"`);
  const inputFormat = flags['input-format'] as string | undefined;
  if (inputFormat && !(TAP_FILE_FORMATS as readonly string[]).includes(inputFormat)) throw new ConfigError(`"input-format": must be one of ${TAP_FILE_FORMATS.join(', ')}, got "${inputFormat}"`);
  const mss = intFlag(flags.mss, 'mss', 88, 65495) ?? 1460;
  const snaplen = intFlag(flags.snaplen, 'snaplen', 0, 262144) || 262144;
  const log = createLogger((flags['log-level'] as string | undefined) ?? 'warn');
  const stats = new PipelineStats();
  const framer = framerFor(format as CaptureFormat);
  const pipeline = new Pipeline({ ...DEFAULT_PIPELINE, framer, snaplen, mss4: mss, mss6: Math.max(68, mss - 20), blockCount: 4 }, stats, log);
  // One-shot: the sink may hold every block but one; nothing here can outrun the disk.
  const sink = new FileSink({ path: out, framer, snaplen, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 64 }, stats, log);
  pipeline.addSink(sink);

  const collector = new Collector(pipeline);
  for (const file of files) {
    const fmt = (inputFormat as TapFileFormat | undefined) ?? detectTapFileFormat(file);
    if (!fmt) throw new ConfigError(`${file}: cannot tell the tap format from the name; use --input-format (${TAP_FILE_FORMATS.join(', ')})`);
    try {
      readTapFile(file, fmt, collector, 256 * 1024 * 1024);
    } catch (err) {
      process.stderr.write(`meshcap convert: ${file}: ${(err as Error).message}\n`);
      return 1;
    }
  }
  // Events without a timestamp take the previous event's, so the sort keeps them in place.
  let prevSec = 0;
  let prevNsec = 0;
  for (const { ev } of collector.events) {
    if (ev.hasTimestamp || ev.kind === 0) {
      if (ev.hasTimestamp) (prevSec = ev.tsSec), (prevNsec = ev.tsNsec);
    } else {
      ev.tsSec = prevSec;
      ev.tsNsec = prevNsec;
    }
  }
  collector.events.sort((a, b) => a.ev.tsSec - b.ev.tsSec || a.ev.tsNsec - b.ev.tsNsec || a.order - b.order);
  // Unlike serve, conversion may wait for the disk: replay yields whenever the sinks hold all
  // but one block, so nothing is dropped however large the input.
  const progress = new Progress(collector.events.length);
  let n = 0;
  for (const { stream, ev } of collector.events) {
    while (pipeline.freeBlocks < 1) await new Promise((resolve) => setImmediate(resolve));
    pipeline.onEvent(stream, ev);
    if ((++n & 1023) === 0) progress.update(n);
  }
  progress.done();
  await pipeline.close();
  // Flows still open at the end of the input stay open in the capture (no invented teardown).
  process.stderr.write(`meshcap convert: ${files.length} file(s), ${stats.flowsOpened} connection(s), ${sink.packetsWritten} packets → ${out}` + (collector.errors ? `, ${collector.errors} input error(s)` : '') + '\n');
  return collector.errors > 0 ? 1 : 0;
}

/** A one-line progress report on a terminal, for inputs that take more than a moment. */
class Progress {
  private readonly tty = process.stderr.isTTY === true;
  private readonly start = Date.now();
  private last = 0;
  constructor(private readonly total: number) {}
  update(n: number): void {
    const now = Date.now();
    if (!this.tty || now - this.last < 250 || now - this.start < 1000) return;
    this.last = now;
    process.stderr.write(`\rmeshcap convert: ${n}/${this.total} events (${Math.floor((100 * n) / this.total)}%)`);
  }
  done(): void {
    if (this.tty && this.last) process.stderr.write('\r\x1b[K');
  }
}

function intFlag(v: unknown, name: string, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new ConfigError(`"${name}": must be an integer between ${min} and ${max}, got "${String(v)}"`);
  return n;
}
