/**
 * The broker spool: FIFO in sequence order across segments, reading back batches whose writes are
 * still pending, persistence across reopen (and after a crash: torn tail cut, acknowledged batches
 * skipped), the byte cap, acknowledgement deleting segments, rewind after a broken connection,
 * corruption detected by CRC, and the lock.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/control/logger.js';
import { BATCH_HEADER, crc32, Spool, SpoolLockedError, type SpoolBatch } from '../../src/sink/spool.js';

const log = silentLogger();
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-spool-'));
  dirs.push(d);
  return d;
}

function batch(firstSeq: number, count: number, size = 1000): SpoolBatch {
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i++) data[i] = (firstSeq * 7 + i) & 0xff;
  return { firstSeq, count, format: 'pcap', data };
}

async function readAll(s: Spool): Promise<SpoolBatch[]> {
  const out: SpoolBatch[] = [];
  for (let b = await s.read(); b; b = await s.read()) out.push({ ...b, data: Buffer.from(b.data) });
  return out;
}

describe('Spool', () => {
  it('returns batches in order, from memory while pending and from disk after, across segments', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 10 << 20, segmentBytes: 4096 }, log);
    for (let i = 0; i < 10; i++) expect(s.append(batch(i * 10, 10))).toBe(true);
    const early = await s.read(); // may still be pending: served from memory
    expect(early!.firstSeq).toBe(0);
    await s.flush();
    expect(s.segmentFiles().length).toBeGreaterThanOrEqual(3); // 4 KiB segments hold 3 batches
    const rest = await readAll(s);
    expect(rest.map((b) => b.firstSeq)).toEqual([10, 20, 30, 40, 50, 60, 70, 80, 90]);
    expect(rest[4]!.data.equals(batch(50, 10).data)).toBe(true);
    expect(s.records).toBe(100);
    await s.close();
  });

  it('refuses appends out of sequence order', () => {
    const s = Spool.open(tmp(), { maxBytes: 1 << 20 }, log);
    s.append(batch(100, 10));
    expect(() => s.append(batch(50, 10))).toThrow(/out of order/);
  });

  it('survives a reopen: unacknowledged batches come back in order, acknowledged ones do not', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 10 << 20, segmentBytes: 4096 }, log);
    for (let i = 0; i < 6; i++) s.append(batch(i * 5, 5));
    await s.flush();
    s.ack(15); // batches 0, 5, 10 delivered
    s.saveMeta({ version: 1, streamId: 'a'.repeat(32), nextSeq: 30, leaseEnd: 1000, clean: true, ackedSeq: 15 });
    await s.close();

    const again = Spool.open(dir, { maxBytes: 10 << 20, segmentBytes: 4096 }, log);
    expect(again.meta!.streamId).toBe('a'.repeat(32));
    expect(again.records).toBe(15);
    const got = await readAll(again);
    expect(got.map((b) => b.firstSeq)).toEqual([15, 20, 25]);
    expect(got[0]!.data.equals(batch(15, 5).data)).toBe(true);
    expect(again.endSeq).toBe(30);
    await again.close();
  });

  it('cuts a torn tail left by a crash and keeps every whole batch', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 10 << 20 }, log);
    for (let i = 0; i < 3; i++) s.append(batch(i, 1, 500));
    await s.flush();
    const [seg] = s.segmentFiles();
    // Simulate a crash: no close (the lock stays, held by our own pid), half a batch appended.
    const half = Buffer.concat([Buffer.alloc(BATCH_HEADER, 0x4d), Buffer.alloc(100)]);
    fs.appendFileSync(seg!, half);
    fs.writeFileSync(path.join(dir, 'lock'), '999999999\n'); // a pid that is not alive
    const again = Spool.open(dir, { maxBytes: 10 << 20 }, log);
    expect(again.recovered.tornBytes).toBe(half.length);
    expect((await readAll(again)).map((b) => b.firstSeq)).toEqual([0, 1, 2]);
    expect(fs.statSync(seg!).size).toBe(3 * (BATCH_HEADER + 500));
    await again.close();
  });

  it('enforces the byte cap and says why it refuses', async () => {
    const s = Spool.open(tmp(), { maxBytes: 3 * (BATCH_HEADER + 1000) }, log);
    expect(s.append(batch(0, 1))).toBe(true);
    expect(s.append(batch(1, 1))).toBe(true);
    expect(s.append(batch(2, 1))).toBe(true);
    expect(s.canAccept(1000)).toBe(false);
    expect(s.refusal(1000)).toBe('full');
    expect(s.append(batch(3, 1))).toBe(false);
    await s.flush();
    // Acknowledged batches free their space once their segment is done with.
    await s.read();
    await s.read();
    await s.read();
    s.ack(3);
    expect(s.bytes).toBe(0);
    expect(s.append(batch(3, 1))).toBe(true);
    await s.close();
  });

  it('deletes a segment only when every batch in it is acknowledged', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 10 << 20, segmentBytes: 2 * (BATCH_HEADER + 1000) }, log);
    for (let i = 0; i < 4; i++) s.append(batch(i * 10, 10));
    await s.flush();
    const segs = s.segmentFiles();
    expect(segs).toHaveLength(2);
    await readAll(s);
    s.ack(10); // half of the first segment
    await new Promise((r) => setTimeout(r, 20));
    expect(fs.existsSync(segs[0]!)).toBe(true);
    s.ack(20);
    await new Promise((r) => setTimeout(r, 20));
    expect(fs.existsSync(segs[0]!)).toBe(false);
    expect(fs.existsSync(segs[1]!)).toBe(true);
    await s.close();
  });

  it('rewinds to the first unacknowledged batch after a broken connection', async () => {
    const s = Spool.open(tmp(), { maxBytes: 10 << 20 }, log);
    for (let i = 0; i < 4; i++) s.append(batch(i * 10, 10));
    await s.flush();
    expect((await readAll(s)).length).toBe(4);
    s.ack(20);
    s.rewind();
    expect((await readAll(s)).map((b) => b.firstSeq)).toEqual([20, 30]);
    await s.close();
  });

  it('skips a corrupt batch (CRC) and reports it', async () => {
    const dir = tmp();
    const corrupt: number[] = [];
    const s = Spool.open(dir, { maxBytes: 10 << 20, onCorrupt: (n) => corrupt.push(n) }, log);
    for (let i = 0; i < 3; i++) s.append(batch(i * 10, 10));
    await s.flush();
    const [seg] = s.segmentFiles();
    const fd = fs.openSync(seg!, 'r+');
    fs.writeSync(fd, Buffer.from([0xff, 0xfe]), 0, 2, BATCH_HEADER + 1000 + BATCH_HEADER + 17); // payload of batch 2
    fs.closeSync(fd);
    expect((await readAll(s)).map((b) => b.firstSeq)).toEqual([0, 20]);
    expect(corrupt).toEqual([10]);
    await s.close();
  });

  it('sorts batches written at shutdown into place (appendSync)', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 10 << 20 }, log);
    s.append(batch(20, 10));
    await s.flush();
    expect(s.appendSync(batch(0, 10))).toBe(true);
    expect(s.appendSync(batch(30, 10))).toBe(true);
    await s.close();
    const again = Spool.open(dir, { maxBytes: 10 << 20 }, log);
    expect((await readAll(again)).map((b) => b.firstSeq)).toEqual([0, 20, 30]);
    await again.close();
  });

  it('is locked against a second live user', async () => {
    const dir = tmp();
    const s = Spool.open(dir, { maxBytes: 1 << 20 }, log);
    fs.writeFileSync(path.join(dir, 'lock'), `${process.ppid}\n`); // a live process that is not us
    expect(() => Spool.open(dir, { maxBytes: 1 << 20 }, log)).toThrow(SpoolLockedError);
    await s.close();
  });

  it('computes CRC-32 (IEEE)', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
  });
});
