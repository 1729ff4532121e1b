/**
 * FlowTable: per-connection TCP state keyed by (Envoy node, trace id), driving the slicer.
 *
 * It turns Envoy's view of a connection (connection opened, bytes read, bytes written, closed)
 * into a TCP conversation: a 3-way handshake when the connection starts, data segments with
 * continuous sequence numbers both ways, FIN on write.end_stream, FIN/ACK teardown on close. What
 * it cannot know it marks instead of inventing: a connection whose start was not seen begins
 * mid-stream; bytes Envoy lost (seq_num gaps) advance the sequence number so Wireshark shows the
 * gap, with a packet comment and a drop count.
 */
import type { Logger } from 'pino';
import { LogLimiter } from '../control/log-limiter.js';
import type { PipelineStats } from '../control/stats.js';
import { EventKind, TraceTruncation, type StreamIdentity, type TapConnection, type TapEvent } from '../ingest/tap-event.js';
import { TCP_ACK, TCP_FIN, TCP_SYN } from '../packet/frame-template.js';
import type { Slicer } from '../packet/slicer.js';
import { formatEndpoint, resolveEndpoints } from './address.js';
import { CLIENT_TO_SERVER, SERVER_TO_CLIENT, TcpFlow } from './tcp-flow.js';

export interface FlowTableOptions {
  /** Segment size for IPv4 and IPv6 flows. */
  mss4: number;
  mss6: number;
  /** Flows with no event for this long are freed. */
  idleTimeoutMs: number;
  /** At most this many open flows; new ones beyond it are refused and counted. */
  maxFlows: number;
}

const UNKNOWN_CONNECTION: TapConnection = { local: { kind: 'unknown' }, remote: { kind: 'unknown' } };

export class FlowTable {
  private readonly nodes = new Map<string, Map<number | string, TcpFlow>>();
  /** Open flows by flow id (block.flowId), for flowInfo(). */
  private readonly byId = new Map<number, TcpFlow>();
  private nextId = 1;
  size = 0;
  private readonly limiter: LogLimiter;

  constructor(
    private readonly slicer: Slicer,
    private readonly opts: FlowTableOptions,
    private readonly stats: PipelineStats,
    private readonly log: Logger,
  ) {
    this.limiter = new LogLimiter(log);
  }

  handle(stream: StreamIdentity, ev: TapEvent, nowMs: number): void {
    let byTrace = this.nodes.get(stream.nodeId);
    if (!byTrace) {
      byTrace = new Map();
      this.nodes.set(stream.nodeId, byTrace);
    }
    let flow = byTrace.get(ev.traceId);
    switch (ev.kind) {
      case EventKind.Connection:
        if (!flow) this.open(byTrace, stream, ev, ev.connection ?? UNKNOWN_CONNECTION, true, nowMs);
        else if (!flow.started && ev.connection) {
          // A repeated connection message before any data (Envoy reconnect): take the newer one.
          byTrace.delete(ev.traceId);
          this.byId.delete(flow.id);
          this.size--;
          this.stats.flowsOpened--;
          this.open(byTrace, stream, ev, ev.connection, true, nowMs);
        }
        return;
      case EventKind.Read:
      case EventKind.Write:
        if (!flow) {
          this.reject(stream, 'unknown_flow', `${ev.kind === EventKind.Read ? 'read' : 'write'} for trace ${ev.traceId} whose connection was not seen: starting it mid-stream`);
          flow = this.open(byTrace, stream, ev, ev.connection ?? UNKNOWN_CONNECTION, false, nowMs) ?? undefined;
          if (!flow) {
            this.stats.drop('flow_table_full', 1);
            return;
          }
        }
        this.data(stream, flow, ev, nowMs);
        return;
      case EventKind.Closed:
        if (!flow) {
          this.reject(stream, 'closed_unknown_flow', `close for trace ${ev.traceId}, which is not open (closed twice, or never seen)`);
          return;
        }
        this.close(stream, byTrace, flow, ev, nowMs);
        return;
    }
  }

  /**
   * Read-only: the open flow with this id (block.flowId), for sinks that need a flow's node and
   * endpoints (live viewers' filters); undefined once it is closed or expired. Do not mutate it.
   */
  flowInfo(id: number): Readonly<TcpFlow> | undefined {
    return this.byId.get(id);
  }

  /** Frees flows idle for longer than the idle timeout. */
  sweep(nowMs: number): number {
    const deadline = nowMs - this.opts.idleTimeoutMs;
    let freed = 0;
    for (const [node, byTrace] of this.nodes) {
      for (const [traceId, flow] of byTrace) {
        if (flow.lastActivityMs < deadline) {
          byTrace.delete(traceId);
          this.byId.delete(flow.id);
          freed++;
        }
      }
      if (byTrace.size === 0) this.nodes.delete(node);
    }
    if (freed > 0) {
      this.size -= freed;
      this.stats.flowsExpired += freed;
      this.stats.flowsActive = this.size;
      this.log.info({ freed, open: this.size }, 'idle flows timed out');
    }
    return freed;
  }

  private open(byTrace: Map<number | string, TcpFlow>, stream: StreamIdentity, ev: TapEvent, conn: TapConnection, sawStart: boolean, nowMs: number): TcpFlow | null {
    if (this.size >= this.opts.maxFlows) {
      this.reject(stream, 'flow_table_full', `flow table full (${this.opts.maxFlows} flows): trace ${ev.traceId} not captured`);
      return null;
    }
    const { local, remote } = resolveEndpoints(conn.local, conn.remote, ev.traceId);
    const mss = local.v6 ? this.opts.mss6 : this.opts.mss4;
    const intro =
      `meshcap: envoy node=${stream.nodeId} tap_id=${stream.tapId} trace_id=${ev.traceId} ` +
      `local=${formatEndpoint(local)} remote=${formatEndpoint(remote)} via=${stream.source}` +
      (sawStart ? '' : '; connection start not seen, capture begins mid-stream');
    const flow = new TcpFlow(this.nextId++ >>> 0, stream.nodeId, ev.traceId, local, remote, mss, sawStart, intro);
    flow.lastActivityMs = nowMs;
    byTrace.set(ev.traceId, flow);
    this.byId.set(flow.id, flow);
    this.size++;
    this.stats.flowsOpened++;
    this.stats.flowsActive = this.size;
    return flow;
  }

  private data(stream: StreamIdentity, flow: TcpFlow, ev: TapEvent, nowMs: number): void {
    flow.lastActivityMs = nowMs;
    const d = ev.kind === EventKind.Read ? flow.readDir : flow.writeDir;
    let payload = ev.payload;
    let len = payload ? payload.length : 0;
    if (ev.seqNum >= 0) {
      if (flow.envoySeq >= 0 && ev.seqNum !== flow.envoySeq) {
        if (ev.seqNum > flow.envoySeq) {
          this.gap(flow, flow.lastTruncated ? flow.lastDir : d, ev.seqNum - flow.envoySeq);
        } else {
          // Bytes Envoy already delivered: skip them rather than show a retransmission.
          const overlap = flow.envoySeq - ev.seqNum;
          if (overlap >= len) {
            this.stats.drop('duplicate_event', 1);
            this.warn(stream, 'duplicate_event', `trace ${ev.traceId}: event seq_num ${ev.seqNum} already delivered; skipped`);
            return;
          }
          payload = payload!.subarray(overlap);
          len -= overlap;
          ev.seqNum += overlap;
        }
      }
      flow.envoySeq = ev.seqNum + len;
    }
    this.stamp(stream, flow, ev, nowMs);
    if (!flow.started) this.start(flow, ev);
    if (ev.truncated) {
      // Without seq_num the size of the cut is unknown; with it, the next event reveals it.
      flow.addNote(d, `Envoy truncated this event's payload at max_buffered_${ev.kind === EventKind.Read ? 'rx' : 'tx'}_bytes; bytes after it are missing`, 0);
      this.stats.drop('envoy_truncated', 1);
    }
    flow.lastDir = d;
    flow.lastTruncated = ev.truncated;
    if (len > 0) {
      const res = this.slicer.data(flow, d, payload!, ev.tsSec, ev.tsNsec, flow.takeNote(d), flow.takeDrop(d));
      this.stats.packets += res.packets;
      this.stats.payloadBytes += res.bytes;
      if (res.dropped > 0) this.noBuffer(flow, d, res.dropped);
    }
    if (ev.kind === EventKind.Write && ev.endStream && !flow.finSent(d)) {
      this.control(flow, d, TCP_FIN | TCP_ACK, ev);
      flow.markFin(d);
    }
  }

  private close(stream: StreamIdentity, byTrace: Map<number | string, TcpFlow>, flow: TcpFlow, ev: TapEvent, nowMs: number): void {
    if (ev.seqNum >= 0 && flow.envoySeq >= 0 && ev.seqNum > flow.envoySeq + 1 && flow.lastDir >= 0) {
      // closed carries previous + 1; more than that means bytes went missing before the close.
      this.gap(flow, flow.lastDir, ev.seqNum - flow.envoySeq - 1);
    }
    this.stamp(stream, flow, ev, nowMs);
    if (!flow.started) this.start(flow, ev);
    if (ev.traceTruncation & TraceTruncation.Read) this.bufferLimit(flow, flow.readDir, 'reads', 'rx');
    if (ev.traceTruncation & TraceTruncation.Write) this.bufferLimit(flow, flow.writeDir, 'writes', 'tx');
    // Envoy closed the socket: its FIN first (unless end_stream already sent it), the peer's
    // FIN/ACK, Envoy's final ACK.
    const envoy = flow.writeDir;
    const peer = flow.readDir;
    if (!flow.finSent(envoy)) this.control(flow, envoy, TCP_FIN | TCP_ACK, ev);
    if (!flow.finSent(peer)) this.control(flow, peer, TCP_FIN | TCP_ACK, ev);
    this.control(flow, envoy, TCP_ACK, ev);
    byTrace.delete(flow.traceId);
    this.byId.delete(flow.id);
    this.size--;
    this.stats.flowsClosed++;
    this.stats.flowsActive = this.size;
  }

  /** The handshake, or for a flow whose start was not seen, nothing (it begins mid-stream). */
  private start(flow: TcpFlow, ev: TapEvent): void {
    flow.started = true;
    if (!flow.sawStart) return;
    this.control(flow, CLIENT_TO_SERVER, TCP_SYN, ev);
    this.control(flow, SERVER_TO_CLIENT, TCP_SYN | TCP_ACK, ev);
    this.control(flow, CLIENT_TO_SERVER, TCP_ACK, ev);
  }

  private control(flow: TcpFlow, d: number, flags: number, ev: TapEvent): void {
    const comment = flow.takeNote(d);
    const drop = flow.takeDrop(d);
    if (this.slicer.control(flow, d, flags, ev.tsSec, ev.tsNsec, comment, drop)) this.stats.packets++;
    else this.noBuffer(flow, d, 1);
  }

  /** Bytes lost before meshcap saw them: advance the sequence space so the gap shows. */
  private gap(flow: TcpFlow, d: number, bytes: number): void {
    const packets = Math.max(1, Math.ceil(bytes / flow.mss));
    flow.advanceSeq(d, bytes);
    flow.addNote(d, `${bytes} bytes missing before this segment (Envoy seq_num gap)`, packets);
    this.stats.lostBytes += bytes;
    this.stats.drop('envoy_seq_gap', packets);
  }

  private bufferLimit(flow: TcpFlow, d: number, what: string, rxtx: string): void {
    flow.addNote(d, `Envoy stopped recording ${what} at max_buffered_${rxtx}_bytes; later bytes of this direction are missing`, 1);
    this.stats.drop('envoy_buffer_limit', 1);
  }

  private noBuffer(flow: TcpFlow, d: number, packets: number): void {
    this.stats.drop('no_buffer', packets);
    flow.addNote(d, `meshcap dropped ${packets} packet(s) before this one: output buffers full`, packets);
  }

  /** Event time, never going backwards within a flow; wall clock when Envoy sent none. */
  private stamp(stream: StreamIdentity, flow: TcpFlow, ev: TapEvent, nowMs: number): void {
    if (!ev.hasTimestamp) {
      ev.tsSec = Math.floor(nowMs / 1000);
      ev.tsNsec = (nowMs % 1000) * 1e6;
    }
    if (ev.tsSec < flow.lastTsSec || (ev.tsSec === flow.lastTsSec && ev.tsNsec < flow.lastTsNsec)) {
      this.reject(stream, 'timestamp_backwards', `trace ${ev.traceId}: event time ${ev.tsSec}.${ev.tsNsec} is before the previous event's; using the previous time`);
      ev.tsSec = flow.lastTsSec;
      ev.tsNsec = flow.lastTsNsec;
    }
    flow.lastTsSec = ev.tsSec;
    flow.lastTsNsec = ev.tsNsec;
  }

  private reject(stream: StreamIdentity, reason: 'unknown_flow' | 'closed_unknown_flow' | 'timestamp_backwards' | 'flow_table_full', detail: string): void {
    this.stats.error(stream.source, reason);
    this.warn(stream, reason, detail);
  }

  private warn(stream: StreamIdentity, reason: string, detail: string): void {
    this.limiter.warn(`${stream.source}/${reason}`, { reason, node: stream.nodeId, tap_id: stream.tapId, source: stream.source }, detail);
  }
}
