import { pcapFramer, pcapNsFramer } from './pcap.js';
import { pcapngFramer } from './pcapng.js';
import type { RecordFramer } from './record-framer.js';

export type CaptureFormat = 'pcapng' | 'pcap' | 'pcap-ns';

export function framerFor(format: CaptureFormat): RecordFramer {
  switch (format) {
    case 'pcapng':
      return pcapngFramer;
    case 'pcap':
      return pcapFramer;
    case 'pcap-ns':
      return pcapNsFramer;
  }
}
