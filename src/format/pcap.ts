/**
 * Classic pcap (draft-ietf-opsawg-pcap): 24-byte global header, 16-byte record header per frame,
 * Ethernet link type, little-endian. Microsecond magic by default (what Arkime and packet brokers
 * read); the nanosecond magic on request. Comments and drop counts have no place in this format:
 * they are counted in metrics only.
 */
import type { FileHeaderOptions, RecordFramer } from './record-framer.js';

const MAGIC_US = 0xa1b2c3d4;
const MAGIC_NS = 0xa1b23c4d;

function makePcapFramer(nanoseconds: boolean): RecordFramer {
  return {
    name: nanoseconds ? 'pcap-ns' : 'pcap',
    head: 16,
    minOverhead: 16,
    carriesAnnotations: false,
    kernelFormat: 1,
    timestampWords(tsSec, tsNsec, out) {
      out[0] = tsSec >>> 0;
      out[1] = nanoseconds ? tsNsec : Math.floor(tsNsec / 1000);
    },
    recordSize(capLen) {
      return 16 + capLen;
    },
    finish(buf, frameOff, capLen, origLen, tsSec, tsNsec) {
      const start = frameOff - 16;
      buf.writeUInt32LE(tsSec >>> 0, start);
      buf.writeUInt32LE(nanoseconds ? tsNsec : Math.floor(tsNsec / 1000), start + 4);
      buf.writeUInt32LE(capLen, start + 8);
      buf.writeUInt32LE(origLen, start + 12);
      return frameOff + capLen;
    },
    fileHeader(opts: FileHeaderOptions) {
      const h = Buffer.alloc(24);
      h.writeUInt32LE(nanoseconds ? MAGIC_NS : MAGIC_US, 0);
      h.writeUInt16LE(2, 4);
      h.writeUInt16LE(4, 6);
      h.writeUInt32LE(0, 8);
      h.writeUInt32LE(0, 12);
      h.writeUInt32LE(opts.snaplen, 16);
      h.writeUInt32LE(1, 20); // LINKTYPE_ETHERNET
      return h;
    },
  };
}

export const pcapFramer = makePcapFramer(false);
export const pcapNsFramer = makePcapFramer(true);
