/**
 * Structured JSON logs (pino) on standard error, so standard output stays free for `-w -`
 * captures. Logs never carry payload bytes: only sizes, ids and reasons. Writes are synchronous:
 * log volume is small (bad input is rate-limited) and no line may be lost at exit.
 */
import pino, { type Logger } from 'pino';

export function createLogger(level: string): Logger {
  return pino({ name: 'meshcap', level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}

/** A logger that drops everything (tests, benchmarks). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
