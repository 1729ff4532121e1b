/**
 * Runs every benchmark in bench/ in sequence, in one process, and prints one summary table.
 *
 *   npm run bench            (= node --expose-gc dist/bench/run-all.js, after npx tsc -p tsconfig.json)
 *   node --expose-gc dist/bench/run-all.js --quick          shorter repetitions, for a smoke test
 *   node --expose-gc dist/bench/run-all.js --filter slicer  only benchmarks whose name contains it
 *
 * To add a benchmark: export `async function runX(opts): Promise<BenchReport>` from bench/x.ts
 * (see harness.ts) and add one line to BENCHES below.
 *
 * The end-to-end benchmarks (e2e, convert, overload, flows, latency) start `meshcap serve` /
 * `meshcap convert` from bin/meshcap.js (or MESHCAP_BENCH_BIN), the null gRPC sink and the load
 * generator as child processes, on Unix sockets and 127.0.0.1 only, in temporary directories they
 * remove; every load is bounded in time.
 */
import { fmt, gcExposedByFlag, machine, parseArgs, table, type BenchReport, type HarnessOptions } from './harness.js';
import { harnessFromArgs, runSlicerBench } from './slicer.js';
import { runE2eBench } from './e2e.js';
import { runConvertBench } from './convert.js';
import { runOverloadBench } from './overload.js';
import { runFlowsBench } from './flows.js';
import { runLatencyBench } from './latency.js';

interface Entry {
  name: string;
  run: (harness: HarnessOptions, json: boolean, quick: boolean) => Promise<BenchReport>;
}

const BENCHES: Entry[] = [
  { name: 'slicer', run: (harness, json) => runSlicerBench({ harness, json, printSummary: false }) },
  { name: 'e2e', run: (_h, json, quick) => runE2eBench({ json, quick }) },
  { name: 'convert', run: (_h, json, quick) => runConvertBench({ json, quick }) },
  { name: 'overload', run: (_h, json, quick) => runOverloadBench({ json, quick }) },
  { name: 'flows', run: (_h, json, quick) => runFlowsBench({ json, quick }) },
  { name: 'latency', run: (_h, json, quick) => runLatencyBench({ json, quick }) },
];

const args = parseArgs(process.argv.slice(2));
const harness = harnessFromArgs(args);
const m = machine();
console.log(`meshcap benchmarks — ${m.date}`);
console.log(`${m.cpuModel}, nproc ${m.nproc}, ${m.totalMemGiB} GiB, node ${m.node} (V8 ${m.v8}), ${m.platform} ${m.kernel}`);
if (!gcExposedByFlag) console.log('note: run with node --expose-gc (npm run bench does); gc() was enabled at run time instead');

const started = Date.now();
const reports: BenchReport[] = [];
for (const b of BENCHES) {
  if (args.filter && !b.name.includes(args.filter)) continue;
  console.log(`\n# ${b.name}`);
  reports.push(await b.run(harness, args.json, args.quick));
}

console.log('\n# Summary');
const rows = [['bench', 'figure', 'value', 'baseline (same run)', 'ratio', 'target']];
for (const r of reports) for (const s of r.summary) rows.push([s.bench, s.figure, s.value, s.baseline, s.ratio, s.target]);
console.log(table(rows));
for (const r of reports) if (r.jsonPath) console.log(`${r.name}: ${r.jsonPath}`);
console.log(`total ${fmt((Date.now() - started) / 1000, 1)} s`);
