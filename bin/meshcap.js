#!/usr/bin/env -S node --initial-old-space-size=64
// Entry point of the `meshcap` command. The TypeScript sources are compiled to dist/ by
// `npm ci` / `npm install` (the package's prepare script).
//
// --initial-old-space-size=64 (also in the Dockerfile's ENTRYPOINT and `npm start`; V8 reads it at
// start-up only): V8's old-generation limit otherwise settles just above meshcap's ~10 MB of live
// data, and at a few hundred MB/s of tap messages it then starts a major GC every 30-50 ms, which
// costs ~0.2 cores of GC threads and a tenth of the main thread. See bench/README.md.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const main = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(main))) {
  console.error('meshcap: dist/ is missing; run `npm ci` (or `npm run build`) in the meshcap checkout first.');
  process.exit(2);
}
const { run } = await import(main.href);
// Exit explicitly: a command that failed half-way through start-up may leave servers open.
process.exit(await run(process.argv.slice(2)));
