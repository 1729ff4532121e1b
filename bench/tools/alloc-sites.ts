/**
 * Where a benchmark case allocates: runs one case of bench/slicer.ts under V8's sampling heap
 * profiler (objects later collected by scavenges included) and prints the top allocation sites
 * with their callers, in bytes per packet.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/tools/alloc-sites.js pipeline-4k [seconds]
 *
 * Allocation in optimised code depends on what V8 inlined, which depends on what ran before: give
 * a comma-separated list to warm those cases up first, in order, and profile the last one
 * (e.g. memcpy-64k-v4,slicer-64k-v4 reproduces the order of the benchmark).
 */
import inspector from 'node:inspector/promises';
import { buildCase } from '../slicer.js';

interface Node {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children: Node[];
}

const ids = (process.argv[2] ?? 'slicer-64k-v4').split(',');
const id = ids[ids.length - 1]!;
const seconds = Number(process.argv[3] ?? 1);
for (const before of ids.slice(0, -1)) {
  const b = buildCase(before);
  const stop = performance.now() + 1000;
  while (performance.now() < stop) b.batch(b.batchUnits);
}
const c = buildCase(id);
const runFor = (ms: number): number => {
  let units = 0;
  const stop = performance.now() + ms;
  while (performance.now() < stop) {
    c.batch(c.batchUnits);
    units += c.batchUnits;
  }
  return units;
};
runFor(1000); // warm-up: optimised code, as in the benchmark
const session = new inspector.Session();
session.connect();
await session.post('HeapProfiler.enable');
await session.post('HeapProfiler.startSampling', {
  samplingInterval: 64,
  includeObjectsCollectedByMajorGC: true,
  includeObjectsCollectedByMinorGC: true,
} as object);
const units = runFor(seconds * 1000);
const { profile } = (await session.post('HeapProfiler.stopSampling')) as unknown as { profile: { head: Node } };
const packets = units * c.packetsPerUnit;

const sites = new Map<string, number>();
const frame = (n: Node) => `${n.callFrame.functionName || '(anonymous)'} (${n.callFrame.url.replace(/^.*\/(dist|node_modules)\//, '').replace(/^file:\/\//, '')}:${n.callFrame.lineNumber + 1})`;
const walk = (n: Node, stack: string[]): void => {
  const s = [frame(n), ...stack];
  if (n.selfSize > 0) {
    const key = s.slice(0, 4).join('\n    ← ');
    sites.set(key, (sites.get(key) ?? 0) + n.selfSize);
  }
  for (const ch of n.children) walk(ch, s);
};
walk(profile.head, []);
console.log(`${id}: ${packets} packets in ${seconds} s (sampling; line numbers are dist/*.js)`);
for (const [site, bytes] of [...sites].sort((a, b) => b[1] - a[1]).slice(0, 10)) {
  console.log(`${(bytes / packets).toFixed(2).padStart(8)} B/pkt  ${site}`);
}
