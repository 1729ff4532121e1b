/**
 * Audit events: who watched what, for how long. Plaintext of other people's traffic leaves the
 * process through the live endpoint, so every viewer session is recorded — refused attempts too —
 * as one structured pino log line with `audit: true` (filter with `jq 'select(.audit)'`):
 *
 *   event "live_session_refused"  viewer, filter, reason, detail
 *   event "live_session_start"    session, viewer, filter
 *   event "live_session_end"      session, viewer, filter, bytes, bytes_unsent, packets,
 *                                 duration_ms, reason
 *
 * `viewer` is { remote, protocol, auth, token_id?, cert_subject?, cert_issuer?,
 * cert_fingerprint256?, client? }. Tokens are never logged: token_id is the first 12 hex digits of
 * the token's SHA-256. Audit lines are written at level info even when --log-level is warn or
 * error (only `silent` turns them off), and never carry payload bytes.
 */
import type { Logger } from 'pino';

export type ViewerProtocol = 'tls' | 'wss' | 'pcap-over-ip';
export type ViewerAuth = 'token' | 'cert' | 'token+cert' | 'none';

export interface ViewerIdentity {
  /** Peer address:port. */
  remote: string;
  protocol: ViewerProtocol;
  /** How the viewer proved who it is ('none' before authentication, and for insecure loopback). */
  auth: ViewerAuth;
  token_id?: string;
  cert_subject?: string;
  cert_issuer?: string;
  cert_fingerprint256?: string;
  /** What the client says it is (request line client=, WebSocket client= or User-Agent). */
  client?: string;
}

/** Why a session was refused (`meshcap_live_viewers_refused_total{reason}`). */
export type RefusalReason =
  | 'no_token'
  | 'bad_token'
  | 'no_client_cert'
  | 'bad_client_cert'
  | 'no_credentials'
  | 'bad_request'
  | 'bad_filter'
  | 'not_found'
  | 'request_timeout'
  | 'too_many_viewers'
  | 'tls_handshake';

/** Why a session ended (`meshcap_live_viewers_disconnected_total{reason}`). */
export type EndReason = 'client_closed' | 'slow' | 'shutdown' | 'error';

export interface SessionTotals {
  /** Bytes handed to the connection (stream header included). */
  bytes: number;
  /** Of those, bytes still queued (never delivered) when the session ended. */
  bytesUnsent: number;
  packets: number;
  durationMs: number;
  reason: EndReason;
  detail?: string;
}

const MAX_TEXT = 256;

/** Client-supplied text, bounded (pino escapes it; this only keeps log lines small). */
export function clip(text: string | undefined | null): string | undefined {
  if (text === undefined || text === null) return undefined;
  return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}…` : text;
}

export class Auditor {
  private readonly log: Logger;

  constructor(base: Logger) {
    // Audit at info even when the operator turned normal logging down to warn/error.
    const level = base.level === 'silent' ? 'silent' : base.levelVal > 30 ? 'info' : base.level;
    this.log = base.child({ audit: true }, { level });
  }

  refused(viewer: ViewerIdentity, filter: string | undefined, reason: RefusalReason, detail: string): void {
    this.log.info(
      { event: 'live_session_refused', viewer: cleanViewer(viewer), filter: clip(filter), reason, detail: clip(detail) },
      `live viewer refused (${reason}) from ${viewer.remote}: ${detail}`,
    );
  }

  started(session: number, viewer: ViewerIdentity, filter: string | undefined): void {
    this.log.info(
      { event: 'live_session_start', session, viewer: cleanViewer(viewer), filter: clip(filter) ?? '' },
      `live viewer ${session} started: ${describe(viewer)}${filter ? ` filter "${clip(filter)}"` : ''}`,
    );
  }

  ended(session: number, viewer: ViewerIdentity, filter: string | undefined, t: SessionTotals): void {
    this.log.info(
      {
        event: 'live_session_end',
        session,
        viewer: cleanViewer(viewer),
        filter: clip(filter) ?? '',
        bytes: t.bytes,
        bytes_unsent: t.bytesUnsent,
        packets: t.packets,
        duration_ms: Math.round(t.durationMs),
        reason: t.reason,
        ...(t.detail ? { detail: clip(t.detail) } : {}),
      },
      `live viewer ${session} ended (${t.reason}) after ${Math.round(t.durationMs)} ms, ${t.packets} packets`,
    );
  }
}

function cleanViewer(v: ViewerIdentity): ViewerIdentity {
  const out: ViewerIdentity = { remote: v.remote, protocol: v.protocol, auth: v.auth };
  if (v.token_id) out.token_id = v.token_id;
  if (v.cert_subject) out.cert_subject = clip(v.cert_subject)!;
  if (v.cert_issuer) out.cert_issuer = clip(v.cert_issuer)!;
  if (v.cert_fingerprint256) out.cert_fingerprint256 = v.cert_fingerprint256;
  if (v.client) out.client = clip(v.client)!;
  return out;
}

function describe(v: ViewerIdentity): string {
  const who = v.cert_subject ?? v.token_id ?? 'anonymous';
  return `${v.protocol} ${v.remote} auth=${v.auth} (${who})`;
}
