/**
 * Certificates for the broker benchmarks, made with the `openssl` command (execFile, never a
 * shell) in a directory the caller owns and removes: one CA, the collector's certificate (IP SAN
 * 127.0.0.1, DNS localhost, a SPIFFE ID) and the sidecar's (a SPIFFE ID only). EC P-256 keys, so
 * the whole set takes well under a second.
 *
 * test/helpers/pki.ts does the same for the tests; it is not compiled into dist/ (tsconfig compiles
 * src/ and bench/ only), so the benchmarks carry this small copy of its method instead of reaching
 * into test/.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const OPENSSL = process.env.OPENSSL ?? 'openssl';

/** The trust domain of every benchmark identity; collect is started with --allow on it. */
export const BENCH_TRUST_DOMAIN = 'spiffe://bench.meshcap.invalid';
export const BENCH_SIDECAR_SPIFFE = `${BENCH_TRUST_DOMAIN}/ns/bench/sa/meshcap`;
export const BENCH_COLLECT_SPIFFE = `${BENCH_TRUST_DOMAIN}/ns/capture/sa/collect`;

function openssl(args: string[], cwd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(OPENSSL, args, { cwd, encoding: 'utf8', timeout: 30_000 }, (err, _out, stderr) => {
      if (err) reject(new Error(`openssl ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      else resolve();
    });
  });
}

export interface CertPair {
  cert: string;
  key: string;
}

export interface BenchPki {
  dir: string;
  /** The CA certificate (both sides trust it). */
  ca: string;
  collector: CertPair;
  sidecar: CertPair;
}

async function leaf(dir: string, ca: CertPair, name: string, sans: string[], serial: string): Promise<CertPair> {
  const cert = path.join(dir, `${name}.pem`);
  const key = path.join(dir, `${name}.key`);
  const csr = path.join(dir, `${name}.csr`);
  const ext = path.join(dir, `${name}.ext`);
  fs.writeFileSync(
    ext,
    ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature', 'extendedKeyUsage=serverAuth,clientAuth', `subjectAltName=${sans.join(',')}`, ''].join('\n'),
  );
  await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`], dir);
  await openssl(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', serial, '-days', '2', '-out', cert, '-extfile', ext], dir);
  return { cert, key };
}

/** Makes the CA and both leaves in `dir` (which must exist). */
export async function makeBenchPki(dir: string): Promise<BenchPki> {
  const ca: CertPair = { cert: path.join(dir, 'ca.pem'), key: path.join(dir, 'ca.key') };
  await openssl(
    [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', ca.key, '-out', ca.cert, '-days', '2', '-subj', '/CN=meshcap bench CA',
      '-addext', 'basicConstraints=critical,CA:TRUE',
      '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    ],
    dir,
  );
  const [collector, sidecar] = await Promise.all([
    leaf(dir, ca, 'collector', ['DNS:localhost', 'IP:127.0.0.1', `URI:${BENCH_COLLECT_SPIFFE}`], '0x1001'),
    leaf(dir, ca, 'sidecar', [`URI:${BENCH_SIDECAR_SPIFFE}`], '0x1002'),
  ]);
  return { dir, ca: ca.cert, collector, sidecar };
}
