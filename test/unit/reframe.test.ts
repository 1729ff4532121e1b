import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow } from '../../src/flow/tcp-flow.js';
import { pcapFramer, pcapNsFramer } from '../../src/format/pcap.js';
import { pcapngFramer } from '../../src/format/pcapng.js';
import { reframeBlock, reframedSizeBound } from '../../src/format/reframe.js';
import { BlockPool } from '../../src/packet/block.js';
import { Slicer } from '../../src/packet/slicer.js';
import { parseCapture } from '../helpers/pcap-read.js';

const ep = (last: number, port: number): Endpoint => ({ v6: false, ip: Uint8Array.from([10, 0, 0, last]), port, synthetic: false });

describe('reframeBlock', () => {
  for (const [from, to] of [
    [pcapngFramer, pcapFramer],
    [pcapFramer, pcapngFramer],
    [pcapngFramer, pcapNsFramer],
  ] as const) {
    it(`turns ${from.name} records into ${to.name} records with the same frames and times`, () => {
      const pool = new BlockPool(1, 64 * 1024, from);
      const out = { current: pool.acquire(), rotate: () => null };
      const slicer = new Slicer(out, { snaplen: 262144 });
      const flow = new TcpFlow(1, 'n', 1, ep(1, 443), ep(2, 40000), 1460, true, '');
      slicer.control(flow, 0, 0x02, 1_700_000_000, 123_456_789, Buffer.from('hello'), 0);
      slicer.data(flow, 1, Buffer.alloc(5000, 7), 1_700_000_001, 5, null, 2);
      const block = out.current!;
      const buf = Buffer.alloc(reframedSizeBound(block.size, from, to));
      const n = reframeBlock(block, to, buf);
      const file = parseCapture(Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf.subarray(0, n)]));
      expect(file.packets.length).toBe(block.count);
      file.packets.forEach((p, i) => {
        expect(p.data.equals(block.frame(i))).toBe(true);
        const ns = BigInt(block.tsSec[i]!) * 1_000_000_000n + BigInt(block.tsNsec[i]!);
        expect(p.tsNs).toBe(to === pcapFramer ? (ns / 1000n) * 1000n : ns);
      });
      // Only the selected frames, when a filter is given.
      const some = reframeBlock(block, to, buf, (i) => i % 2 === 0);
      expect(parseCapture(Buffer.concat([to.fileHeader({ snaplen: 262144 }), buf.subarray(0, some)])).packets.length).toBe(Math.ceil(block.count / 2));
    });
  }
});
