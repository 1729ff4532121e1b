/**
 * The TCP state of one tapped connection: who is client and server, the next sequence number and
 * IP id each way, and what meshcap still has to say about it (comments for the next packet of a
 * direction, gaps). Direction d is 0 for client → server, 1 for server → client.
 *
 * A flow table holds hundreds of thousands of these, mostly idle, so a flow is kept small: scalar
 * fields, and the per-direction numbers and both addresses in one 64-byte Uint32Array (the wire
 * state of frame-template.ts, which V8 stores inside the object's own heap allocation). Header
 * templates are written from it when the slicer needs them, not kept per flow.
 */
import { Direction } from '../packet/block.js';
import {
  W_CLIENT,
  W_FLAGS,
  W_IPID,
  W_PORTS,
  W_PSEUDO,
  W_SEQ,
  W_SERVER,
  WF_CLIENT_SYNTHETIC,
  WF_ENVOY_SERVER,
  WF_SERVER_SYNTHETIC,
  WIRE_WORDS,
  getAddress,
  headerLength,
  pseudoHeaderSum,
  putAddress,
  writeTemplate,
} from '../packet/frame-template.js';
import type { WireState } from '../packet/slicer.js';
import { fnv1a, type Endpoint } from './address.js';

export const CLIENT_TO_SERVER = 0;
export const SERVER_TO_CLIENT = 1;

export class TcpFlow implements WireState {
  readonly v6: boolean;
  readonly mss: number;
  /** Sequence numbers, IP ids, pseudo-header sums and addresses (frame-template.ts layout). */
  readonly wire: Uint32Array;
  /** Direction of Envoy's reads (remote → local); its writes go the other way. */
  readonly readDir: number;
  /** FIN sent, per direction (bit d). */
  finBits = 0;
  /** Handshake (or mid-stream start) written. */
  started = false;
  /** The flow was opened by a connection message; false when its start was never seen. */
  readonly sawStart: boolean;
  /** Next expected Envoy seq_num (Envoy >= 1.37), -1 until known. */
  envoySeq = -1;
  lastDir = -1;
  lastTruncated = false;
  lastTsSec = 0;
  lastTsNsec = 0;
  lastActivityMs = 0;
  /** Text to attach to the next packet of each direction, and packets known lost before it. */
  private note0: string | null = null;
  private note1: string | null = null;
  private drop0 = 0;
  private drop1 = 0;
  /** Said once on the first packet of the flow. */
  intro: string;

  constructor(
    readonly id: number,
    readonly nodeId: string,
    readonly traceId: number | string,
    local: Endpoint,
    remote: Endpoint,
    mss: number,
    sawStart: boolean,
    intro: string,
  ) {
    this.v6 = local.v6;
    this.mss = mss;
    this.sawStart = sawStart;
    this.intro = intro;
    const localIsServer = isLocalServer(local, remote);
    const client = localIsServer ? remote : local;
    const server = localIsServer ? local : remote;
    this.readDir = localIsServer ? CLIENT_TO_SERVER : SERVER_TO_CLIENT;
    const w = new Uint32Array(WIRE_WORDS);
    // Deterministic initial sequence numbers and IP ids: the same trace gives the same capture.
    const key = `${nodeId}/${traceId}`;
    w[W_SEQ] = fnv1a(`${key}/c`);
    w[W_SEQ + 1] = fnv1a(`${key}/s`);
    w[W_IPID] = fnv1a(`${key}/ic`) & 0xffff;
    w[W_IPID + 1] = fnv1a(`${key}/is`) & 0xffff;
    w[W_PSEUDO] = pseudoHeaderSum(client, server);
    w[W_PSEUDO + 1] = pseudoHeaderSum(server, client);
    putAddress(w, W_CLIENT, client.ip);
    putAddress(w, W_SERVER, server.ip);
    w[W_PORTS] = ((client.port << 16) | server.port) >>> 0;
    w[W_FLAGS] = (localIsServer ? WF_ENVOY_SERVER : 0) | (client.synthetic ? WF_CLIENT_SYNTHETIC : 0) | (server.synthetic ? WF_SERVER_SYNTHETIC : 0);
    this.wire = w;
  }

  /** Direction of Envoy's writes (local → remote). */
  get writeDir(): number {
    return this.readDir ^ 1;
  }

  /** Next sequence number of direction d. */
  seqOf(d: number): number {
    return this.wire[W_SEQ + d]!;
  }

  /** Moves direction d's sequence space on by n bytes (SYN/FIN: 1; a gap: the lost bytes). */
  advanceSeq(d: number, n: number): void {
    this.wire[W_SEQ + d] = (this.wire[W_SEQ + d]! + n) >>> 0;
  }

  /** pcapng direction flag of direction d, relative to Envoy. */
  dirFlag(d: number): number {
    return d === this.readDir ? Direction.Inbound : Direction.Outbound;
  }

  finSent(d: number): boolean {
    return (this.finBits & (1 << d)) !== 0;
  }

  markFin(d: number): void {
    this.finBits |= 1 << d;
  }

  get client(): Endpoint {
    return this.endpoint(W_CLIENT, this.wire[W_PORTS]! >>> 16, WF_CLIENT_SYNTHETIC);
  }

  get server(): Endpoint {
    return this.endpoint(W_SERVER, this.wire[W_PORTS]! & 0xffff, WF_SERVER_SYNTHETIC);
  }

  /** Envoy's side (allocates: for filters and logs). */
  get local(): Endpoint {
    return this.readDir === CLIENT_TO_SERVER ? this.server : this.client;
  }

  get remote(): Endpoint {
    return this.readDir === CLIENT_TO_SERVER ? this.client : this.server;
  }

  /** The header template of direction d as a new Buffer (tests, slow paths). */
  template(d: number): Buffer {
    const t = Buffer.alloc(headerLength(this.v6));
    writeTemplate(this.wire, this.v6, d, t, 0);
    return t;
  }

  addNote(d: number, text: string, drop: number): void {
    if (d === 0) {
      this.note0 = this.note0 ? `${this.note0}; ${text}` : text;
      this.drop0 += drop;
    } else {
      this.note1 = this.note1 ? `${this.note1}; ${text}` : text;
      this.drop1 += drop;
    }
  }

  /** Takes the pending note of direction d (with the intro on the flow's first packet). */
  takeNote(d: number): Buffer | null {
    let text = d === 0 ? this.note0 : this.note1;
    if (text === null && !this.intro) return null;
    if (this.intro) {
      text = text ? `${this.intro}; ${text}` : this.intro;
      this.intro = '';
    }
    if (d === 0) this.note0 = null;
    else this.note1 = null;
    return Buffer.from(text!);
  }

  takeDrop(d: number): number {
    const n = d === 0 ? this.drop0 : this.drop1;
    if (d === 0) this.drop0 = 0;
    else this.drop1 = 0;
    return n;
  }

  private endpoint(at: number, port: number, syntheticBit: number): Endpoint {
    return { v6: this.v6, ip: getAddress(this.wire, at, this.v6), port, synthetic: (this.wire[W_FLAGS]! & syntheticBit) !== 0 };
  }
}

/**
 * Envoy's side is the server of a listener (downstream) connection, which is the common case. On
 * an upstream connection Envoy is the client: recognised when Envoy's port is ephemeral (Linux
 * range, >= 32768) and the peer's is not.
 */
export function isLocalServer(local: Endpoint, remote: Endpoint): boolean {
  return !(local.port >= 32768 && remote.port < 32768 && !local.synthetic);
}
