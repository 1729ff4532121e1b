/**
 * The TCP state of one tapped connection: who is client and server, the next sequence number and
 * IP id each way, the header templates, and what meshcap still has to say about it (comments for
 * the next packet of a direction, gaps). Direction d is 0 for client → server, 1 for server → client.
 */
import { buildTemplate, pseudoHeaderSum } from '../packet/frame-template.js';
import { Direction } from '../packet/block.js';
import type { WireState } from '../packet/slicer.js';
import { fnv1a, type Endpoint } from './address.js';

export const CLIENT_TO_SERVER = 0;
export const SERVER_TO_CLIENT = 1;

export class TcpFlow implements WireState {
  readonly v6: boolean;
  readonly mss: number;
  tmpl: Buffer[];
  pseudo: number[];
  dirFlag: number[];
  seq: number[];
  ipId: number[];
  fin = [false, false];
  /** Direction of Envoy's reads (remote → local) and writes (local → remote). */
  readonly readDir: number;
  readonly writeDir: number;
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
  note: (string | null)[] = [null, null];
  drop = [0, 0];
  /** Said once on the first packet of the flow. */
  intro: string;

  constructor(
    readonly id: number,
    readonly nodeId: string,
    readonly traceId: number | string,
    readonly local: Endpoint,
    readonly remote: Endpoint,
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
    this.writeDir = this.readDir ^ 1;
    this.tmpl = [buildTemplate(client, server, !localIsServer), buildTemplate(server, client, localIsServer)];
    this.pseudo = [pseudoHeaderSum(client, server), pseudoHeaderSum(server, client)];
    this.dirFlag = localIsServer ? [Direction.Inbound, Direction.Outbound] : [Direction.Outbound, Direction.Inbound];
    // Deterministic initial sequence numbers and IP ids: the same trace gives the same capture.
    const key = `${nodeId}/${traceId}`;
    this.seq = [fnv1a(`${key}/c`), fnv1a(`${key}/s`)];
    this.ipId = [fnv1a(`${key}/ic`) & 0xffff, fnv1a(`${key}/is`) & 0xffff];
  }

  get client(): Endpoint {
    return this.readDir === CLIENT_TO_SERVER ? this.remote : this.local;
  }

  get server(): Endpoint {
    return this.readDir === CLIENT_TO_SERVER ? this.local : this.remote;
  }

  addNote(d: number, text: string, drop: number): void {
    const prev = this.note[d];
    this.note[d] = prev ? `${prev}; ${text}` : text;
    this.drop[d]! += drop;
  }

  /** Takes the pending note of direction d (with the intro on the flow's first packet). */
  takeNote(d: number): Buffer | null {
    let text = this.note[d] ?? null;
    if (this.intro) {
      text = text ? `${this.intro}; ${text}` : this.intro;
      this.intro = '';
    }
    this.note[d] = null;
    return text ? Buffer.from(text) : null;
  }

  takeDrop(d: number): number {
    const n = this.drop[d]!;
    this.drop[d] = 0;
    return n;
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
