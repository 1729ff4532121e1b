/**
 * Tap files read in bounded pieces: a MessageSource hands out the file's messages one at a time
 * (binary TraceWrappers, or StreamTapsRequests for recorded gRPC bodies) from memory refilled in
 * chunks, so a file of any size costs a chunk of memory plus its largest message, never its size.
 *
 *   pb_length_delimited, grpc   framed binary: views into one reused chunk buffer (no copy), and
 *                               seekable: a position is a byte offset at a message boundary.
 *   pb                          one message, the whole file (Envoy's buffered traces).
 *   json                        split as it streams in; each object becomes a fresh binary message.
 *   pb_text                     parsed whole (the text parser is not incremental): a debugging
 *                               format, written by Envoy for small traces.
 *
 * Messages returned by next() stay valid until the following refill() (which reuses the chunk),
 * so a caller drains every message of a load before asking for the next one. The file is read as
 * it was when first opened (its size then), as a whole-file read would, and no descriptor is held
 * between loads.
 *
 * Framing problems are reported through `onError` with the same reasons and wording as before
 * streaming; after one the rest of the file is abandoned where the framing cannot be recovered.
 */
import fs from 'node:fs';
import { ConcatJsonSplitter } from './json-stream.js';
import type { IngestErrorReason } from './tap-event.js';
import type { TapFileFormat } from './tap-file.js';
import type { parseTextTraces } from './textproto.js';
import type { jsonTraceToBinary } from './trace-json.js';
import { WireReader } from './wire-reader.js';

export type FramingErrorHandler = (reason: IngestErrorReason, detail: string) => void;

/**
 * The JSON and text converters stand on protobufjs reflection, tens of milliseconds to load:
 * binary inputs, the usual and the big ones, do without. Load them before opening such a file.
 */
let text: { parseTextTraces: typeof parseTextTraces; jsonTraceToBinary: typeof jsonTraceToBinary } | null = null;

export async function loadTextFormats(): Promise<void> {
  if (text) return;
  const [t, j] = await Promise.all([import('./textproto.js'), import('./trace-json.js')]);
  text = { parseTextTraces: t.parseTextTraces, jsonTraceToBinary: j.jsonTraceToBinary };
}

export function needsTextFormats(format: TapFileFormat): boolean {
  return format === 'json' || format === 'pb_text';
}

function converters(): NonNullable<typeof text> {
  if (!text) throw new Error('JSON and text tap formats: call loadTextFormats() first');
  return text;
}

export interface MessageSource {
  /**
   * Where the next message starts: a byte offset for the seekable (binary) formats, the number of
   * messages returned so far for the others. Only ever grows, except through seek().
   */
  readonly position: number;
  /** Whether seek() accepts any position this source has reported (otherwise only 0). */
  readonly seekable: boolean;
  /** Bytes of memory held (buffers and decoded messages not yet returned). */
  readonly memory: number;
  /** Input bytes consumed so far, and the file's size once known (-1 before), for progress. */
  readonly consumed: number;
  readonly size: number;
  /** The next whole message already in memory, or null: call refill(). */
  next(): Buffer | null;
  /**
   * Loads more of the file; invalidates the messages returned so far. Returns false when nothing
   * more will come: the end of the file (after reporting an incomplete tail) or `limit` (a
   * position, seekable sources only).
   */
  refill(limit?: number): boolean;
  /** Starts again at `position` (one this source reported; 0 for non-seekable sources), memory dropped. */
  seek(position: number): void;
  /** Drops its memory; the next refill() goes on where it stopped. */
  release(): void;
}

/**
 * Reused chunk buffers of one size, so parking and resuming files does not fault in new memory;
 * smaller buffers (the whole of a small file) are cut from shared slabs, so that thousands of
 * small files are not thousands of ArrayBuffers for the garbage collector.
 */
export class ChunkPool {
  private readonly free: Buffer[] = [];
  private slab: Buffer | null = null;
  private slabUsed = 0;
  constructor(
    readonly chunkBytes: number,
    private readonly keep: number,
  ) {}
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.chunkBytes);
  }
  /** A buffer of `n` bytes (less than a chunk). */
  small(n: number): Buffer {
    if (n > SLAB_BYTES / 8) return Buffer.allocUnsafeSlow(n);
    if (this.slab === null || this.slabUsed + n > SLAB_BYTES) {
      this.slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.slabUsed = 0;
    }
    const b = this.slab.subarray(this.slabUsed, this.slabUsed + n);
    this.slabUsed = (this.slabUsed + n + 7) & ~7;
    return b;
  }
  give(buf: Buffer): void {
    if (buf.length === this.chunkBytes && this.free.length < this.keep) this.free.push(buf);
  }
}

const SLAB_BYTES = 256 * 1024;

/**
 * A window onto a file: [base, base + end) of the file is in `buf`, `start` is the next unparsed
 * byte. Each load opens the file, reads at its offset and closes it again, so any number of files
 * can be in progress without holding descriptors (an open costs microseconds; a load is a chunk).
 */
class FileWindow {
  buf: Buffer | null = null;
  /** File offset of buf[0]. */
  base = 0;
  start = 0;
  end = 0;
  /** File size when first opened (-1: not yet): the file is read as it was then. */
  size = -1;

  constructor(
    readonly file: string,
    private readonly pool: ChunkPool,
  ) {}

  get position(): number {
    return this.base + this.start;
  }

  get available(): number {
    return this.end - this.start;
  }

  /**
   * Keeps the unparsed bytes, makes room for at least `need` bytes from `position`, and reads
   * up to a chunk (never past `limit` or the file size). Returns the bytes read (0: nothing left).
   * The first load learns the file's size (the file is read as it was then).
   */
  load(need: number, limit: number): number {
    if (this.size >= 0 && this.position >= Math.min(limit, this.size)) return 0;
    const fd = fs.openSync(this.file, 'r');
    try {
      if (this.size < 0) this.size = fs.fstatSync(fd).size;
      const stop = Math.min(limit, this.size);
      const pos = this.position;
      if (pos >= stop) return 0;
      const keep = this.available;
      // A chunk; less when less is left (a small file costs its size); more for one big message.
      const want = Math.max(need, Math.min(this.pool.chunkBytes, stop - pos));
      let buf = this.buf;
      if (buf === null || buf.length < want) {
        const fresh = want === this.pool.chunkBytes ? this.pool.take() : want < this.pool.chunkBytes ? this.pool.small(want) : Buffer.allocUnsafeSlow(want);
        if (buf !== null) {
          buf.copy(fresh, 0, this.start, this.end);
          this.pool.give(buf);
        }
        buf = this.buf = fresh;
      } else if (keep > 0 && this.start > 0) {
        buf.copyWithin(0, this.start, this.end);
      }
      this.base = pos;
      this.start = 0;
      this.end = keep;
      const room = Math.min(buf.length - keep, stop - (pos + keep));
      let got = 0;
      while (got < room) {
        const n = fs.readSync(fd, buf, keep + got, room - got, pos + keep + got);
        if (n === 0) break; // the file shrank
        got += n;
      }
      this.end = keep + got;
      return got;
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Moves to `position` with nothing in memory. */
  seek(position: number): void {
    this.base = position;
    this.start = 0;
    this.end = 0;
  }

  release(): void {
    const pos = this.position;
    if (this.buf !== null) this.pool.give(this.buf);
    this.buf = null;
    this.seek(pos);
  }

  /** A buffer larger than a chunk is only kept while a big message needs it. */
  shrinkIfIdle(): void {
    if (this.buf !== null && this.buf.length > this.pool.chunkBytes && this.available === 0) {
      this.buf = null;
      this.seek(this.position);
    }
  }
}

/** Shared by the two framed binary formats: a frame header, then the message. */
abstract class FramedSource implements MessageSource {
  readonly seekable = true;
  protected readonly w: FileWindow;
  /** Bytes the next frame needs in memory (header + message), when known. */
  protected need = 0;
  protected broken = false;
  private maxPos = 0;

  constructor(
    protected readonly file: string,
    pool: ChunkPool,
    protected readonly onError: FramingErrorHandler,
  ) {
    this.w = new FileWindow(file, pool);
  }

  get position(): number {
    return this.w.position;
  }

  get memory(): number {
    return this.w.buf ? this.w.buf.length : 0;
  }

  get consumed(): number {
    return Math.max(this.maxPos, this.w.position);
  }

  get size(): number {
    return this.w.size;
  }

  /** Parses the frame at w.start: the message, null when more bytes are needed (sets `need`), or null after reporting a broken frame. */
  protected abstract frame(): Buffer | null;
  /** At the end of the file with `rest` bytes of an incomplete frame. */
  protected abstract tail(rest: number): void;

  next(): Buffer | null {
    if (this.broken || this.w.buf === null) return null;
    const msg = this.frame();
    if (msg !== null) this.need = 0;
    return msg;
  }

  refill(limit = Infinity): boolean {
    if (this.broken) return false;
    this.maxPos = Math.max(this.maxPos, this.w.position);
    this.w.shrinkIfIdle();
    // A replay (finite limit) loads the whole original batch at once: it was in memory at once.
    const need = limit === Infinity ? this.need : Math.max(this.need, limit - this.w.position);
    if (this.w.load(need, limit) > 0) return true;
    // Nothing more could be read: the limit, or the end of the file with maybe a partial frame.
    const rest = this.w.position + this.w.available >= this.w.size ? this.w.available : 0;
    if (rest > 0 && this.w.position < limit) {
      this.tail(rest);
      this.broken = true;
    }
    return false;
  }

  seek(position: number): void {
    this.w.release();
    this.w.seek(position);
    this.need = 0;
    this.broken = false;
  }

  release(): void {
    this.maxPos = Math.max(this.maxPos, this.w.position);
    this.w.release();
  }
}

/**
 * Reads length prefixes for every source: one, because a reader remembers the buffer it last
 * read, and a reader per file would keep every parked or finished file's chunk alive.
 */
const prefixReader = new WireReader();

/** PROTO_BINARY_LENGTH_DELIMITED: varint32 length + message, repeated. */
class LengthDelimitedSource extends FramedSource {
  constructor(
    file: string,
    pool: ChunkPool,
    onError: FramingErrorHandler,
    private readonly maxMessageBytes: number,
  ) {
    super(file, pool, onError);
  }

  protected frame(): Buffer | null {
    const w = this.w;
    const buf = w.buf!;
    if (w.start >= w.end) return null;
    const r = prefixReader;
    r.reset(buf, w.start);
    let len: number;
    try {
      len = r.uint32(w.end);
    } catch {
      // An incomplete varint (more bytes may come), or one longer than 10 bytes: at the end of
      // the file both are "not a whole message", as before.
      if (w.available < 10 && w.position + w.available < w.size) {
        this.need = 10;
        return null;
      }
      this.partial();
      return null;
    }
    if (len > this.maxMessageBytes) {
      this.onError('message_too_large', `${this.file}: length-delimited message of ${len} bytes exceeds the ${this.maxMessageBytes}-byte limit`);
      this.broken = true;
      return null;
    }
    const head = r.pos - w.start;
    if (w.position + head + len > w.size) {
      this.partial();
      return null;
    }
    if (r.pos + len > w.end) {
      this.need = head + len;
      return null;
    }
    w.start = r.pos + len;
    return buf.subarray(r.pos, w.start);
  }

  private partial(): void {
    this.tail(this.w.size - this.w.position);
    this.broken = true;
  }

  protected tail(rest: number): void {
    this.onError('malformed_protobuf', `${this.file}: ${rest} bytes at the end are not a whole length-delimited message`);
  }
}

/** A recorded StreamTaps request body: gRPC frames (flag byte 0, uint32 length, message). */
class GrpcFrameSource extends FramedSource {
  protected frame(): Buffer | null {
    const w = this.w;
    const buf = w.buf!;
    // Fewer than 5 bytes at the very end are ignored, as before.
    if (w.available < 5) {
      if (w.position + 5 <= w.size) this.need = 5;
      return null;
    }
    const len = buf.readUInt32BE(w.start + 1);
    if (buf[w.start] !== 0 || w.position + 5 + len > w.size) {
      this.onError('malformed_protobuf', `${this.file}: bad gRPC frame at offset ${w.position}`);
      this.broken = true;
      return null;
    }
    if (w.available < 5 + len) {
      this.need = 5 + len;
      return null;
    }
    const at = w.start + 5;
    w.start = at + len;
    return buf.subarray(at, w.start);
  }

  protected tail(): void {
    // Only a frame that runs past the end of the file is an error, and frame() reports it.
  }
}

/** PROTO_BINARY: the whole file is one TraceWrapper (even an empty file: one empty message). */
class WholeFileSource implements MessageSource {
  readonly seekable = true;
  private data: Buffer | null = null;
  private done = false;
  size = -1;

  constructor(private readonly file: string) {}

  get position(): number {
    return this.done ? 1 : 0;
  }
  get memory(): number {
    return this.data ? this.data.length : 0;
  }
  get consumed(): number {
    return Math.max(0, this.size);
  }

  next(): Buffer | null {
    if (this.done || this.data === null) return null;
    this.done = true;
    return this.data;
  }

  refill(limit = Infinity): boolean {
    if (this.done || this.data !== null || limit <= 0) return false;
    this.data = fs.readFileSync(this.file);
    this.size = this.data.length;
    return true;
  }

  seek(position: number): void {
    this.data = null;
    this.done = position > 0;
  }

  release(): void {
    this.data = null;
  }
}

/** Sources that turn text into fresh binary messages: a queue of them, filled per load. */
abstract class ConvertedSource<T> implements MessageSource {
  readonly seekable = false;
  protected ready: T[] = [];
  private head = 0;
  protected held = 0;
  private returned = 0;
  protected bytesIn = 0;
  size = -1;

  get position(): number {
    return this.returned;
  }
  get memory(): number {
    return this.held;
  }
  get consumed(): number {
    return this.bytesIn;
  }

  next(): Buffer | null {
    while (this.head < this.ready.length) {
      const item = this.ready[this.head]!;
      this.ready[this.head++] = undefined as T; // let it go
      const msg = this.convert(item);
      if (msg === null) continue;
      this.returned++;
      return msg;
    }
    return null;
  }

  refill(): boolean {
    this.ready = [];
    this.head = 0;
    this.held = 0;
    return this.load();
  }

  /** Adds the next items to `ready`; false at the end of the file. */
  protected abstract load(): boolean;
  /** An item as a binary message (null: reported and skipped). */
  protected abstract convert(item: T): Buffer | null;
  protected abstract restart(): void;

  seek(position: number): void {
    if (position !== 0) throw new Error('this tap format can only restart from the beginning');
    this.ready = [];
    this.head = 0;
    this.held = 0;
    this.returned = 0;
    this.restart();
  }

  release(): void {
    this.seek(0);
  }
}

/** A JSON object's text, or a problem the splitter found where it stands in the file. */
type JsonItem = string | { reason: IngestErrorReason; detail: string };

/**
 * JSON TraceWrappers back to back (JSON_BODY_AS_BYTES / _AS_STRING), split as they stream in. An
 * object is parsed when it is handed out, and the splitter's complaints wait in line with the
 * objects, so every report comes in file order among the messages (as when files were read whole).
 */
class JsonSource extends ConvertedSource<JsonItem> {
  private offset = 0;
  private ended = false;
  private splitter!: ConcatJsonSplitter;

  constructor(
    private readonly file: string,
    private readonly chunkBytes: number,
    private readonly maxMessageBytes: number,
    private readonly onError: FramingErrorHandler,
  ) {
    super();
    this.restart();
  }

  protected restart(): void {
    this.offset = 0;
    this.ended = false;
    this.splitter = new ConcatJsonSplitter({
      maxObjectBytes: this.maxMessageBytes,
      onObject: (text) => {
        this.ready.push(text);
        this.held += text.length;
      },
      onError: (reason, detail) => this.ready.push({ reason: reason === 'object_too_large' ? 'message_too_large' : 'malformed_json', detail: `${this.file}: ${detail}` }),
    });
  }

  /** The objects waiting, and the chunks of the one in progress (views keep whole chunks). */
  override get memory(): number {
    return this.held + this.splitter.retainedBytes;
  }

  protected convert(text: JsonItem): Buffer | null {
    if (typeof text !== 'string') {
      this.onError(text.reason, text.detail);
      return null;
    }
    try {
      return converters().jsonTraceToBinary(JSON.parse(text));
    } catch (err) {
      this.onError('malformed_json', `${this.file}: ${(err as Error).message}`);
      return null;
    }
  }

  protected load(): boolean {
    if (this.ended) return false;
    const fd = fs.openSync(this.file, 'r');
    try {
      if (this.size < 0) this.size = fs.fstatSync(fd).size;
      // Reads until at least one object is complete (or the file ends): the splitter keeps views
      // of the chunks of an object in progress, so every chunk is a fresh buffer.
      while (this.ready.length === 0) {
        const chunk = Buffer.allocUnsafe(this.chunkBytes);
        const n = fs.readSync(fd, chunk, 0, chunk.length, this.offset);
        if (n === 0) {
          this.splitter.end();
          this.ended = true;
          return this.ready.length > 0;
        }
        this.offset += n;
        this.bytesIn = Math.max(this.bytesIn, this.offset);
        this.splitter.push(n === chunk.length ? chunk : chunk.subarray(0, n));
      }
      return true;
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** PROTO_TEXT: parsed whole, then handed out message by message. */
class TextSource extends ConvertedSource<Buffer> {
  private loaded = false;

  constructor(
    private readonly file: string,
    private readonly onError: FramingErrorHandler,
  ) {
    super();
  }

  protected restart(): void {
    this.loaded = false;
  }

  protected convert(msg: Buffer): Buffer {
    return msg;
  }

  protected load(): boolean {
    if (this.loaded) return false;
    this.loaded = true;
    const data = fs.readFileSync(this.file);
    this.bytesIn = this.size = data.length;
    try {
      this.ready = converters().parseTextTraces(data.toString('utf8'));
    } catch (err) {
      this.onError('malformed_text', `${this.file}: ${(err as Error).message}`);
      return false;
    }
    for (const m of this.ready) this.held += m.length;
    return this.ready.length > 0;
  }
}

/** A source for `file`; JSON and text formats need loadTextFormats() first. */
export function openMessageSource(file: string, format: TapFileFormat, pool: ChunkPool, maxMessageBytes: number, onError: FramingErrorHandler): MessageSource {
  if (needsTextFormats(format)) converters();
  switch (format) {
    case 'pb':
      return new WholeFileSource(file);
    case 'pb_length_delimited':
      return new LengthDelimitedSource(file, pool, onError, maxMessageBytes);
    case 'grpc':
      return new GrpcFrameSource(file, pool, onError);
    case 'json':
      return new JsonSource(file, pool.chunkBytes, maxMessageBytes, onError);
    case 'pb_text':
      return new TextSource(file, onError);
  }
}
