/**
 * Header templates: Ethernet + IPv4/IPv6 + TCP for one direction of one flow. The slicer writes the
 * template of the flow and direction at hand into a scratch area (once per run of events of that
 * flow and direction), copies it in front of each segment and patches only what changes per packet
 * (lengths, IP id, seq/ack, flags, checksums).
 *
 * What a flow keeps for this is a small Uint32Array, its "wire state" (a flow table holds 100,000s
 * of idle flows: a per-flow template Buffer would cost more than everything else a flow holds):
 *
 *   [W_SEQ + d]     next sequence number of direction d (0 = client → server, 1 = back)
 *   [W_IPID + d]    next IPv4 identification of direction d
 *   [W_PSEUDO + d]  address part of the TCP pseudo-header of direction d (checksum.ts domain)
 *   [W_CLIENT..+3]  client IP, big-endian words (IPv4: the first word only)
 *   [W_SERVER..+3]  server IP
 *   [W_PORTS]       client port << 16 | server port
 *   [W_FLAGS]       bit 0: Envoy is the server; bit 1/2: client/server address made up by meshcap
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

export const W_SEQ = 0;
export const W_IPID = 2;
export const W_PSEUDO = 4;
export const W_CLIENT = 6;
export const W_SERVER = 10;
export const W_PORTS = 14;
export const W_FLAGS = 15;
/** 64 bytes: the largest typed array V8 keeps inside its heap object, without a backing store. */
export const WIRE_WORDS = 16;
export const WF_ENVOY_SERVER = 1;
export const WF_CLIENT_SYNTHETIC = 2;
export const WF_SERVER_SYNTHETIC = 4;

export function headerLength(v6: boolean): number {
  return ETH_LEN + (v6 ? IPV6_LEN : IPV4_LEN) + TCP_LEN;
}

/** Offset of the TCP header within a frame. */
export function tcpOffset(v6: boolean): number {
  return ETH_LEN + (v6 ? IPV6_LEN : IPV4_LEN);
}

/**
 * Writes the template of direction d of a flow's wire state into out[off, off + headerLength) —
 * Ethernet (the MACs say which side is Envoy), IPv4 or IPv6, TCP; checksums, lengths, IP id, seq,
 * ack and flags left zero for the slicer.
 */
export function writeTemplate(w: Uint32Array, v6: boolean, d: number, out: Uint8Array, off: number): void {
  const envoyIsServer = (w[W_FLAGS]! & WF_ENVOY_SERVER) !== 0;
  // Direction 0 is client → server; Envoy sends it when Envoy is the client.
  const srcIsEnvoy = (d === 1) === envoyIsServer;
  const dstMac = srcIsEnvoy ? MAC_PEER : MAC_ENVOY;
  const srcMac = srcIsEnvoy ? MAC_ENVOY : MAC_PEER;
  for (let i = 0; i < 6; i++) {
    out[off + i] = dstMac[i]!;
    out[off + 6 + i] = srcMac[i]!;
  }
  const src = d === 0 ? W_CLIENT : W_SERVER;
  const dst = d === 0 ? W_SERVER : W_CLIENT;
  const ports = w[W_PORTS]!;
  const srcPort = d === 0 ? ports >>> 16 : ports & 0xffff;
  const dstPort = d === 0 ? ports & 0xffff : ports >>> 16;
  let o = off + ETH_LEN;
  if (!v6) {
    out[off + 12] = 0x08;
    out[off + 13] = 0x00;
    out[o] = 0x45; // version 4, IHL 5
    out[o + 1] = 0;
    out[o + 2] = out[o + 3] = out[o + 4] = out[o + 5] = 0; // length, id: per packet
    out[o + 6] = 0x40; // DF
    out[o + 7] = 0;
    out[o + 8] = 64; // TTL
    out[o + 9] = 6; // TCP
    out[o + 10] = out[o + 11] = 0; // checksum: per packet
    putWord(out, o + 12, w[src]!);
    putWord(out, o + 16, w[dst]!);
    o += IPV4_LEN;
  } else {
    out[off + 12] = 0x86;
    out[off + 13] = 0xdd;
    out[o] = 0x60; // version 6, traffic class 0, flow label 0
    out[o + 1] = out[o + 2] = out[o + 3] = 0;
    out[o + 4] = out[o + 5] = 0; // payload length: per packet
    out[o + 6] = 6; // next header: TCP
    out[o + 7] = 64; // hop limit
    for (let i = 0; i < 4; i++) {
      putWord(out, o + 8 + 4 * i, w[src + i]!);
      putWord(out, o + 24 + 4 * i, w[dst + i]!);
    }
    o += IPV6_LEN;
  }
  out[o] = srcPort >>> 8;
  out[o + 1] = srcPort & 0xff;
  out[o + 2] = dstPort >>> 8;
  out[o + 3] = dstPort & 0xff;
  for (let i = 4; i < 12; i++) out[o + i] = 0; // seq, ack: per packet
  out[o + 12] = (TCP_LEN / 4) << 4;
  out[o + 13] = 0; // flags: per packet
  out[o + 14] = TCP_WINDOW >>> 8;
  out[o + 15] = TCP_WINDOW & 0xff;
  for (let i = 16; i < 20; i++) out[o + i] = 0; // checksum, urgent pointer
}

function putWord(out: Uint8Array, o: number, v: number): void {
  out[o] = v >>> 24;
  out[o + 1] = (v >>> 16) & 0xff;
  out[o + 2] = (v >>> 8) & 0xff;
  out[o + 3] = v & 0xff;
}

/** An IP address (4 or 16 bytes) into big-endian words at w[at..]. */
export function putAddress(w: Uint32Array, at: number, ip: Uint8Array): void {
  for (let i = 0; i < ip.length; i += 4) w[at + (i >>> 2)] = ((ip[i]! << 24) | (ip[i + 1]! << 16) | (ip[i + 2]! << 8) | ip[i + 3]!) >>> 0;
}

/** The address at w[at..] back as bytes (allocates: for filters and logs, not the hot path). */
export function getAddress(w: Uint32Array, at: number, v6: boolean): Uint8Array {
  const ip = new Uint8Array(v6 ? 16 : 4);
  for (let i = 0; i < ip.length; i += 4) putWord(ip, i, w[at + (i >>> 2)]!);
  return ip;
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
