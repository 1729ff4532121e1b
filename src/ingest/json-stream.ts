/**
 * Splits a byte stream of JSON objects written back to back with no delimiter (Envoy admin /tap
 * streaming, file_per_tap JSON files) into one string per top-level object.
 *
 * Only ASCII structural bytes matter (`{`, `}`, `"`, `\`): every byte of a multi-byte UTF-8
 * sequence is >= 0x80, so scanning bytes is UTF-8 safe and chunk boundaries may fall anywhere,
 * even inside a character. The text is decoded once per complete object. The splitter does not
 * validate JSON (the caller parses); it only finds where each object ends.
 *
 * push() keeps views (subarray) of the chunks of the object in progress, not copies: callers must
 * not reuse a chunk's memory after pushing it (Node streams never do).
 */

export type SplitterErrorReason = 'object_too_large' | 'garbage';

export interface ConcatJsonSplitterOptions {
  /** The most bytes one object may take; larger objects are reported and skipped. */
  maxObjectBytes: number;
  onObject: (text: string) => void;
  onError: (reason: SplitterErrorReason, detail: string) => void;
}

const OPEN = 0x7b; // {
const CLOSE = 0x7d; // }
const QUOTE = 0x22; // "
const BACKSLASH = 0x5c;

const enum Mode {
  /** Between objects, expecting whitespace or `{`. */
  Idle,
  /** Between objects after a non-whitespace byte: skipping to the next `{`. */
  Garbage,
  /** Inside an object, keeping its bytes. */
  Collect,
  /** Inside an object that exceeded maxObjectBytes: tracking structure, dropping bytes. */
  Skip,
}

export class ConcatJsonSplitter {
  private readonly max: number;
  private readonly onObject: (text: string) => void;
  private readonly onError: (reason: SplitterErrorReason, detail: string) => void;

  private mode = Mode.Idle;
  private depth = 0;
  private inString = false;
  private escaped = false;
  /** Slices of the current object from earlier chunks, and their total length. */
  private parts: Buffer[] = [];
  private partBytes = 0;
  /** Bytes consumed before the current chunk, for error details. */
  private streamOffset = 0;

  constructor(opts: ConcatJsonSplitterOptions) {
    if (!(opts.maxObjectBytes > 0)) throw new Error('ConcatJsonSplitter: maxObjectBytes must be > 0');
    this.max = opts.maxObjectBytes;
    this.onObject = opts.onObject;
    this.onError = opts.onError;
  }

  push(chunk: Buffer): void {
    const n = chunk.length;
    // Where the current object starts in this chunk (0 when it began in an earlier chunk).
    let start = 0;
    for (let i = 0; i < n; i++) {
      const b = chunk[i]!;
      switch (this.mode) {
        case Mode.Idle:
          if (b === OPEN) {
            this.beginObject();
            start = i;
          } else if (b !== 0x20 && b !== 0x0a && b !== 0x0d && b !== 0x09) {
            this.mode = Mode.Garbage;
            this.onError('garbage', `unexpected byte 0x${b.toString(16).padStart(2, '0')} outside a JSON object at offset ${this.streamOffset + i}`);
          }
          break;
        case Mode.Garbage:
          if (b === OPEN) {
            this.beginObject();
            start = i;
          }
          break;
        default: {
          // Collect or Skip: the same structure tracking.
          if (this.inString) {
            if (this.escaped) this.escaped = false;
            else if (b === BACKSLASH) this.escaped = true;
            else if (b === QUOTE) this.inString = false;
          } else if (b === QUOTE) {
            this.inString = true;
          } else if (b === OPEN) {
            this.depth++;
          } else if (b === CLOSE && --this.depth === 0) {
            this.endObject(chunk, start, i + 1);
          }
        }
      }
    }
    // The object continues in the next chunk: keep (or just count) its bytes from this one.
    if (this.mode === Mode.Collect) {
      const len = n - start;
      if (this.partBytes + len > this.max) this.tooLarge();
      else if (len > 0) {
        this.parts.push(start === 0 ? chunk : chunk.subarray(start));
        this.partBytes += len;
      }
    }
    this.streamOffset += n;
  }

  /**
   * Memory the object in progress keeps alive: its slices are views, so each keeps its whole chunk
   * (callers count it against their memory budget).
   */
  get retainedBytes(): number {
    let n = 0;
    for (const p of this.parts) n += p.buffer.byteLength;
    return n;
  }

  /** End of stream: an object still open is truncated. Resets, so the splitter may be reused. */
  end(): void {
    const truncated = this.mode === Mode.Collect;
    const bytes = this.partBytes;
    this.reset();
    if (truncated) this.onError('garbage', `stream ended inside a JSON object (truncated after ${bytes} bytes)`);
  }

  private beginObject(): void {
    this.mode = Mode.Collect;
    this.depth = 1;
    this.inString = false;
    this.escaped = false;
  }

  private endObject(chunk: Buffer, start: number, end: number): void {
    const collect = this.mode === Mode.Collect;
    const total = this.partBytes + (end - start);
    let text = '';
    if (collect && total <= this.max) {
      const last = chunk.subarray(start, end);
      text = this.parts.length === 0 ? last.toString('utf8') : Buffer.concat([...this.parts, last], total).toString('utf8');
    } else if (collect) {
      this.tooLarge();
    }
    // Reset before the callback so a throwing callback leaves the splitter consistent.
    this.reset();
    if (text) this.onObject(text);
  }

  private tooLarge(): void {
    this.onError('object_too_large', `JSON object exceeds ${this.max} bytes; skipped`);
    this.mode = Mode.Skip;
    this.parts = [];
    this.partBytes = 0;
  }

  private reset(): void {
    this.mode = Mode.Idle;
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
    this.parts = [];
    this.partBytes = 0;
  }
}
