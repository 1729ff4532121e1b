/**
 * Thin wrappers around tshark (run with execFile, never through a shell) for asserting what
 * Wireshark makes of a capture.
 *
 * Quirks worth knowing (tshark 4.0):
 * - `-Y` filters in a single pass; fields that are only final after the whole file was read
 *   (tcp.completeness, some analysis flags) need `-2 -R` (twoPass).
 * - `-z follow,tcp,raw,N` can be given many times in one run; the blocks are printed in REVERSE
 *   order of the arguments, so they are matched by their `Filter: tcp.stream eq N` line.
 * - In follow output, data lines of "Node 1" are indented with one TAB; Node 0's are not. Each
 *   line is one reassembled chunk in hex (no wrapping, even for 64 KB segments). Nodes print as
 *   `127.0.0.1:37592` or `[::1]:38382`; a stream without payload prints `Node 0: :0`.
 * - `_ws.expert.severity` prints as numbers (Chat 2097152, Note 4194304, Warning 6291456,
 *   Error 8388608) while display filters accept the names (`_ws.expert.severity >= "Warning"`).
 * - Always pass decodeAs for test ports: without it HTTP's heuristic dissector may pick up a
 *   connection mid-stream and report bogus errors ("Leading CRLF previous message…").
 * - tshark always prints "Running as user "root"…" to stderr when run as root: stderr is ignored
 *   unless the exit code is non-zero.
 */
import { execFile } from 'node:child_process';

export interface TsharkOptions {
  /** `-d` decode-as entries, e.g. `tcp.port==27100,http2`. */
  decodeAs?: string[];
  /** Display filter: `-Y` (single pass) or, with twoPass, `-2 -R`. */
  filter?: string;
  /** Two-pass analysis (`-2`); the filter becomes a read filter (`-R`). */
  twoPass?: boolean;
  /** `-o name:value` preferences. */
  prefs?: Record<string, string>;
}

export interface TsharkFieldsOptions extends TsharkOptions {
  /** Separator between multiple occurrences of one field in a frame (default ','). */
  aggregator?: string;
}

const TSHARK = process.env.TSHARK ?? 'tshark';
const MAX_BUFFER = 1 << 30;

/** Runs tshark with the given arguments and returns stdout. Rejects with stderr on failure. */
export function runTshark(args: string[], timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      TSHARK,
      args,
      { maxBuffer: MAX_BUFFER, timeout: timeoutMs, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) => {
        if (err) {
          const msg = String(stderr)
            .split('\n')
            .filter((l) => l && !l.startsWith('Running as user'))
            .join('\n');
          reject(new Error(`tshark ${args.join(' ')} failed: ${err.message}\n${msg}`));
          return;
        }
        resolve(stdout);
      },
    );
  });
}

function commonArgs(file: string, opts: TsharkOptions = {}): string[] {
  const args = ['-n', '-r', file];
  for (const [k, v] of Object.entries(opts.prefs ?? {})) args.push('-o', `${k}:${v}`);
  for (const d of opts.decodeAs ?? []) args.push('-d', d);
  if (opts.twoPass) {
    args.push('-2');
    if (opts.filter) args.push('-R', opts.filter);
  } else if (opts.filter) {
    args.push('-Y', opts.filter);
  }
  return args;
}

function splitLines(out: string): string[] {
  const lines = out.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  return lines.map((l) => (l.endsWith('\r') ? l.slice(0, -1) : l));
}

/**
 * `tshark -T fields -E separator=\t -e f1 -e f2 …`: one row per displayed frame, one cell per
 * field (multiple occurrences joined with `aggregator`, default ',').
 */
export async function tsharkFields(file: string, fields: string[], opts: TsharkFieldsOptions = {}): Promise<string[][]> {
  if (fields.length === 0) throw new Error('tsharkFields: no fields');
  const args = [...commonArgs(file, opts), '-T', 'fields', '-E', 'separator=/t', '-E', 'occurrence=a'];
  if (opts.aggregator !== undefined) args.push('-E', `aggregator=${opts.aggregator}`);
  for (const f of fields) args.push('-e', f);
  const out = await runTshark(args);
  return splitLines(out).map((l) => {
    const cells = l.split('\t');
    while (cells.length < fields.length) cells.push('');
    return cells;
  });
}

/** The Info column of every frame matching the filter. */
export async function tsharkInfo(file: string, opts: TsharkOptions = {}): Promise<string[]> {
  const rows = await tsharkFields(file, ['_ws.col.Info'], opts);
  return rows.map((r) => r[0] ?? '');
}

export interface Endpoint {
  addr: string;
  port: number;
}

export interface FollowedStream {
  /** tcp.stream index. */
  index: number;
  /** Node 0 of the follow output. */
  a: Endpoint;
  /** Node 1 of the follow output. */
  b: Endpoint;
  /** Bytes sent by a (reassembled, de-duplicated, in sequence order). */
  aToB: Buffer;
  bToA: Buffer;
  /** Number of data chunks tshark printed per direction. */
  aChunks: number;
  bChunks: number;
}

/** Parses "127.0.0.1:37592", "[::1]:443" or "::1:443" (last colon splits off the port). */
export function parseEndpoint(s: string): Endpoint {
  const t = s.trim();
  const i = t.lastIndexOf(':');
  if (i < 0) return { addr: t, port: 0 };
  let addr = t.slice(0, i);
  if (addr.startsWith('[') && addr.endsWith(']')) addr = addr.slice(1, -1);
  const port = Number(t.slice(i + 1));
  return { addr, port: Number.isFinite(port) ? port : 0 };
}

/** Parses the text printed by one or more `-z follow,tcp,raw,N`. */
export function parseFollowRaw(out: string): FollowedStream[] {
  const result: FollowedStream[] = [];
  const lines = splitLines(out);
  let i = 0;
  const sep = /^={10,}$/;
  while (i < lines.length) {
    if (!sep.test(lines[i]!)) {
      i++;
      continue;
    }
    i++;
    if (i >= lines.length || !lines[i]!.startsWith('Follow:')) continue; // closing separator
    i++;
    let index = -1;
    let a: Endpoint = { addr: '', port: 0 };
    let b: Endpoint = { addr: '', port: 0 };
    const aParts: Buffer[] = [];
    const bParts: Buffer[] = [];
    for (; i < lines.length && !sep.test(lines[i]!); i++) {
      const l = lines[i]!;
      let m: RegExpMatchArray | null;
      if ((m = /^Filter: tcp\.stream eq (\d+)\s*$/.exec(l))) index = Number(m[1]);
      else if ((m = /^Node 0: (.*)$/.exec(l))) a = parseEndpoint(m[1]!);
      else if ((m = /^Node 1: (.*)$/.exec(l))) b = parseEndpoint(m[1]!);
      else if (l.startsWith('\t')) bParts.push(hexLine(l.slice(1)));
      else if (l.length > 0) aParts.push(hexLine(l));
    }
    if (index < 0) throw new Error('follow output block without "Filter: tcp.stream eq N"');
    result.push({ index, a, b, aToB: Buffer.concat(aParts), bToA: Buffer.concat(bParts), aChunks: aParts.length, bChunks: bParts.length });
  }
  result.sort((x, y) => x.index - y.index);
  return result;
}

function hexLine(h: string): Buffer {
  const t = h.trim();
  if (!/^([0-9a-fA-F]{2})*$/.test(t)) throw new Error(`unexpected follow line: ${t.slice(0, 80)}`);
  return Buffer.from(t, 'hex');
}

/**
 * Every TCP conversation of a capture as Wireshark's "Follow TCP Stream (raw)" sees it. All
 * streams are followed in ONE tshark run (many `-z follow,tcp,raw,N` arguments), after a first
 * run that lists the tcp.stream indexes. An optional display filter restricts which streams.
 */
export async function followTcpRaw(file: string, opts: { filter?: string; prefs?: Record<string, string> } = {}): Promise<FollowedStream[]> {
  const rows = await tsharkFields(file, ['tcp.stream'], { filter: opts.filter ?? 'tcp', prefs: opts.prefs });
  const indexes = [...new Set(rows.map((r) => r[0]!).filter((s) => s !== ''))].map(Number).sort((x, y) => x - y);
  if (indexes.length === 0) return [];
  const args = ['-n', '-r', file, '-q'];
  for (const [k, v] of Object.entries(opts.prefs ?? {})) args.push('-o', `${k}:${v}`);
  for (const n of indexes) args.push('-z', `follow,tcp,raw,${n}`);
  const streams = parseFollowRaw(await runTshark(args));
  if (streams.length !== indexes.length) {
    throw new Error(`followTcpRaw: asked for ${indexes.length} streams, tshark printed ${streams.length}`);
  }
  return streams;
}

/** The display filter behind tcpExpertProblems. */
export const TCP_PROBLEM_FILTER =
  'ip.checksum.status == "Bad" || tcp.checksum.status == "Bad" || tcp.analysis.lost_segment || ' +
  'tcp.analysis.ack_lost_segment || tcp.analysis.retransmission || tcp.analysis.out_of_order || ' +
  'tcp.analysis.duplicate_ack || tcp.analysis.flags || _ws.malformed';

/** Checksum validation on (Wireshark's defaults leave it off). */
export const CHECKSUM_PREFS: Record<string, string> = {
  'ip.check_checksum': 'TRUE',
  'tcp.check_checksum': 'TRUE',
};

/**
 * Frames Wireshark flags: bad IPv4/TCP checksums (validation switched on), any TCP analysis flag
 * (lost/ACKed-unseen segments, retransmissions, out-of-order, dup ACKs, window problems, port
 * reuse…) and malformed packets; with `anyWarning`, also every other expert item of severity
 * Warning or Error (e.g. HTTP/2 or gRPC dissector warnings). Each entry reads
 * `frame N (stream S): <Info column> {expert messages of severity >= Note}`. Empty means clean.
 *
 * Note: captures taken on Linux loopback have bad TCP checksums everywhere (checksum offload:
 * the kernel never fills them in on lo), so this is meant for synthetic output.
 */
export async function tcpExpertProblems(
  file: string,
  opts: { decodeAs?: string[]; prefs?: Record<string, string>; extraFilter?: string; anyWarning?: boolean } = {},
): Promise<string[]> {
  const base = opts.anyWarning ? `${TCP_PROBLEM_FILTER} || _ws.expert.severity >= "Warning"` : TCP_PROBLEM_FILTER;
  const filter = opts.extraFilter ? `(${base}) && (${opts.extraFilter})` : base;
  const rows = await tsharkFields(file, ['frame.number', 'tcp.stream', '_ws.col.Info', '_ws.expert.message', '_ws.expert.severity'], {
    filter,
    decodeAs: opts.decodeAs,
    prefs: { ...CHECKSUM_PREFS, ...opts.prefs },
    aggregator: '\u001f',
  });
  return rows.map(([frame, stream, info, messages, severities]) => {
    const msgs = (messages ?? '').split('\u001f');
    const sevs = (severities ?? '').split('\u001f');
    // Drop the "Chat" level items (connection establish/finish notes): they are not problems.
    const notable = msgs.filter((m, i) => m && !/^(2097152|Chat)$/i.test(sevs[i] ?? ''));
    return `frame ${frame} (stream ${stream}): ${info}${notable.length ? ` {${notable.join('; ')}}` : ''}`;
  });
}
