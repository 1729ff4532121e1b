/**
 * Splits a `node --cpu-prof` profile of `meshcap serve` into where the main thread's time goes:
 * grpc-js, Node's HTTP/2 and socket machinery, meshcap's decoder, flow table, slicer + framing,
 * sinks, metrics/logging, GC, idle.
 *
 * Each sample is charged to the innermost frame that belongs to meshcap (dist/src/...) or to a
 * package (node_modules/<pkg>); Node's own JavaScript (node:internal/...) and builtins below it
 * count for that caller (a TypedArray#set called by the slicer is the slicer's). Samples with no
 * such frame are Node's own: HTTP/2 session and socket reads called from libuv (node:internal/
 * http2, net, streams), timers, or V8's (garbage collector), (idle), (program).
 *
 *   node dist/bench/tools/cpuprofile-categories.js /tmp/prof/CPU.*.cpuprofile
 */
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

export function categoryOf(url: string, fn: string): string | null {
  if (url.includes('/node_modules/')) {
    const m = /\/node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url);
    const pkg = m?.[1] ?? 'node_modules';
    if (pkg === '@grpc/grpc-js') return 'grpc-js';
    if (pkg === 'prom-client' || pkg === 'pino' || pkg.startsWith('pino') || pkg === 'sonic-boom') return 'metrics + logging (prom-client, pino)';
    return `package ${pkg}`;
  }
  if (/\/dist\/src\//.test(url)) {
    if (/\/src\/ingest\//.test(url)) return /grpc-tap-server/.test(url) ? 'meshcap gRPC door (grpc-tap-server)' : 'meshcap decode (ingest/)';
    if (/\/src\/flow\//.test(url)) return 'meshcap flow table (flow/)';
    if (/\/src\/packet\/|\/src\/format\//.test(url)) return 'meshcap slicer + framing (packet/, format/)';
    if (/\/src\/sink\//.test(url)) return 'meshcap sinks (sink/)';
    if (/\/src\/pipeline/.test(url)) return 'meshcap pipeline';
    if (/\/src\/control\//.test(url)) return 'metrics + logging (prom-client, pino)';
    return 'meshcap other';
  }
  if (url === '') {
    if (fn === '(garbage collector)') return 'GC';
    if (fn === '(idle)') return 'idle';
    if (fn === '(program)') return '(program): V8/libuv native, not attributed';
    return null;
  }
  return null;
}

function nodeCategory(url: string): string {
  if (/http2/.test(url)) return 'node HTTP/2 (node:internal/http2)';
  if (/net|stream|socket/.test(url)) return 'node sockets + streams';
  if (/timers/.test(url)) return 'node timers';
  if (/fs/.test(url)) return 'node fs';
  return 'node other';
}

export function categorize(file: string): { totalSeconds: number; shares: Array<[string, number]> } {
  const p = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const memo = new Map<number, string>();
  const catOf = (id: number): string => {
    const hit = memo.get(id);
    if (hit) return hit;
    let node: ProfileNode | undefined = byId.get(id)!;
    let firstNode: string | null = null;
    let cat: string | null = null;
    while (node) {
      const c = categoryOf(node.callFrame.url, node.callFrame.functionName);
      if (c) {
        cat = c;
        break;
      }
      if (!firstNode && node.callFrame.url.startsWith('node:')) firstNode = nodeCategory(node.callFrame.url);
      const up = parent.get(node.id);
      node = up === undefined ? undefined : byId.get(up);
    }
    const r = cat ?? firstNode ?? 'native (builtins, no JS caller)';
    memo.set(id, r);
    return r;
  };
  const time = new Map<string, number>();
  let total = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dt = p.timeDeltas[i + 1] ?? p.timeDeltas[i] ?? 0;
    total += dt;
    const c = catOf(p.samples[i]!);
    time.set(c, (time.get(c) ?? 0) + dt);
  }
  return { totalSeconds: total / 1e6, shares: [...time].sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, v / total]) };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: cpuprofile-categories <file.cpuprofile>');
    process.exit(2);
  }
  const { totalSeconds, shares } = categorize(file);
  const busy = shares.filter(([k]) => k !== 'idle').reduce((a, [, v]) => a + v, 0);
  console.log(`${file}: ${totalSeconds.toFixed(2)} s sampled, ${(100 * busy).toFixed(1)} % busy`);
  console.log('share of samples  share of busy  category');
  for (const [k, v] of shares) console.log(`${(100 * v).toFixed(1).padStart(15)} %  ${k === 'idle' ? ' '.repeat(13) : `${((100 * v) / busy).toFixed(1).padStart(11)} %`}  ${k}`);
}
