/**
 * `meshcap` command dispatch: serve (the sidecar), convert (tap files to a capture).
 * Returns the exit code; usage errors are 2, like tcpdump.
 */
import { ConfigError } from '../flags.js';
// Commands are loaded when used: `convert` need not pay for gRPC, metrics and TLS at start-up.

const VERSION = '0.1.0';

const USAGE = `meshcap ${VERSION}: plaintext packet capture for service meshes

Usage:
  meshcap serve [options]            receive Envoy tap streams, write pcapng/pcap
  meshcap convert FILE... -w OUT     turn Envoy file_per_tap outputs into one capture
  meshcap collect --listen H:P -w DIR receive captures from sidecars over mutual TLS (docs/broker.md)
  meshcap extcap install             add the meshcap interface to Wireshark/tshark (docs/live.md)
  meshcap help [serve|convert]
  meshcap version
`;

export async function run(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case undefined:
      case 'serve':
        return await (await import('./serve.js')).serve(rest);
      case 'convert':
        // The output's writer thread starts before the converter's modules load: for a small
        // input, its start-up is most of a conversion's time.
        (await import('../sink/writer-thread-start.js')).prestartCaptureWriter();
        return await (await import('./convert.js')).convert(rest);
      case 'extcap':
        return await (await import('./extcap.js')).extcap(rest);
      case 'collect':
        return await (await import('./collect.js')).collect(rest);
      case 'version':
      case '--version':
        process.stdout.write(`meshcap ${VERSION}\n`);
        return 0;
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(
          rest[0] === 'serve' ? (await import('./serve.js')).SERVE_USAGE : rest[0] === 'convert' ? (await import('./convert.js')).CONVERT_USAGE : USAGE,
        );
        return 0;
      default:
        process.stderr.write(`meshcap: unknown command "${command}"\n\n${USAGE}`);
        return 2;
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`meshcap: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`meshcap: ${(err as Error).stack ?? String(err)}\n`);
    return 1;
  }
}
