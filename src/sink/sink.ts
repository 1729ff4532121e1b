/**
 * A door out. Sinks receive finished Blocks from the pipeline; each keeps its own bounded queue and
 * calls `release` when done with a block. A sink must never block the caller: when it cannot keep
 * up it releases blocks unwritten and counts them (cause `sink_backpressure`).
 */
import type { Block } from '../packet/block.js';

export interface BlockSink {
  readonly name: string;
  /** Takes the block; calls release(block) exactly once when it no longer needs it. */
  write(block: Block, release: (block: Block) => void): void;
  /** Writes everything queued and closes (final file renamed, ISB written). */
  close(): Promise<void>;
  /**
   * Bytes to leave free at the start of the next block (0..4095), so that its records land at the
   * same offset modulo 4 KiB on disk as in memory (the file sink's direct I/O). Asked of the first
   * sink that has it, each time the pipeline takes an empty block.
   */
  nextBlockLead?(): number;
}
