/**
 * Command-line flags against a table of option specs, the errors they raise, and the usage text.
 * Kept apart from config.ts (serve's configuration, which validates broker, live and admin
 * settings with those modules) so that `convert`, `collect` and `version` start without loading
 * them.
 */
import { parseArgs } from 'node:util';

export type Kind = 'string' | 'int' | 'bool' | 'list';

export interface OptionSpec {
  /** Long flag and config-file key (kebab-case). */
  name: string;
  short?: string;
  kind: Kind;
  help: string;
  min?: number;
  max?: number;
  choices?: string[];
}

/** A usage or configuration error: reported in one line, exit code 2 (like tcpdump). */
export class ConfigError extends Error {}

/** Parses flags against a spec table; unknown flags are errors that say so. */
export function parseFlags(argv: string[], specs: OptionSpec[], allowPositionals = false): Record<string, unknown> & { _: string[] } {
  const options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }> = {};
  for (const s of specs) {
    options[s.name] = { type: s.kind === 'bool' ? 'boolean' : 'string', ...(s.short ? { short: s.short } : {}), ...(s.kind === 'list' ? { multiple: true } : {}) };
  }
  try {
    const { values, positionals } = parseArgs({ args: argv, options, allowPositionals, strict: true });
    return { ...(values as Record<string, unknown>), _: positionals };
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
}

export function usage(specs: OptionSpec[]): string {
  return specs
    .map((s) => {
      const flag = `  ${s.short ? `-${s.short}, ` : '    '}--${s.name}${s.kind === 'bool' ? '' : ' VALUE'}`;
      return `${flag.padEnd(36)}  ${s.help}`;
    })
    .join('\n');
}
