/**
 * The broker sink's on-disk spool: a FIFO of record batches, ordered by sequence number, capped in
 * bytes, that survives restarts.
 *
 * Layout of a spool directory (one per broker lane):
 *   lock                  pid of the meshcap process using it (O_EXCL; a stale one is taken over)
 *   meta.json             stream id and sequence-number lease (see BrokerSink)
 *   seg-NNNNNNNNNN.spool  segments, each a run of batches:
 *
 *   batch = 32-byte header (little-endian u32s) + payload
 *     0 magic 'MCSB'   4 payload length   8 record count   12 format (0 pcap, 1 pcap-ns, 2 pcapng)
 *    16 first sequence number, low u32   20 high u32   24 CRC-32 of the payload   28 CRC-32 of bytes 0-27
 *   payload = the records, framed in the stream format, ready to be written to the broker as-is.
 *
 * Writes are asynchronous and sequential (fs.writev); a batch whose write is still pending is read
 * back from memory. A batch is removed only when the broker has it (`ack`), so a crash of meshcap
 * loses nothing that reached the spool: at the next start the segments are scanned (headers only;
 * a torn tail left by a crash is cut off), and replayed in sequence order. Payload CRCs are
 * checked when a batch is read back; a corrupt batch is skipped and reported.
 *
 * A segment file is deleted once every batch in it is acknowledged. `bytes` counts whole segment
 * files (acknowledged batches included until their segment goes) plus pending writes, and is what
 * the cap (`maxBytes`) limits.
 */
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import type { Logger } from 'pino';

export const BATCH_HEADER = 32;
const MAGIC = 0x4253434d; // 'MCSB' as little-endian bytes
const SEGMENT_RE = /^seg-(\d{10})\.spool$/;

export type SpoolFormat = 'pcap' | 'pcap-ns' | 'pcapng';
const FORMAT_CODES: SpoolFormat[] = ['pcap', 'pcap-ns', 'pcapng'];

export interface SpoolBatch {
  firstSeq: number;
  count: number;
  format: SpoolFormat;
  /** The records (exactly the payload). */
  data: Buffer;
}

interface Segment {
  id: number;
  file: string;
  /** Bytes in the file, pending writes included. */
  size: number;
  /** Entries not yet acknowledged. */
  live: number;
  /** Write descriptor while this is the active segment. */
  wfd: number | null;
  /** Descriptor for reads (opened lazily). */
  rfd: number | null;
  /** True once the segment takes no more appends. */
  sealed: boolean;
}

interface Entry {
  seg: Segment | null;
  /** Offset of the batch header in the segment. */
  off: number;
  len: number;
  firstSeq: number;
  count: number;
  format: SpoolFormat;
  /** The payload while its write is pending (or for good, if the write failed). */
  mem: Buffer | null;
  /** Acknowledged (or dropped as corrupt): no longer counted in its segment. */
  gone?: boolean;
}

export interface SpoolOptions {
  /** Cap on the spool's bytes (segment files plus pending writes). */
  maxBytes: number;
  /** Segment size (default: maxBytes/16 within [1 MiB, 64 MiB]). */
  segmentBytes?: number;
  /** Cap on bytes waiting to be written (a disk slower than the traffic); default 64 MiB. */
  maxPendingBytes?: number;
  /** Called for batches found corrupt when read back (they are skipped). */
  onCorrupt?: (records: number, detail: string) => void;
}

export interface SpoolMeta {
  version: 1;
  streamId: string;
  /** The next sequence number, valid when `clean` (written at a clean close). */
  nextSeq: number;
  /** No sequence number at or above this was ever used. */
  leaseEnd: number;
  clean: boolean;
  /** Records below this sequence number were delivered (batches below it are skipped at open). */
  ackedSeq?: number;
  format?: SpoolFormat;
}

let crcImpl: ((buf: Buffer, init?: number) => number) | null = (zlib as unknown as { crc32?: (b: Buffer, i?: number) => number }).crc32 ?? null;
let crcTable: Uint32Array | null = null;
/** CRC-32 (IEEE), zlib's when Node has it (>= 20.15), a table otherwise. */
export function crc32(buf: Buffer): number {
  if (crcImpl) return crcImpl(buf) >>> 0;
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = crcTable[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
/** For tests: force the table implementation. */
export function _useTableCrc(): void {
  crcImpl = null;
}

function batchHeader(len: number, count: number, format: SpoolFormat, firstSeq: number, payloadCrc: number): Buffer {
  const h = Buffer.alloc(BATCH_HEADER);
  h.writeUInt32LE(MAGIC, 0);
  h.writeUInt32LE(len, 4);
  h.writeUInt32LE(count, 8);
  h.writeUInt32LE(FORMAT_CODES.indexOf(format), 12);
  h.writeUInt32LE(firstSeq % 4294967296, 16);
  h.writeUInt32LE(Math.floor(firstSeq / 4294967296), 20);
  h.writeUInt32LE(payloadCrc, 24);
  h.writeUInt32LE(crc32(h.subarray(0, 28)), 28);
  return h;
}

function parseHeader(h: Buffer): { len: number; count: number; format: SpoolFormat; firstSeq: number; crc: number } | null {
  if (h.length < BATCH_HEADER || h.readUInt32LE(0) !== MAGIC) return null;
  if (crc32(h.subarray(0, 28)) !== h.readUInt32LE(28)) return null;
  const format = FORMAT_CODES[h.readUInt32LE(12)];
  if (!format) return null;
  return {
    len: h.readUInt32LE(4),
    count: h.readUInt32LE(8),
    format,
    firstSeq: h.readUInt32LE(16) + h.readUInt32LE(20) * 4294967296,
    crc: h.readUInt32LE(24),
  };
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class SpoolLockedError extends Error {}

export class Spool {
  private readonly entries: Entry[] = [];
  private readPos = 0;
  private readonly segments = new Map<number, Segment>();
  private active: Segment | null = null;
  private nextSegId = 1;
  private readonly writeQueue: Array<{ entry: Entry; header: Buffer }> = [];
  private writing = false;
  private drained: Array<() => void> = [];
  private brokenUntil = 0;
  private closed = false;
  /** Bytes of segment files plus pending writes. */
  bytes = 0;
  pendingBytes = 0;
  /** Records held (acknowledged ones excluded). */
  records = 0;
  readonly segmentBytes: number;
  meta: SpoolMeta | null = null;
  /** What the scan at open found. */
  readonly recovered = { batches: 0, records: 0, bytes: 0, tornBytes: 0 };

  private constructor(
    readonly dir: string,
    readonly opts: SpoolOptions,
    private readonly log: Logger,
  ) {
    this.segmentBytes = opts.segmentBytes ?? Math.min(64 << 20, Math.max(1 << 20, Math.floor(opts.maxBytes / 16)));
  }

  /**
   * Opens (creating) a spool directory: takes the lock, reads meta.json, scans the segments.
   * Throws SpoolLockedError when another live process holds it.
   */
  static open(dir: string, opts: SpoolOptions, log: Logger): Spool {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const s = new Spool(dir, opts, log);
    s.lock();
    s.meta = s.readMeta();
    s.scan();
    if (s.meta?.ackedSeq) s.ack(s.meta.ackedSeq);
    return s;
  }

  private lock(): void {
    const file = path.join(this.dir, 'lock');
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = fs.openSync(file, 'wx', 0o600);
        fs.writeSync(fd, `${process.pid}\n`);
        fs.closeSync(fd);
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const pid = Number.parseInt(fs.readFileSync(file, 'utf8'), 10);
        if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && pidAlive(pid)) {
          throw new SpoolLockedError(`spool directory ${this.dir} is in use by process ${pid}`);
        }
        fs.rmSync(file, { force: true });
      }
    }
    throw new SpoolLockedError(`cannot lock spool directory ${this.dir}`);
  }

  private readMeta(): SpoolMeta | null {
    try {
      const m = JSON.parse(fs.readFileSync(path.join(this.dir, 'meta.json'), 'utf8')) as SpoolMeta;
      if (m && m.version === 1 && typeof m.streamId === 'string' && /^[0-9a-f]{32}$/.test(m.streamId) && Number.isSafeInteger(m.leaseEnd) && Number.isSafeInteger(m.nextSeq)) return m;
      this.log.warn({ dir: this.dir, reason: 'spool_meta_invalid' }, 'spool meta.json is not valid; starting a new stream');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.warn({ dir: this.dir, err: (err as Error).message, reason: 'spool_meta_invalid' }, 'cannot read spool meta.json; starting a new stream');
    }
    return null;
  }

  /** Writes meta.json atomically (write + rename). */
  saveMeta(meta: SpoolMeta): void {
    const file = path.join(this.dir, 'meta.json');
    const tmp = `${file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(meta), { mode: 0o600 });
    fs.renameSync(tmp, file);
    this.meta = meta;
  }

  private scan(): void {
    const names = fs.readdirSync(this.dir).filter((n) => SEGMENT_RE.test(n)).sort();
    const header = Buffer.alloc(BATCH_HEADER);
    for (const name of names) {
      const id = Number(SEGMENT_RE.exec(name)![1]);
      const file = path.join(this.dir, name);
      const size = fs.statSync(file).size;
      const seg: Segment = { id, file, size: 0, live: 0, wfd: null, rfd: null, sealed: true };
      const fd = fs.openSync(file, 'r+');
      let off = 0;
      try {
        while (off + BATCH_HEADER <= size) {
          fs.readSync(fd, header, 0, BATCH_HEADER, off);
          const h = parseHeader(header);
          if (!h || off + BATCH_HEADER + h.len > size) break;
          this.entries.push({ seg, off, len: h.len, firstSeq: h.firstSeq, count: h.count, format: h.format, mem: null });
          seg.live++;
          this.records += h.count;
          this.recovered.batches++;
          this.recovered.records += h.count;
          off += BATCH_HEADER + h.len;
        }
        if (off < size) {
          // A torn write (crash in the middle of an append): keep what is whole.
          fs.ftruncateSync(fd, off);
          this.recovered.tornBytes += size - off;
          this.log.warn({ file, kept: off, cut: size - off, reason: 'spool_torn_tail' }, 'spool segment had a torn tail (meshcap stopped mid-write); cut it off');
        }
      } finally {
        fs.closeSync(fd);
      }
      seg.size = off;
      this.nextSegId = Math.max(this.nextSegId, id + 1);
      if (seg.live === 0) {
        fs.rmSync(file, { force: true });
        continue;
      }
      this.segments.set(id, seg);
      this.bytes += off;
    }
    this.recovered.bytes = this.bytes;
    this.entries.sort((a, b) => a.firstSeq - b.firstSeq);
  }

  /** The sequence number just past the highest batch held (0 when empty). */
  get endSeq(): number {
    let end = 0;
    for (const e of this.entries) end = Math.max(end, e.firstSeq + e.count);
    return end;
  }

  /** Batches held, acknowledged ones excluded. */
  get batches(): number {
    return this.entries.length;
  }

  /** True when a batch is waiting to be read. */
  get hasUnread(): boolean {
    return this.readPos < this.entries.length;
  }

  /** First sequence number of the next batch `read` returns (null when none). */
  peekSeq(): number | null {
    const e = this.entries[this.readPos];
    return e ? e.firstSeq : null;
  }

  /** Bytes of batches not yet read. */
  get unreadBytes(): number {
    let n = 0;
    for (let i = this.readPos; i < this.entries.length; i++) n += this.entries[i]!.len;
    return n;
  }

  /** Whether a batch of `len` payload bytes fits under the caps now. */
  canAccept(len: number): boolean {
    if (this.closed || Date.now() < this.brokenUntil) return false;
    if (this.pendingBytes + len > (this.opts.maxPendingBytes ?? 64 << 20)) return false;
    return this.bytes + BATCH_HEADER + len <= this.opts.maxBytes;
  }

  /** Why canAccept is false: 'full' (the cap), 'slow' (pending writes), 'error' (disk failing). */
  refusal(len: number): 'full' | 'slow' | 'error' | null {
    if (this.closed || Date.now() < this.brokenUntil) return 'error';
    if (this.bytes + BATCH_HEADER + len > this.opts.maxBytes) return 'full';
    if (this.pendingBytes + len > (this.opts.maxPendingBytes ?? 64 << 20)) return 'slow';
    return null;
  }

  /**
   * Appends a batch (its sequence numbers must follow every batch held). The spool keeps a
   * reference to `data` until it is written; the caller must not reuse the buffer. Returns false
   * (and takes nothing) when the batch does not fit.
   */
  append(batch: SpoolBatch): boolean {
    if (!this.canAccept(batch.data.length)) return false;
    const last = this.entries[this.entries.length - 1];
    if (last && batch.firstSeq < last.firstSeq + last.count) throw new Error(`spool: append out of order (${batch.firstSeq} after ${last.firstSeq}+${last.count})`);
    const seg = this.segmentFor(batch.data.length);
    const entry: Entry = { seg, off: seg.size, len: batch.data.length, firstSeq: batch.firstSeq, count: batch.count, format: batch.format, mem: batch.data };
    const header = batchHeader(batch.data.length, batch.count, batch.format, batch.firstSeq, crc32(batch.data));
    seg.size += BATCH_HEADER + batch.data.length;
    seg.live++;
    this.bytes += BATCH_HEADER + batch.data.length;
    this.pendingBytes += batch.data.length;
    this.records += batch.count;
    this.entries.push(entry);
    this.writeQueue.push({ entry, header });
    if (!this.writing) this.pumpWrites();
    return true;
  }

  /**
   * Appends synchronously, in sequence order wherever it falls (shutdown: the memory queue goes to
   * disk). Returns false when it does not fit or the write failed.
   */
  appendSync(batch: SpoolBatch): boolean {
    if (this.bytes + BATCH_HEADER + batch.data.length > this.opts.maxBytes) return false;
    const seg = this.segmentFor(batch.data.length);
    const header = batchHeader(batch.data.length, batch.count, batch.format, batch.firstSeq, crc32(batch.data));
    try {
      fs.writevSync(seg.wfd!, [header, batch.data], seg.size);
    } catch (err) {
      this.log.error({ file: seg.file, err: (err as Error).message, reason: 'spool_write_failed' }, 'spool write failed');
      try {
        fs.ftruncateSync(seg.wfd!, seg.size);
      } catch {
        /* nothing more to do */
      }
      return false;
    }
    const entry: Entry = { seg, off: seg.size, len: batch.data.length, firstSeq: batch.firstSeq, count: batch.count, format: batch.format, mem: null };
    seg.size += BATCH_HEADER + batch.data.length;
    seg.live++;
    this.bytes += BATCH_HEADER + batch.data.length;
    this.records += batch.count;
    // Sorted insert (a rare path: shutdown).
    let i = this.entries.length;
    while (i > 0 && this.entries[i - 1]!.firstSeq > batch.firstSeq) i--;
    this.entries.splice(i, 0, entry);
    if (i < this.readPos) this.readPos = i;
    return true;
  }

  private segmentFor(len: number): Segment {
    let seg = this.active;
    if (seg && seg.size > 0 && seg.size + BATCH_HEADER + len > this.segmentBytes) {
      seg.sealed = true;
      this.closeWriteFdWhenIdle(seg);
      seg = null;
    }
    if (!seg) {
      const id = this.nextSegId++;
      const file = path.join(this.dir, `seg-${String(id).padStart(10, '0')}.spool`);
      const wfd = fs.openSync(file, 'w', 0o600);
      seg = { id, file, size: 0, live: 0, wfd, rfd: null, sealed: false };
      this.segments.set(id, seg);
      this.active = seg;
    }
    return seg;
  }

  private closeWriteFdWhenIdle(seg: Segment): void {
    if (this.writeQueue.some((w) => w.entry.seg === seg)) return; // pumpWrites closes it later
    if (seg.wfd !== null) {
      fs.close(seg.wfd, () => {});
      seg.wfd = null;
    }
  }

  private pumpWrites(): void {
    const w = this.writeQueue[0];
    if (!w) {
      this.writing = false;
      const d = this.drained;
      this.drained = [];
      for (const f of d) f();
      return;
    }
    this.writing = true;
    const { entry, header } = w;
    const seg = entry.seg!;
    fs.writev(seg.wfd!, [header, entry.mem!], entry.off, (err) => {
      this.writeQueue.shift();
      if (err) {
        this.writeFailed(entry, err);
      } else {
        this.pendingBytes -= entry.len;
        entry.mem = null;
        if (seg.sealed && seg.wfd !== null && !this.writeQueue.some((q) => q.entry.seg === seg)) {
          fs.close(seg.wfd, () => {});
          seg.wfd = null;
        }
        this.maybeDelete(seg);
      }
      this.pumpWrites();
    });
  }

  /**
   * A failed write (disk full, I/O error): the batch and every batch queued behind it in the same
   * segment stay in memory (still readable, never lost by the spool), the segment is cut back and
   * sealed, and the spool refuses new batches for 5 s.
   */
  private writeFailed(entry: Entry, err: NodeJS.ErrnoException): void {
    const seg = entry.seg!;
    this.brokenUntil = Date.now() + 5000;
    this.log.error({ file: seg.file, err: err.message, code: err.code, reason: 'spool_write_failed' }, 'spool write failed; keeping the affected batches in memory and refusing new ones for 5 s');
    const affected = [entry, ...this.writeQueue.filter((q) => q.entry.seg === seg).map((q) => q.entry)];
    for (let i = this.writeQueue.length - 1; i >= 0; i--) if (this.writeQueue[i]!.entry.seg === seg) this.writeQueue.splice(i, 1);
    const cut = Math.min(...affected.map((e) => e.off));
    for (const e of affected) {
      this.pendingBytes -= e.len;
      this.bytes -= BATCH_HEADER + e.len;
      seg.size -= BATCH_HEADER + e.len;
      if (!e.gone) seg.live--;
      e.seg = null; // memory-only from now on
    }
    try {
      if (seg.wfd !== null) fs.ftruncateSync(seg.wfd, cut);
    } catch {
      /* the next scan cuts a torn tail anyway */
    }
    seg.sealed = true;
    if (seg.wfd !== null) {
      fs.close(seg.wfd, () => {});
      seg.wfd = null;
    }
    if (this.active === seg) this.active = null;
    this.maybeDelete(seg);
  }

  /**
   * Reads the next batch in sequence order (null when none). Corrupt batches are skipped and
   * reported through onCorrupt.
   */
  async read(): Promise<SpoolBatch | null> {
    while (this.readPos < this.entries.length) {
      const e = this.entries[this.readPos++]!;
      if (e.mem) return { firstSeq: e.firstSeq, count: e.count, format: e.format, data: e.mem };
      const seg = e.seg!;
      try {
        if (seg.rfd === null) seg.rfd = fs.openSync(seg.file, 'r');
        const buf = Buffer.allocUnsafe(BATCH_HEADER + e.len);
        const n = await new Promise<number>((resolve, reject) => fs.read(seg.rfd!, buf, 0, buf.length, e.off, (err, bytes) => (err ? reject(err) : resolve(bytes))));
        const h = parseHeader(buf);
        const data = buf.subarray(BATCH_HEADER);
        if (n !== buf.length || !h || h.len !== e.len || h.firstSeq !== e.firstSeq || crc32(data) !== h.crc) throw new Error('checksum or header mismatch');
        return { firstSeq: e.firstSeq, count: e.count, format: e.format, data };
      } catch (err) {
        const detail = `${seg.file} @${e.off}: ${(err as Error).message}`;
        this.log.error({ file: seg.file, offset: e.off, records: e.count, err: (err as Error).message, reason: 'spool_corrupt' }, 'spool batch unreadable; skipping it');
        this.opts.onCorrupt?.(e.count, detail);
        // Treat it as delivered so the segment can go.
        this.dropEntry(e);
      }
    }
    return null;
  }

  private dropEntry(e: Entry): void {
    const i = this.entries.indexOf(e);
    if (i < 0) return;
    this.entries.splice(i, 1);
    if (i < this.readPos) this.readPos--;
    this.records -= e.count;
    e.gone = true;
    if (e.seg) {
      e.seg.live--;
      this.maybeDelete(e.seg);
    }
  }

  /** Every record with a sequence number below `seqEnd` is delivered: forget those batches. */
  ack(seqEnd: number): void {
    let removed = 0;
    while (this.entries.length > 0) {
      const e = this.entries[0]!;
      if (e.firstSeq + e.count > seqEnd) break;
      // (A batch still being written leaves with its entry; its segment goes once the write is done.)
      this.entries.shift();
      removed++;
      this.records -= e.count;
      e.gone = true;
      if (e.seg) {
        e.seg.live--;
        this.maybeDelete(e.seg);
      }
    }
    this.readPos = Math.max(0, this.readPos - removed);
  }

  /** Reading starts again at the first batch not acknowledged (after a broken connection). */
  rewind(): void {
    this.readPos = 0;
  }

  private maybeDelete(seg: Segment): void {
    if (seg.live > 0) return;
    if (this.writeQueue.some((w) => w.entry.seg === seg)) return;
    if (seg.wfd !== null) {
      fs.close(seg.wfd, () => {});
      seg.wfd = null;
    }
    if (seg.rfd !== null) {
      fs.close(seg.rfd, () => {});
      seg.rfd = null;
    }
    if (this.active === seg) this.active = null;
    this.segments.delete(seg.id);
    this.bytes -= seg.size;
    fs.rm(seg.file, { force: true }, () => {});
  }

  /** Resolves when every pending write is done. */
  flush(): Promise<void> {
    if (!this.writing && this.writeQueue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.drained.push(resolve));
  }

  /** Finishes pending writes, closes files, releases the lock. Memory-only batches are lost (counted by the caller via `memoryOnlyRecords`). */
  async close(): Promise<void> {
    await this.flush();
    this.closed = true;
    for (const seg of this.segments.values()) {
      for (const fd of [seg.wfd, seg.rfd]) if (fd !== null) fs.closeSync(fd);
      seg.wfd = null;
      seg.rfd = null;
    }
    this.active = null;
    fs.rmSync(path.join(this.dir, 'lock'), { force: true });
  }

  /** Records held only in memory because their write failed. */
  get memoryOnlyRecords(): number {
    let n = 0;
    for (const e of this.entries) if (!e.seg) n += e.count;
    return n;
  }

  /** Segment files now (tests). */
  segmentFiles(): string[] {
    return [...this.segments.values()].map((s) => s.file);
  }
}
