/**
 * PEM certificate, key and CA bundle files, reloaded when they change on disk (Istio, SPIRE and
 * cert-manager rotate workload certificates daily, often by swapping a symlink, as Kubernetes
 * secret volumes do).
 *
 * The files are polled with stat (which follows symlinks) every `pollMs`; when any of them changed,
 * all three are read again and must form a usable set (the key matches the certificate, every PEM
 * parses) before they replace the current ones. A half-finished rotation (new certificate, old key)
 * is therefore never used: the previous material stays in force, a warning is logged once, and
 * the files are tried again at the next poll. Open connections keep their session; the next
 * connection (or the next accepted client, for servers) uses the new material.
 */
import { EventEmitter } from 'node:events';
import { X509Certificate, createHash } from 'node:crypto';
import fs from 'node:fs';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { spiffeIdOf } from './spiffe.js';

export interface TlsFilePaths {
  cert: string;
  key: string;
  /** Null for a server that verifies no client certificates (the live endpoint with tokens only). */
  ca: string | null;
}

export interface CertInfo {
  subject: string;
  serial: string;
  notBefore: Date;
  notAfter: Date;
  spiffeId: string | null;
  fingerprint256: string;
}

export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  /** undefined when no CA bundle is configured (so it can be spread into TLS options as it is). */
  ca: Buffer | undefined;
  /** 1 for the first load, +1 per reload. */
  generation: number;
  loadedAt: number;
  /** The leaf certificate (first one of the cert file). */
  info: CertInfo;
}

export interface TlsFilesOptions {
  /** Poll interval in ms (default 1000). */
  pollMs?: number;
  /** What the files are for, in logs ('broker client', 'collector'). */
  role?: string;
  /** Warn when the certificate expires sooner than this (ms; default 24 h). */
  expiryWarningMs?: number;
}

export class TlsFilesError extends Error {}

function statKey(file: string): string {
  try {
    const s = fs.statSync(file);
    return `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`;
  } catch (err) {
    return `error:${(err as NodeJS.ErrnoException).code ?? 'unknown'}`;
  }
}

/** Reads and checks a set of files; throws TlsFilesError naming the file at fault. */
export function loadTlsMaterial(paths: TlsFilePaths, generation: number): TlsMaterial {
  const read = (what: string, file: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new TlsFilesError(`cannot read ${what} ${file}: ${(err as Error).message}`);
    }
  };
  const cert = read('certificate', paths.cert);
  const key = read('private key', paths.key);
  const ca = paths.ca === null ? undefined : read('CA bundle', paths.ca);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch (err) {
    throw new TlsFilesError(`certificate ${paths.cert} does not parse: ${(err as Error).message}`);
  }
  try {
    if (ca) new X509Certificate(ca);
  } catch (err) {
    throw new TlsFilesError(`CA bundle ${paths.ca} does not parse: ${(err as Error).message}`);
  }
  try {
    // Fails when the key does not belong to the certificate, or either is not PEM.
    tls.createSecureContext({ cert, key, ca });
  } catch (err) {
    throw new TlsFilesError(`certificate ${paths.cert} and key ${paths.key} do not form a usable pair: ${(err as Error).message}`);
  }
  return {
    cert,
    key,
    ca,
    generation,
    loadedAt: Date.now(),
    info: {
      subject: leaf.subject.replace(/\n/g, ', '),
      serial: leaf.serialNumber,
      notBefore: new Date(leaf.validFrom),
      notAfter: new Date(leaf.validTo),
      spiffeId: spiffeIdOf(leaf),
      fingerprint256: leaf.fingerprint256,
    },
  };
}

function digest(m: { cert: Buffer; key: Buffer; ca: Buffer | undefined }): string {
  return createHash('sha256')
    .update(m.cert)
    .update('\0')
    .update(m.key)
    .update('\0')
    .update(m.ca ?? '')
    .digest('hex');
}

/**
 * Emits 'reload' (material: TlsMaterial) after a successful reload and 'reload-failed' (err)
 * once per distinct failing content.
 */
export class TlsFiles extends EventEmitter {
  private material: TlsMaterial;
  private digest: string;
  private stats: string;
  private timer: NodeJS.Timeout | null = null;
  private lastFailure = '';
  reloads = 0;
  reloadFailures = 0;

  /** Loads the files now; throws TlsFilesError when they are unusable (a startup error). */
  constructor(
    readonly paths: TlsFilePaths,
    private readonly log: Logger,
    private readonly opts: TlsFilesOptions = {},
  ) {
    super();
    this.stats = this.statAll();
    this.material = loadTlsMaterial(paths, 1);
    this.digest = digest(this.material);
    this.logLoaded('TLS certificate loaded');
  }

  get current(): TlsMaterial {
    return this.material;
  }

  /** Starts polling the files (the timer does not keep the process alive). */
  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.check(), this.opts.pollMs ?? 1000);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Checks the files once; returns true when new material was loaded. */
  check(): boolean {
    const now = this.statAll();
    if (now === this.stats && this.lastFailure === '') return false;
    let next: TlsMaterial;
    try {
      next = loadTlsMaterial(this.paths, this.material.generation + 1);
    } catch (err) {
      const msg = (err as Error).message;
      if (msg !== this.lastFailure) {
        this.reloadFailures++;
        this.lastFailure = msg;
        this.log.warn({ role: this.opts.role, reason: 'tls_reload_failed', err: msg }, 'TLS files changed but are not usable (yet); keeping the previous certificate');
        this.emit('reload-failed', err);
      }
      return false;
    }
    this.stats = now;
    this.lastFailure = '';
    const d = digest(next);
    if (d === this.digest) return false;
    this.digest = d;
    this.material = next;
    this.reloads++;
    this.logLoaded('TLS certificate reloaded; new connections use it');
    this.emit('reload', next);
    return true;
  }

  private statAll(): string {
    return `${statKey(this.paths.cert)}|${statKey(this.paths.key)}|${this.paths.ca === null ? '' : statKey(this.paths.ca)}`;
  }

  private logLoaded(msg: string): void {
    const i = this.material.info;
    const fields = {
      role: this.opts.role,
      cert: this.paths.cert,
      subject: i.subject,
      spiffe_id: i.spiffeId,
      serial: i.serial,
      not_after: i.notAfter.toISOString(),
      generation: this.material.generation,
    };
    const now = Date.now();
    if (i.notAfter.getTime() < now) this.log.error({ ...fields, reason: 'tls_cert_expired' }, `${msg}, but it has EXPIRED: peers will refuse it`);
    else if (i.notBefore.getTime() > now) this.log.error({ ...fields, reason: 'tls_cert_not_yet_valid' }, `${msg}, but it is not valid yet: peers will refuse it`);
    else if (i.notAfter.getTime() - now < (this.opts.expiryWarningMs ?? 86_400_000)) this.log.warn({ ...fields, reason: 'tls_cert_expiring' }, `${msg}; it expires soon`);
    else this.log.info(fields, msg);
  }
}
