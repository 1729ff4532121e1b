/**
 * Per-flow header templates: Ethernet + IPv4/IPv6 + TCP for one direction of one flow, built once
 * when the flow opens. The slicer copies the template in front of each segment and patches only
 * what changes per packet (lengths, IP id, seq/ack, flags, checksums).
 */
import type { Endpoint } from '../flow/address.js';

export const ETH_LEN = 14;
export const IPV4_LEN = 20;
export const IPV6_LEN = 40;
export const TCP_LEN = 20;

export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;

/** Window advertised by every synthetic segment; with the SYN's window scale of 14 it is ~1 GiB. */
export const TCP_WINDOW = 0xffff;
export const TCP_WINDOW_SCALE = 14;

/**
 * Locally administered MACs (the 0x02 bit), "mc" in the middle: Envoy's side and the peer's.
 * Real MACs are unknowable above TLS; these only keep Ethernet dissectors happy.
 */
const MAC_ENVOY = [0x02, 0x6d, 0x63, 0x00, 0x00, 0x01];
const MAC_PEER = [0x02, 0x6d, 0x63, 0x00, 0x00, 0x02];

export function headerLength(v6: boolean): number {
  return ETH_LEN + (v6 ? IPV6_LEN : IPV4_LEN) + TCP_LEN;
}

/** Offset of the TCP header within a frame. */
export function tcpOffset(v6: boolean): number {
  return ETH_LEN + (v6 ? IPV6_LEN : IPV4_LEN);
}

/**
 * The template for segments from `src` to `dst`. `srcIsEnvoy` picks the MACs. Checksums, lengths,
 * IP id, seq, ack and flags are left zero for the slicer.
 */
export function buildTemplate(src: Endpoint, dst: Endpoint, srcIsEnvoy: boolean): Buffer {
  const v6 = src.v6;
  const t = Buffer.alloc(headerLength(v6));
  t.set(srcIsEnvoy ? MAC_PEER : MAC_ENVOY, 0); // destination MAC
  t.set(srcIsEnvoy ? MAC_ENVOY : MAC_PEER, 6); // source MAC
  let o = ETH_LEN;
  if (!v6) {
    t.writeUInt16BE(0x0800, 12);
    t[o] = 0x45; // version 4, IHL 5
    t[o + 6] = 0x40; // DF
    t[o + 8] = 64; // TTL
    t[o + 9] = 6; // TCP
    t.set(src.ip, o + 12);
    t.set(dst.ip, o + 16);
    o += IPV4_LEN;
  } else {
    t.writeUInt16BE(0x86dd, 12);
    t[o] = 0x60; // version 6, traffic class 0, flow label 0
    t[o + 6] = 6; // next header: TCP
    t[o + 7] = 64; // hop limit
    t.set(src.ip, o + 8);
    t.set(dst.ip, o + 24);
    o += IPV6_LEN;
  }
  t.writeUInt16BE(src.port, o);
  t.writeUInt16BE(dst.port, o + 2);
  t[o + 12] = (TCP_LEN / 4) << 4;
  t.writeUInt16BE(TCP_WINDOW, o + 14);
  return t;
}

/**
 * The address and protocol part of the TCP pseudo-header, as an unfolded little-endian-domain sum
 * (see checksum.ts). The TCP length is added per segment.
 */
export function pseudoHeaderSum(src: Endpoint, dst: Endpoint): number {
  let acc = 0x0600; // zero byte + protocol 6, big-endian word 0x0006 seen little-endian
  for (const ip of [src.ip, dst.ip]) {
    for (let i = 0; i < ip.length; i += 2) acc += ip[i]! | (ip[i + 1]! << 8);
  }
  return acc;
}
