/**
 * Bad input must be logged with context, but a flood of it must not flood the log: per key (e.g.
 * source + reason) at most `burst` lines per interval; the rest are suppressed and the next line
 * logged says how many were. Every occurrence is still counted in metrics by the caller.
 */
import type { Logger } from 'pino';

export class LogLimiter {
  private readonly windows = new Map<string, { start: number; logged: number; suppressed: number }>();

  constructor(
    private readonly log: Logger,
    private readonly burst = 10,
    private readonly intervalMs = 1000,
  ) {}

  warn(key: string, fields: Record<string, unknown>, msg: string): void {
    const now = Date.now();
    let w = this.windows.get(key);
    if (!w || now - w.start >= this.intervalMs) {
      const suppressed = w?.suppressed ?? 0;
      w = { start: now, logged: 0, suppressed };
      this.windows.set(key, w);
    }
    if (w.logged >= this.burst) {
      w.suppressed++;
      return;
    }
    w.logged++;
    const suppressed = w.suppressed;
    w.suppressed = 0;
    this.log.warn(suppressed ? { ...fields, suppressed } : fields, msg);
  }
}
