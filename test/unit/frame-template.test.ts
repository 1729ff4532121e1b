/**
 * A flow keeps no header templates, only its compact wire state: the template written from it must
 * be byte for byte the one built here from the endpoints, field by field (an independent reference),
 * for both families, both directions, and whichever side Envoy is.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow, isLocalServer } from '../../src/flow/tcp-flow.js';
import { headerLength } from '../../src/packet/frame-template.js';

const MAC_ENVOY = [0x02, 0x6d, 0x63, 0x00, 0x00, 0x01];
const MAC_PEER = [0x02, 0x6d, 0x63, 0x00, 0x00, 0x02];

/** The header of a segment from `src` to `dst`, variable fields zero (lengths, id, seq, ack, flags, checksums). */
function buildTemplate(src: Endpoint, dst: Endpoint, srcIsEnvoy: boolean): Buffer {
  const t = Buffer.alloc(src.v6 ? 74 : 54);
  t.set(srcIsEnvoy ? MAC_PEER : MAC_ENVOY, 0); // destination MAC
  t.set(srcIsEnvoy ? MAC_ENVOY : MAC_PEER, 6); // source MAC
  let o = 14;
  if (!src.v6) {
    t.writeUInt16BE(0x0800, 12);
    t[o] = 0x45; // version 4, IHL 5
    t[o + 6] = 0x40; // DF
    t[o + 8] = 64; // TTL
    t[o + 9] = 6; // TCP
    t.set(src.ip, o + 12);
    t.set(dst.ip, o + 16);
    o += 20;
  } else {
    t.writeUInt16BE(0x86dd, 12);
    t[o] = 0x60; // version 6
    t[o + 6] = 6; // next header: TCP
    t[o + 7] = 64; // hop limit
    t.set(src.ip, o + 8);
    t.set(dst.ip, o + 24);
    o += 40;
  }
  t.writeUInt16BE(src.port, o);
  t.writeUInt16BE(dst.port, o + 2);
  t[o + 12] = 5 << 4; // data offset: 20 bytes
  t.writeUInt16BE(0xffff, o + 14); // window
  return t;
}

const endpoint = (v6: boolean) =>
  fc.record({
    ip: fc.uint8Array({ minLength: v6 ? 16 : 4, maxLength: v6 ? 16 : 4 }),
    port: fc.integer({ min: 0, max: 65535 }),
    synthetic: fc.boolean(),
  });

describe('header templates from the wire state', () => {
  it('equal buildTemplate() of the endpoints, and the endpoints read back unchanged', () => {
    fc.assert(
      fc.property(
        fc.boolean().chain((v6) => fc.tuple(fc.constant(v6), endpoint(v6), endpoint(v6))),
        ([v6, l, r]) => {
          const local: Endpoint = { v6, ...l };
          const remote: Endpoint = { v6, ...r };
          const flow = new TcpFlow(1, 'n', 7, local, remote, 1460, true, '');
          const localIsServer = isLocalServer(local, remote);
          const client = localIsServer ? remote : local;
          const server = localIsServer ? local : remote;
          // Direction 0 is client → server; the MACs say which side is Envoy.
          expect(flow.template(0)).toEqual(buildTemplate(client, server, !localIsServer));
          expect(flow.template(1)).toEqual(buildTemplate(server, client, localIsServer));
          expect(flow.template(0).length).toBe(headerLength(v6));
          expect(flow.local).toEqual(local);
          expect(flow.remote).toEqual(remote);
          expect(flow.dirFlag(flow.readDir)).toBe(1); // inbound: what Envoy received
          expect(flow.dirFlag(flow.writeDir)).toBe(2);
        },
      ),
      { numRuns: 300 },
    );
  });
});
