/**
 * A disk that cannot keep up: the file sink drops whole blocks (never waits), counts them, and
 * leaves a marker where they are missing: an interface statistics block with a comment.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { silentLogger } from '../../src/control/logger.js';
import { PipelineStats } from '../../src/control/stats.js';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import { BlockPool, type Block } from '../../src/packet/block.js';
import { Slicer } from '../../src/packet/slicer.js';
import { FileSink } from '../../src/sink/file-sink.js';
import { parseCapture } from '../helpers/pcap-read.js';

const ep = (last: number, port: number): Endpoint => ({ v6: false, ip: Uint8Array.from([10, 0, 0, last]), port, synthetic: false });

describe('FileSink under backpressure', () => {
  it('drops blocks it cannot queue, counts them, and marks the spot in the file', async () => {
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'meshcap-loss-')), 'out.pcapng');
    const stats = new PipelineStats();
    const sink = new FileSink({ path: file, framer: pcapngFramer, snaplen: 262144, maxFileBytes: 0, rotateSeconds: 0, ringFiles: 0, maxQueuedBlocks: 1 }, stats, silentLogger());
    const pool = new BlockPool(8, 64 * 1024, pcapngFramer);
    const flow = new TcpFlow(1, 'n', 1, ep(1, 443), ep(2, 40000), 1460, true, '');
    const released: Block[] = [];
    const fill = (): Block => {
      const out = { current: pool.acquire(), rotate: () => null };
      new Slicer(out, { snaplen: 262144 }).data(flow, 1, Buffer.alloc(3000, 1), 1_700_000_000, 0, null, 0);
      return out.current!;
    };
    const blocks = [fill(), fill(), fill()];
    // One block in flight fills the queue bound: the next two are dropped at once.
    for (const b of blocks) sink.write(b, (x) => released.push(x));
    expect(stats.dropsOf('sink_backpressure')).toBe(blocks[1]!.count + blocks[2]!.count);
    // The writer thread hands the first block back once it is on disk; the queue has room again.
    await vi.waitFor(() => expect(released.length).toBe(3), { timeout: 5000 });
    sink.write(fill(), (x) => released.push(x));
    await sink.close();
    expect(released.length).toBe(4);
    const raw = fs.readFileSync(file);
    // Written: the first block, then a statistics block saying why packets are missing, then the last.
    const isbComment = raw.indexOf('packets dropped here: the disk could not keep up');
    expect(isbComment).toBeGreaterThan(0);
    expect(raw.readUInt32LE(raw.lastIndexOf(Buffer.from([5, 0, 0, 0]), isbComment))).toBe(5);
    expect(parseCapture(raw).packets.length).toBe(blocks[0]!.count * 2);
  });
});
