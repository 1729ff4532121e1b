/**
 * A flow keeps no header templates, only its compact wire state: the template written from it must
 * be byte for byte the one built from the endpoints, for both families, both directions, and
 * whichever side Envoy is.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Endpoint } from '../../src/flow/address.js';
import { TcpFlow, isLocalServer } from '../../src/flow/tcp-flow.js';
import { buildTemplate, headerLength } from '../../src/packet/frame-template.js';

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
