/**
 * `meshcap convert FILE... -w OUT`: Envoy file_per_tap outputs (and recorded StreamTaps bodies)
 * into one capture, events merged across files in time order.
 */
import { ConfigError, parseFlags, usage } from '../flags.js';
import { createLogger } from '../control/logger.js';
import { PipelineStats } from '../control/stats.js';
import { framerFor, type CaptureFormat } from '../format/index.js';
import type { IngestErrorReason, StreamIdentity, TapEvent, TapEventHandler } from '../ingest/tap-event.js';
import { TAP_FILE_FORMATS, detectTapFileFormat, type TapFileFormat } from '../ingest/tap-file.js';
import { loadTextFormats, needsTextFormats } from '../ingest/tap-file-source.js';
import { DEFAULT_MERGE, TapFileError, TapMerge } from '../ingest/tap-merge.js';
import type { Block } from '../packet/block.js';
import { DEFAULT_PIPELINE, Pipeline } from '../pipeline.js';
import { FileSink } from '../sink/file-sink.js';
import type { BlockSink } from '../sink/sink.js';

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

/**
 * Output blocks, of the pipeline's 4 MiB: slicing fills one while the file sink's writev of the
 * others runs on the libuv thread. More blocks (or more, smaller ones) measured no faster: the
 * disk takes what it takes, and every block is touched when the pool is made (start-up).
 */
const BLOCK_COUNT = 4;

/** Counts input errors (the exit code) and passes everything to the pipeline. */
class ErrorCounter implements TapEventHandler {
  errors = 0;
  constructor(private readonly sink: TapEventHandler) {}
  onEvent(stream: StreamIdentity, ev: TapEvent): void {
    this.sink.onEvent(stream, ev);
  }
  onIngestError(stream: StreamIdentity | null, reason: IngestErrorReason, detail: string): void {
    this.errors++;
    this.sink.onIngestError(stream, reason, detail);
  }
  onIngestMessage(source: string, bytes: number): void {
    this.sink.onIngestMessage(source, bytes);
  }
}

/**
 * The file sink, plus a promise that settles when it hands a block back, so that conversion waits
 * for the disk without polling (a setImmediate loop would spin a core the writer thread needs).
 */
class WaitableSink implements BlockSink {
  readonly name: string;
  private wake: (() => void) | null = null;
  private readonly released = (release: (b: Block) => void, b: Block): void => {
    release(b);
    const wake = this.wake;
    this.wake = null;
    wake?.();
  };
  constructor(private readonly inner: BlockSink) {
    this.name = inner.name;
  }
  write(block: Block, release: (b: Block) => void): void {
    this.inner.write(block, (b) => this.released(release, b));
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  nextBlockLead(): number {
    return this.inner.nextBlockLead?.() ?? 0;
  }
  /** Settles at the next block handed back. */
  blockReleased(): Promise<void> {
    return new Promise((resolve) => (this.wake = resolve));
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
  const popts = { ...DEFAULT_PIPELINE, framer, snaplen, mss4: mss, mss6: Math.max(68, mss - 20), blockCount: BLOCK_COUNT, prefault: false };
  const pipeline = new Pipeline(popts, stats, log);
  // The files are merged in time order as they are read (each file is in time order within
  // itself), so memory stays bounded whatever the input size. Each file's first batch is read
  // when it is added, in the order given, so an unknown format (a usage error) or an unreadable
  // file stops the conversion before anything is converted or written, as when files were read whole.
  const counter = new ErrorCounter(pipeline);
  const merge = new TapMerge(files.length, counter, DEFAULT_MERGE);
  for (const file of files) {
    const fmt = (inputFormat as TapFileFormat | undefined) ?? detectTapFileFormat(file);
    if (!fmt) throw new ConfigError(`${file}: cannot tell the tap format from the name; use --input-format (${TAP_FILE_FORMATS.join(', ')})`);
    if (needsTextFormats(fmt)) await loadTextFormats();
    try {
      merge.add(file, fmt);
    } catch (err) {
      if (!(err instanceof TapFileError)) throw err;
      process.stderr.write(`meshcap convert: ${file}: ${err.message}\n`);
      return 1;
    }
  }

  // The output is created only now that every input could be opened: a conversion that fails
  // before it starts leaves no file behind. One-shot: the sink may hold every block but one;
  // nothing here can outrun the disk.
  const fileSink = new FileSink({ path: out, framer, snaplen, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 64 }, stats, log);
  const sink = new WaitableSink(fileSink);
  pipeline.addSink(sink);

  // Unlike serve, conversion may wait for the disk: before each event there is room for all of
  // its frames, so nothing is dropped.
  const minMss = Math.min(popts.mss4, popts.mss6);
  const progress = new Progress(merge.totalBytes());
  let n = 0;
  try {
    for (let r = merge.next(); r !== null; r = merge.next()) {
      const ev = r.peek();
      const need = blocksFor(ev, minMss, popts.blockSize, popts.blockCount);
      while (pipeline.freeBlocks < need) await sink.blockReleased();
      pipeline.onEvent(r.stream, ev);
      if ((++n & 1023) === 0) progress.update(n, merge);
    }
  } catch (err) {
    if (!(err instanceof TapFileError)) throw err;
    progress.done();
    process.stderr.write(`meshcap convert: ${err.file}: ${err.message}\n`);
    return 1;
  }
  progress.done();
  await pipeline.close();
  // Flows still open at the end of the input stay open in the capture (no invented teardown).
  process.stderr.write(`meshcap convert: ${files.length} file(s), ${stats.flowsOpened} connection(s), ${fileSink.packetsWritten} packets → ${out}` + (counter.errors ? `, ${counter.errors} input error(s)` : '') + '\n');
  return counter.errors > 0 ? 1 : 0;
}

/** Frames, headers and record framing of an event: at most one segment per MSS, plus teardown and comments. */
const FRAME_OVERHEAD = 160;

/** Free blocks an event may need (never more than the pool can hold besides the current block). */
function blocksFor(ev: TapEvent, minMss: number, blockSize: number, blockCount: number): number {
  const len = ev.payload ? ev.payload.length : 0;
  const bytes = len + (Math.ceil(len / minMss) + 8) * FRAME_OVERHEAD + 4096;
  return Math.min(blockCount - 1, Math.ceil(bytes / blockSize));
}

/** A one-line progress report on a terminal, for inputs that take more than a moment. */
class Progress {
  private readonly tty = process.stderr.isTTY === true;
  private readonly start = Date.now();
  private last = 0;
  constructor(private readonly totalBytes: number) {}
  update(events: number, merge: TapMerge): void {
    if (!this.tty) return;
    const now = Date.now();
    if (now - this.last < 250 || now - this.start < 1000) return;
    this.last = now;
    const read = Math.min(merge.consumed(), this.totalBytes);
    const pct = this.totalBytes > 0 ? Math.floor((100 * read) / this.totalBytes) : 100;
    process.stderr.write(`\rmeshcap convert: ${events} events, ${mb(read)}/${mb(this.totalBytes)} MB read (${pct}%)`);
  }
  done(): void {
    if (this.tty && this.last) process.stderr.write('\r\x1b[K');
  }
}

const mb = (bytes: number): string => (bytes / 1e6).toFixed(0);

function intFlag(v: unknown, name: string, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new ConfigError(`"${name}": must be an integer between ${min} and ${max}, got "${String(v)}"`);
  return n;
}
