/**
 * Summarises a V8 .cpuprofile (node --cpu-prof) by self time per function, and by inclusive time
 * for the functions that matter to the slicer.
 *
 *   node --cpu-prof --cpu-prof-dir=/tmp/prof --expose-gc dist/bench/slicer.js --filter slicer-64k --no-json
 *   node dist/bench/tools/cpuprofile-top.js /tmp/prof/CPU.*.cpuprofile [top=25]
 *
 * V8 inlines the checksum loop and the framer into the slicer, so self time alone hides them: the
 * last table lists the hottest source lines. Line numbers are of the compiled dist/ files; for code
 * V8 inlined, the line is in the *inlined callee's* file although the row names the caller (e.g.
 * "finishSegment src/packet/slicer.js:62" is dist/src/packet/checksum.js:62, the sumWords loop).
 */
import fs from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
  /** Ticks per source line of the function (inlined callees are attributed to their own lines). */
  positionTicks?: Array<{ line: number; ticks: number }>;
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const file = process.argv[2];
if (!file) {
  console.error('usage: cpuprofile-top <file.cpuprofile> [top]');
  process.exit(2);
}
const top = Number(process.argv[3] ?? 25);
const p = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
const byId = new Map(p.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

const name = (n: ProfileNode): string => {
  const url = n.callFrame.url.replace(/^file:\/\/.*?\/dist\//, '').replace(/^node:/, 'node:');
  return `${n.callFrame.functionName || '(anonymous)'}${url ? ` ${url}:${n.callFrame.lineNumber + 1}` : ''}`;
};

// Time per sample (µs): timeDeltas[i] is the gap before sample i.
const self = new Map<string, number>();
const incl = new Map<string, number>();
let total = 0;
for (let i = 0; i < p.samples.length; i++) {
  const dt = p.timeDeltas[i + 1] ?? p.timeDeltas[i] ?? 0;
  total += dt;
  let node = byId.get(p.samples[i]!)!;
  self.set(name(node), (self.get(name(node)) ?? 0) + dt);
  const seen = new Set<string>();
  for (;;) {
    const k = name(node);
    if (!seen.has(k)) {
      incl.set(k, (incl.get(k) ?? 0) + dt);
      seen.add(k);
    }
    const up = parent.get(node.id);
    if (up === undefined) break;
    node = byId.get(up)!;
  }
}
const pct = (x: number) => `${((100 * x) / total).toFixed(1).padStart(5)}%`;
console.log(`${file}: ${(total / 1e6).toFixed(2)} s sampled`);
console.log('\nself time');
for (const [k, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(v)}  ${k}`);
console.log('\ninclusive time (src/ and bench/ functions)');
for (const [k, v] of [...incl].filter(([k]) => /src\/|bench\//.test(k)).sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(v)}  ${k}`);

const lines = new Map<string, number>();
let ticks = 0;
for (const n of p.nodes) {
  ticks += n.hitCount ?? 0;
  for (const t of n.positionTicks ?? []) {
    const url = n.callFrame.url.replace(/^file:\/\/.*?\/dist\//, '');
    const k = `${n.callFrame.functionName || '(anonymous)'} ${url}:${t.line}`;
    lines.set(k, (lines.get(k) ?? 0) + t.ticks);
  }
}
console.log('\nhottest lines (function, file:line in dist/; inlined code: line of the callee\'s file)');
for (const [k, v] of [...lines].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${((100 * v) / ticks).toFixed(1).padStart(5)}%  ${k}`);
