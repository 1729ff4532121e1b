import fs from 'node:fs';
import path from 'node:path';

/** Whether `dir`'s filesystem takes O_DIRECT opens (ext4 and xfs do; some tmpfs and overlays do not). */
export function directIoSupported(dir: string): boolean {
  const probe = path.join(dir, '.direct-io-probe');
  fs.writeFileSync(probe, '');
  try {
    fs.closeSync(fs.openSync(probe, fs.constants.O_WRONLY | fs.constants.O_DIRECT));
    return true;
  } catch {
    return false;
  } finally {
    fs.rmSync(probe);
  }
}
