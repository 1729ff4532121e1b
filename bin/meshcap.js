#!/usr/bin/env node
// Entry point of the `meshcap` command. The TypeScript sources are compiled to dist/ by
// `npm ci` / `npm install` (the package's prepare script).
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
