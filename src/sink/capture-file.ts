/**
 * One capture file being written, appended to in order, whole pages by direct I/O when it can.
 *
 * Why: on the machines meshcap runs on, copying capture data into the page cache costs more CPU
 * than everything else the writer does (fresh page-cache pages are expensive, and writeback adds
 * its own), and the captured data is never read back by this host. A capture written at hundreds of
 * MB/s should go from its buffers to the disk. O_DIRECT needs the memory address, the file offset
 * and the length aligned to the device's block size; meshcap's blocks sit page-aligned in their
 * memory and the pipeline leaves a lead before the records (Block.start) so that they are at the
 * same offset modulo 4 KiB in memory as in the file. An append then goes out as: the few bytes up
 * to the next page boundary (through the page cache), the whole pages (direct), and the bytes after
 * the last whole page (through the page cache). Readers of a growing file see every byte as soon as
 * the append returns.
 *
 * Anything else (a filesystem that refuses O_DIRECT such as some tmpfs/overlay, standard output, a
 * small or misaligned append, an EINVAL from the device) is written through the page cache: the
 * bytes are the same, only the cost differs. Used by the capture writer thread (blocking calls).
 */
import fs from 'node:fs';

const PAGE = 4096;
/** Appends shorter than this go through the page cache: direct I/O waits for the device. */
const DIRECT_MIN = 64 * 1024;

export class CaptureFile {
  /** Bytes in the file (the offset of the next append). */
  size = 0;
  /** Bytes written by direct I/O, and through the page cache (for metrics and logs). */
  directBytes = 0;
  cachedBytes = 0;

  private constructor(
    readonly path: string,
    readonly fd: number,
    /** A second descriptor with O_DIRECT, or -1. */
    private dfd: number,
    private readonly ownsFd: boolean,
  ) {}

  /** Creates (truncates) `path` mode 0600; `direct` false: page cache only. */
  static create(path: string, direct: boolean): CaptureFile {
    const fd = fs.openSync(path, 'w', 0o600);
    let dfd = -1;
    if (direct && fs.constants.O_DIRECT !== undefined) {
      try {
        dfd = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_DIRECT);
      } catch {
        dfd = -1; // EINVAL: this filesystem does not do direct I/O
      }
    }
    return new CaptureFile(path, fd, dfd, true);
  }

  /** An already open descriptor (standard output): page cache, sequential writes. */
  static stream(fd: number, name: string): CaptureFile {
    return new CaptureFile(name, fd, -1, false);
  }

  /** Whether direct I/O is available on this file. */
  get direct(): boolean {
    return this.dfd >= 0;
  }

  /**
   * Appends `data` (a view into page-aligned memory: its byteOffset is its address modulo the page
   * size). Throws the write error; the caller undoes a failed append with truncate().
   */
  append(data: Uint8Array): void {
    const len = data.length;
    if (this.dfd >= 0 && len >= DIRECT_MIN && ((data.byteOffset - this.size) & (PAGE - 1)) === 0) {
      const head = (PAGE - (this.size & (PAGE - 1))) & (PAGE - 1);
      const whole = (len - head) & ~(PAGE - 1);
      this.put(this.fd, data, 0, head);
      try {
        this.put(this.dfd, data, head, whole);
        this.directBytes += whole;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        // Refused before writing anything: the device wants a larger alignment than a page, or the
        // memory is not page-aligned after all. No more direct I/O on this file.
        fs.closeSync(this.dfd);
        this.dfd = -1;
        this.put(this.fd, data, head, whole);
        this.cachedBytes += whole;
      }
      this.put(this.fd, data, head + whole, len - head - whole);
      this.cachedBytes += len - whole;
      return;
    }
    this.put(this.fd, data, 0, len);
    this.cachedBytes += len;
  }

  /** Cuts the file back to `size` bytes (after a failed append). */
  truncate(size: number): void {
    if (this.ownsFd) fs.ftruncateSync(this.fd, size);
    this.size = size;
  }

  close(): void {
    if (this.dfd >= 0) fs.closeSync(this.dfd);
    this.dfd = -1;
    if (this.ownsFd) fs.closeSync(this.fd);
  }

  /** Writes data[off, off+len) at the end of the file, all of it (short writes continue). */
  private put(fd: number, data: Uint8Array, off: number, len: number): void {
    while (len > 0) {
      let n: number;
      try {
        n = this.ownsFd ? fs.writeSync(fd, data, off, len, this.size) : fs.writeSync(fd, data, off, len);
      } catch (err) {
        // A non-blocking pipe (standard output) that is full: wait for the reader.
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
        Atomics.wait(SLEEP, 0, 0, 1);
        continue;
      }
      off += n;
      len -= n;
      this.size += n;
    }
  }
}

const SLEEP = new Int32Array(new SharedArrayBuffer(4));
