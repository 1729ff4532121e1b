/**
 * A throwaway PKI for mTLS tests, made with the `openssl` command (run with execFile, never through
 * a shell) in a temporary directory: certificate authorities, and leaf certificates signed by them
 * with any mix of DNS / IP / URI (SPIFFE) subject alternative names, expired ones included.
 *
 * Keys are EC P-256 (fast to generate). Leaf certificates carry serverAuth + clientAuth, so one
 * certificate can serve as a broker's or a sidecar's.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const OPENSSL = process.env.OPENSSL ?? 'openssl';

function openssl(args: string[], cwd: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(OPENSSL, args, { cwd, encoding: 'utf8', timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`openssl ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

export interface CertificateAuthority {
  name: string;
  /** PEM certificate file. */
  cert: string;
  key: string;
}

export interface LeafCertificate {
  name: string;
  /** PEM certificate file (the leaf only). */
  cert: string;
  key: string;
  /** The issuing CA's certificate file. */
  ca: string;
  serial: string;
}

export interface LeafOptions {
  /** DNS names (subjectAltName DNS:). */
  dns?: string[];
  /** IP addresses (subjectAltName IP:). */
  ip?: string[];
  /** URIs, e.g. SPIFFE IDs (subjectAltName URI:). */
  uri?: string[];
  /** Validity in days; negative makes a certificate that expired that many days ago. */
  days?: number;
  /** Common name (default: the leaf's name). */
  cn?: string;
}

export class TestPki {
  private constructor(readonly dir: string) {}

  static async create(prefix = 'meshcap-pki-'): Promise<TestPki> {
    return new TestPki(fs.mkdtempSync(path.join(os.tmpdir(), prefix)));
  }

  /** A self-signed CA (valid 30 days). */
  async ca(name: string): Promise<CertificateAuthority> {
    const cert = path.join(this.dir, `${name}.ca.pem`);
    const key = path.join(this.dir, `${name}.ca.key`);
    await openssl(
      [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
        '-keyout', key, '-out', cert, '-days', '30', '-subj', `/CN=${name}`,
        '-addext', 'basicConstraints=critical,CA:TRUE',
        '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
      ],
      this.dir,
    );
    return { name, cert, key };
  }

  /** A leaf certificate signed by `ca`. */
  async leaf(ca: CertificateAuthority, name: string, opts: LeafOptions = {}): Promise<LeafCertificate> {
    const cert = path.join(this.dir, `${name}.pem`);
    const key = path.join(this.dir, `${name}.key`);
    const csr = path.join(this.dir, `${name}.csr`);
    const ext = path.join(this.dir, `${name}.ext`);
    const sans = [...(opts.dns ?? []).map((d) => `DNS:${d}`), ...(opts.ip ?? []).map((i) => `IP:${i}`), ...(opts.uri ?? []).map((u) => `URI:${u}`)];
    fs.writeFileSync(
      ext,
      [
        'basicConstraints=critical,CA:FALSE',
        'keyUsage=critical,digitalSignature',
        'extendedKeyUsage=serverAuth,clientAuth',
        ...(sans.length ? [`subjectAltName=${sans.join(',')}`] : []),
        '',
      ].join('\n'),
    );
    await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${opts.cn ?? name}`], this.dir);
    // A random serial per certificate, so a renewed certificate is told apart from the old one.
    const serial = `0x${[...crypto.getRandomValues(new Uint8Array(12))].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
    await openssl(
      ['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', serial, '-days', String(opts.days ?? 2), '-out', cert, '-extfile', ext],
      this.dir,
    );
    return { name, cert, key, ca: ca.cert, serial: serial.slice(2).toUpperCase().replace(/^0+/, '') };
  }

  /** A file holding several CA certificates (a trust bundle). */
  bundle(name: string, cas: CertificateAuthority[]): string {
    const file = path.join(this.dir, `${name}.bundle.pem`);
    fs.writeFileSync(file, cas.map((c) => fs.readFileSync(c.cert, 'utf8')).join(''));
    return file;
  }

  /** Copies a leaf's certificate and key over `certFile`/`keyFile` (atomically, like a rotation). */
  static install(leaf: LeafCertificate, certFile: string, keyFile: string, caFile?: string): void {
    const put = (from: string, to: string): void => {
      const tmp = `${to}.tmp-${process.pid}`;
      fs.copyFileSync(from, tmp);
      fs.renameSync(tmp, to);
    };
    put(leaf.key, keyFile);
    put(leaf.cert, certFile);
    if (caFile) put(leaf.ca, caFile);
  }

  remove(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The usual cast of a broker test: two CAs, broker and sidecar certificates, bad ones. */
export interface BrokerPki {
  pki: TestPki;
  ca: CertificateAuthority;
  otherCa: CertificateAuthority;
  /** Broker (or collector) certificate: DNS:localhost, IP:127.0.0.1, URI spiffe://test.example/broker. */
  broker: LeafCertificate;
  /** A broker certificate with the wrong SPIFFE ID (right DNS/IP SANs). */
  impostorBroker: LeafCertificate;
  /** A broker certificate for another host name (DNS:broker.elsewhere.example only), right SPIFFE ID. */
  wrongHost: LeafCertificate;
  /** Sidecar certificates: spiffe://test.example/ns/capture/sa/sidecar-a (and a renewal of it). */
  sidecarA: LeafCertificate;
  sidecarARenewed: LeafCertificate;
  /** spiffe://test.example/ns/other/sa/intruder: valid chain, not on the allowlist. */
  intruder: LeafCertificate;
  /** Sidecar A's identity, expired yesterday. */
  expired: LeafCertificate;
  /** Sidecar A's identity issued by another CA. */
  foreign: LeafCertificate;
}

export const BROKER_SPIFFE = 'spiffe://test.example/broker';
export const SIDECAR_A_SPIFFE = 'spiffe://test.example/ns/capture/sa/sidecar-a';
export const INTRUDER_SPIFFE = 'spiffe://test.example/ns/other/sa/intruder';

export async function brokerPki(): Promise<BrokerPki> {
  const pki = await TestPki.create();
  const [ca, otherCa] = await Promise.all([pki.ca('test-ca'), pki.ca('other-ca')]);
  const [broker, impostorBroker, wrongHost, sidecarA, sidecarARenewed, intruder, expired, foreign] = await Promise.all([
    pki.leaf(ca, 'broker', { dns: ['localhost'], ip: ['127.0.0.1'], uri: [BROKER_SPIFFE] }),
    pki.leaf(ca, 'impostor', { dns: ['localhost'], ip: ['127.0.0.1'], uri: ['spiffe://test.example/not-the-broker'] }),
    pki.leaf(ca, 'wrong-host', { dns: ['broker.elsewhere.example'], uri: [BROKER_SPIFFE] }),
    pki.leaf(ca, 'sidecar-a', { uri: [SIDECAR_A_SPIFFE] }),
    pki.leaf(ca, 'sidecar-a-renewed', { uri: [SIDECAR_A_SPIFFE] }),
    pki.leaf(ca, 'intruder', { uri: [INTRUDER_SPIFFE] }),
    pki.leaf(ca, 'expired', { uri: [SIDECAR_A_SPIFFE], days: -1 }),
    pki.leaf(otherCa, 'foreign', { uri: [SIDECAR_A_SPIFFE] }),
  ]);
  return { pki, ca, otherCa, broker, impostorBroker, wrongHost, sidecarA, sidecarARenewed, intruder, expired, foreign };
}
