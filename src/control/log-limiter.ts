/**
 * Bad input must be logged with context, but a flood of it must not flood the log: at most one
 * line per key (e.g. source + reason) per interval, saying how many were suppressed since the
 * last one. Every occurrence is still counted in metrics by the caller.
 */
import type { Logger } from 'pino';

export class LogLimiter {
  private readonly last = new Map<string, { at: number; suppressed: number }>();

  constructor(
    private readonly log: Logger,
    private readonly intervalMs = 1000,
  ) {}

  warn(key: string, fields: Record<string, unknown>, msg: string): void {
    const now = Date.now();
    const entry = this.last.get(key);
    if (entry && now - entry.at < this.intervalMs) {
      entry.suppressed++;
      return;
    }
    const suppressed = entry?.suppressed ?? 0;
    this.last.set(key, { at: now, suppressed: 0 });
    this.log.warn(suppressed ? { ...fields, suppressed } : fields, msg);
  }
}
