;; meshcap's packet kernel: the per-segment work of the slicer in WebAssembly SIMD.
;;
;; Source of src/packet/kernel-wasm.ts (generated: `node scripts/build-wasm.mjs`; a unit test fails
;; when the two disagree). The memory is imported: it holds the output blocks (src/packet/block.ts)
;; and a small scratch area for header templates (one slot per direction), so both functions work
;; in place. It is shared (a SharedArrayBuffer): the capture writer thread writes the blocks to disk
;; from it (src/sink/capture-writer-thread.ts). The kernel itself uses no atomics.
;;
;; Checksums are one's-complement sums of little-endian 16-bit loads (the "LE domain" of
;; checksum.ts): the sum of a byte string is byte order independent up to a final swap (RFC 1071
;; §2(B)), so a checksum computed this way is stored with a little-endian store and lands right.
(module
  (import "env" "memory" (memory 1 65536 shared))

  ;; Folds an unfolded sum to 16 bits with end-around carry (inputs below 2^48).
  (func $fold (param $s i64) (result i32)
    (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
    (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
    (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
    (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
    (i32.wrap_i64 (local.get $s)))

  ;; The four u32 lanes of a vector accumulator, added as u64.
  (func $lanes (param $v v128) (result i64)
    (i64.add
      (i64.add (i64.extend_i32_u (i32x4.extract_lane 0 (local.get $v))) (i64.extend_i32_u (i32x4.extract_lane 1 (local.get $v))))
      (i64.add (i64.extend_i32_u (i32x4.extract_lane 2 (local.get $v))) (i64.extend_i32_u (i32x4.extract_lane 3 (local.get $v))))))

  ;; Unfolded sum of the bytes [p, p+n) taken as LE u16 words, pairing from p; an odd last byte is
  ;; padded with zero. The u32 lanes cannot overflow for n < 512 KiB (each step adds < 2^17).
  (func $sumRange (param $p i32) (param $n i32) (result i64)
    (local $acc v128) (local $e i32) (local $s i64)
    (local.set $e (i32.add (local.get $p) (i32.and (local.get $n) (i32.const -16))))
    (block $out
      (loop $next
        (br_if $out (i32.ge_u (local.get $p) (local.get $e)))
        (local.set $acc (i32x4.add (local.get $acc) (i32x4.extadd_pairwise_i16x8_u (v128.load (local.get $p)))))
        (local.set $p (i32.add (local.get $p) (i32.const 16)))
        (br $next)))
    (local.set $s (call $lanes (local.get $acc)))
    (local.set $e (i32.add (local.get $p) (i32.and (local.get $n) (i32.const 15))))
    (block $out
      (loop $next
        (br_if $out (i32.lt_u (i32.sub (local.get $e) (local.get $p)) (i32.const 2)))
        (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (i32.load16_u (local.get $p)))))
        (local.set $p (i32.add (local.get $p) (i32.const 2)))
        (br $next)))
    (if (i32.lt_u (local.get $p) (local.get $e))
      (then (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (i32.load8_u (local.get $p)))))))
    (local.get $s))

  ;; The 16-bit folded sum of [p, p+n): the checksum of a segment already in place (control
  ;; segments, the JavaScript path of the slicer).
  (func (export "sum") (param $p i32) (param $n i32) (result i32)
    (call $fold (call $sumRange (local.get $p) (local.get $n))))

  ;; Byte swap, for the acknowledgement number (once per call; the per-segment swaps are inline:
  ;; a call per field cost more than the swap).
  (func $bswap32 (param $x i32) (result i32)
    (i32.or
      (i32.or (i32.shl (local.get $x) (i32.const 24)) (i32.shl (i32.and (local.get $x) (i32.const 0xff00)) (i32.const 8)))
      (i32.or (i32.and (i32.shr_u (local.get $x) (i32.const 8)) (i32.const 0xff00)) (i32.shr_u (local.get $x) (i32.const 24)))))

  ;; Lays out one event's worth of data segments as finished records, in place.
  ;;
  ;; On entry the `bytes` payload bytes sit contiguously where the first segment's payload goes
  ;; (rec + head + hdr); the slicer put them there with one copy from the received message. The
  ;; segments are MSS-sized (the last may be shorter) and become n = ceil(bytes / mss) records of
  ;; the output format, starting at rec: fmt 0 = pcapng EPB with epb_flags = dir, fmt 1 = classic
  ;; pcap record (ts0/ts1 = seconds and µs or ns; for pcapng the high and low words of the
  ;; nanosecond timestamp). Working from the last segment to the first, each payload is moved to
  ;; its place (summing it on the way), then the template header at tmpl is copied in front of it
  ;; and patched: IPv4 total length, id (ipid + k) and header checksum, or the IPv6 payload length;
  ;; TCP seq (seq + k * mss), ack, flags (ACK, lastFlags on the last segment) and checksum
  ;; (pseudo = the unfolded address part of the pseudo-header). Returns the offset past the last
  ;; record.
  (func (export "segments")
    (param $rec i32) (param $bytes i32) (param $mss i32) (param $tmpl i32) (param $hdr i32) (param $v6 i32)
    (param $seq i32) (param $ack i32) (param $ipid i32) (param $pseudo i32) (param $lastFlags i32)
    (param $fmt i32) (param $ts0 i32) (param $ts1 i32) (param $dir i32)
    (result i32)
    (local $n i32) (local $k i32) (local $head i32) (local $stride i32) (local $src0 i32)
    (local $len i32) (local $frame i32) (local $tcp i32) (local $tcpLen i32)
    (local $s i64) (local $o i32) (local $r i32) (local $total i32) (local $end i32)
    (local $dst i32) (local $src i32) (local $i i32) (local $j i32)
    (local $a v128) (local $b v128) (local $v0 v128) (local $v1 v128) (local $v2 v128) (local $v3 v128)
    (local $bias v128) (local $ones v128) (local $ackBE i32)
    (local $t0 v128) (local $t1 v128) (local $t2 v128) (local $t3 v128) (local $tEnd v128)
    (local $ipSum i32) (local $tcpSum i64) (local $lenBE i32)
    ;; The sum of a piece uses pmaddwd (i32x4.dot_i16x8_s: two words per lane in one instruction),
    ;; which multiplies signed words: each u16 word w is biased to w - 32768 by flipping its top
    ;; bit, and 65536 per 16 bytes is added back at the end of the piece.
    (local.set $bias (i16x8.splat (i32.const 0x8000)))
    (local.set $ones (i16x8.splat (i32.const 1)))
    (local.set $head (select (i32.const 28) (i32.const 16) (i32.eqz (local.get $fmt))))
    ;; Record stride of a full segment: pcapng 28 + pad4(frame) + flags(8) + endofopt(4) + length(4).
    (local.set $stride
      (select
        (i32.add (i32.const 44) (i32.and (i32.add (i32.add (local.get $hdr) (local.get $mss)) (i32.const 3)) (i32.const -4)))
        (i32.add (i32.const 16) (i32.add (local.get $hdr) (local.get $mss)))
        (i32.eqz (local.get $fmt))))
    (local.set $n (i32.div_u (i32.sub (i32.add (local.get $bytes) (local.get $mss)) (i32.const 1)) (local.get $mss)))
    (local.set $src0 (i32.add (local.get $rec) (i32.add (local.get $head) (local.get $hdr))))
    (local.set $tcp (select (i32.const 54) (i32.const 34) (local.get $v6)))
    (local.set $ackBE (call $bswap32 (local.get $ack)))
    (local.set $t0 (v128.load offset=0 (local.get $tmpl)))
    (local.set $t1 (v128.load offset=16 (local.get $tmpl)))
    (local.set $t2 (v128.load offset=32 (local.get $tmpl)))
    (local.set $t3 (v128.load offset=48 (local.get $tmpl)))
    (local.set $tEnd (v128.load (i32.add (local.get $tmpl) (i32.sub (local.get $hdr) (i32.const 16)))))
    ;; Template sums: the IPv4 header (ten words) and the TCP header (ten words) with the address
    ;; part of the pseudo-header and the acknowledgement number, the same for every segment.
    (local.set $ipSum (i32.wrap_i64 (call $sumRange (i32.add (local.get $tmpl) (i32.const 14)) (i32.const 20))))
    (local.set $tcpSum (i64.add (call $sumRange (i32.add (local.get $tmpl) (local.get $tcp)) (i32.const 20))
      (i64.add (i64.extend_i32_u (local.get $pseudo)) (i64.extend_i32_u (local.get $ackBE)))))
    (local.set $k (local.get $n))
    (block $done
      (loop $segment
        (br_if $done (i32.eqz (local.get $k)))
        (local.set $k (i32.sub (local.get $k) (i32.const 1)))
        (local.set $len
          (select
            (i32.sub (local.get $bytes) (i32.mul (local.get $k) (local.get $mss)))
            (local.get $mss)
            (i32.eq (local.get $k) (i32.sub (local.get $n) (i32.const 1)))))
        (local.set $frame (i32.add (i32.add (local.get $rec) (i32.mul (local.get $k) (local.get $stride))) (local.get $head)))

        ;; The payload piece into place, summed on the way. The copy runs from the end down so that
        ;; an overlapping move (dst > src) never reads a byte it already overwrote; each 64-byte step
        ;; loads before it stores, and the shift is at least one record's overhead plus headers
        ;; (70 bytes), so the steps cannot overlap either. Segment 0 is already in place: the same
        ;; loop then rewrites each byte where it is.
        (local.set $dst (i32.add (local.get $frame) (local.get $hdr)))
        (local.set $src (i32.add (local.get $src0) (i32.mul (local.get $k) (local.get $mss))))
        ;; The ragged end (len mod 16 bytes) in pieces of 8, 4, 2 and 1 bytes, each starting at an even
        ;; offset, so its little-endian value is already its words' sum (2^16 = 1 mod 65535; a last
        ;; odd byte pairs with an implicit zero). A shift is at least 70 bytes, so these stores
        ;; cannot reach a source byte not yet read.
        (local.set $i (i32.and (local.get $len) (i32.const -16)))
        (local.set $j (local.get $i))
        (local.set $s (i64.const 0))
        (if (i32.and (local.get $len) (i32.const 8))
          (then
            (local.set $o (i32.load offset=0 (i32.add (local.get $src) (local.get $j))))
            (local.set $r (i32.load offset=4 (i32.add (local.get $src) (local.get $j))))
            (i32.store offset=0 (i32.add (local.get $dst) (local.get $j)) (local.get $o))
            (i32.store offset=4 (i32.add (local.get $dst) (local.get $j)) (local.get $r))
            (local.set $s (i64.add (i64.extend_i32_u (local.get $o)) (i64.extend_i32_u (local.get $r))))
            (local.set $j (i32.add (local.get $j) (i32.const 8)))))
        (if (i32.and (local.get $len) (i32.const 4))
          (then
            (local.set $o (i32.load (i32.add (local.get $src) (local.get $j))))
            (i32.store (i32.add (local.get $dst) (local.get $j)) (local.get $o))
            (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (local.get $o))))
            (local.set $j (i32.add (local.get $j) (i32.const 4)))))
        (if (i32.and (local.get $len) (i32.const 2))
          (then
            (local.set $o (i32.load16_u (i32.add (local.get $src) (local.get $j))))
            (i32.store16 (i32.add (local.get $dst) (local.get $j)) (local.get $o))
            (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (local.get $o))))
            (local.set $j (i32.add (local.get $j) (i32.const 2)))))
        (if (i32.and (local.get $len) (i32.const 1))
          (then
            (local.set $o (i32.load8_u (i32.add (local.get $src) (local.get $j))))
            (i32.store8 (i32.add (local.get $dst) (local.get $j)) (local.get $o))
            (local.set $s (i64.add (local.get $s) (i64.extend_i32_u (local.get $o))))))
        ;; the 16-byte pieces above the largest multiple of 64
        (local.set $a (v128.const i64x2 0 0))
        (local.set $b (v128.const i64x2 0 0))
        (block $out
          (loop $next
            (br_if $out (i32.eqz (i32.and (local.get $i) (i32.const 48))))
            (local.set $i (i32.sub (local.get $i) (i32.const 16)))
            (local.set $v0 (v128.load (i32.add (local.get $src) (local.get $i))))
            (v128.store (i32.add (local.get $dst) (local.get $i)) (local.get $v0))
            (local.set $a (i32x4.add (local.get $a) (i32x4.dot_i16x8_s (v128.xor (local.get $v0) (local.get $bias)) (local.get $ones))))
            (br $next)))
        ;; 64 bytes a step, two accumulators
        (block $out
          (loop $next
            (br_if $out (i32.eqz (local.get $i)))
            (local.set $i (i32.sub (local.get $i) (i32.const 64)))
            (local.set $j (i32.add (local.get $src) (local.get $i)))
            (local.set $v0 (v128.load offset=0 (local.get $j)))
            (local.set $v1 (v128.load offset=16 (local.get $j)))
            (local.set $v2 (v128.load offset=32 (local.get $j)))
            (local.set $v3 (v128.load offset=48 (local.get $j)))
            (local.set $j (i32.add (local.get $dst) (local.get $i)))
            (v128.store offset=0 (local.get $j) (local.get $v0))
            (v128.store offset=16 (local.get $j) (local.get $v1))
            (v128.store offset=32 (local.get $j) (local.get $v2))
            (v128.store offset=48 (local.get $j) (local.get $v3))
            (local.set $a (i32x4.add (local.get $a)
              (i32x4.add
                (i32x4.dot_i16x8_s (v128.xor (local.get $v0) (local.get $bias)) (local.get $ones))
                (i32x4.dot_i16x8_s (v128.xor (local.get $v1) (local.get $bias)) (local.get $ones)))))
            (local.set $b (i32x4.add (local.get $b)
              (i32x4.add
                (i32x4.dot_i16x8_s (v128.xor (local.get $v2) (local.get $bias)) (local.get $ones))
                (i32x4.dot_i16x8_s (v128.xor (local.get $v3) (local.get $bias)) (local.get $ones)))))
            (br $next)))
        ;; lanes as signed, plus the bias: 4 lanes x 2 words x 32768 per 16 bytes
        (local.set $a (i32x4.add (local.get $a) (local.get $b)))
        (local.set $s (i64.add (local.get $s)
          (i64.add
            (i64.add
              (i64.add (i64.extend_i32_s (i32x4.extract_lane 0 (local.get $a))) (i64.extend_i32_s (i32x4.extract_lane 1 (local.get $a))))
              (i64.add (i64.extend_i32_s (i32x4.extract_lane 2 (local.get $a))) (i64.extend_i32_s (i32x4.extract_lane 3 (local.get $a)))))
            (i64.shl (i64.extend_i32_u (i32.and (local.get $len) (i32.const -16))) (i64.const 14)))))

        ;; Headers: the template (54 or 74 bytes) with 16-byte stores, the last one overlapping the
        ;; one before it rather than running past the header into the payload.
        (v128.store offset=0 (local.get $frame) (local.get $t0))
        (v128.store offset=16 (local.get $frame) (local.get $t1))
        (v128.store offset=32 (local.get $frame) (local.get $t2))
        (if (local.get $v6) (then (v128.store offset=48 (local.get $frame) (local.get $t3))))
        (v128.store (i32.add (local.get $frame) (i32.sub (local.get $hdr) (i32.const 16))) (local.get $tEnd))
        ;; The variable fields, big-endian. Both checksums are computed from the template's sums
        ;; (taken once per call, with these fields zero) plus the fields' values, not read back
        ;; from the frame: a load straddling the stores just made would stall store forwarding.
        (local.set $tcpLen (i32.add (i32.const 20) (local.get $len)))
        (local.set $lenBE (i32.or (i32.shl (i32.and (local.get $tcpLen) (i32.const 0xff)) (i32.const 8)) (i32.and (i32.shr_u (local.get $tcpLen) (i32.const 8)) (i32.const 0xff))))
        (if (local.get $v6)
          (then (i32.store16 offset=18 (local.get $frame) (local.get $lenBE)))
          (else
            (local.set $r (i32.add (local.get $tcpLen) (i32.const 20)))
            (local.set $r (i32.or (i32.shl (i32.and (local.get $r) (i32.const 0xff)) (i32.const 8)) (i32.and (i32.shr_u (local.get $r) (i32.const 8)) (i32.const 0xff))))
            (local.set $o (i32.add (local.get $ipid) (local.get $k)))
            (local.set $o (i32.or (i32.shl (i32.and (local.get $o) (i32.const 0xff)) (i32.const 8)) (i32.and (i32.shr_u (local.get $o) (i32.const 8)) (i32.const 0xff))))
            (i32.store16 offset=16 (local.get $frame) (local.get $r))
            (i32.store16 offset=18 (local.get $frame) (local.get $o))
            (local.set $r (i32.add (local.get $ipSum) (i32.add (local.get $r) (local.get $o))))
            (local.set $r (i32.add (i32.and (local.get $r) (i32.const 0xffff)) (i32.shr_u (local.get $r) (i32.const 16))))
            (local.set $r (i32.add (i32.and (local.get $r) (i32.const 0xffff)) (i32.shr_u (local.get $r) (i32.const 16))))
            (i32.store16 offset=24 (local.get $frame) (i32.xor (local.get $r) (i32.const 0xffff)))))
        (local.set $o (i32.add (local.get $frame) (local.get $tcp)))
        (local.set $r (i32.add (local.get $seq) (i32.mul (local.get $k) (local.get $mss))))
        (local.set $r
          (i32.or
            (i32.or (i32.shl (local.get $r) (i32.const 24)) (i32.shl (i32.and (local.get $r) (i32.const 0xff00)) (i32.const 8)))
            (i32.or (i32.and (i32.shr_u (local.get $r) (i32.const 8)) (i32.const 0xff00)) (i32.shr_u (local.get $r) (i32.const 24)))))
        (i32.store offset=4 (local.get $o) (local.get $r))
        (i32.store offset=8 (local.get $o) (local.get $ackBE))
        (local.set $j (select (local.get $lastFlags) (i32.const 0x10) (i32.eq (local.get $k) (i32.sub (local.get $n) (i32.const 1)))))
        (i32.store8 offset=13 (local.get $o) (local.get $j))
        ;; TCP checksum: payload + header and pseudo-header (tcpSum) + seq + flags + TCP length
        (local.set $s (i64.add (local.get $s)
          (i64.add
            (i64.add (local.get $tcpSum) (i64.extend_i32_u (local.get $r)))
            (i64.extend_i32_u (i32.add (i32.shl (local.get $j) (i32.const 8)) (local.get $lenBE))))))
        (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
        (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
        (local.set $s (i64.add (i64.and (local.get $s) (i64.const 0xffff)) (i64.shr_u (local.get $s) (i64.const 16))))
        (i32.store16 offset=16 (local.get $o) (i32.xor (i32.wrap_i64 (local.get $s)) (i32.const 0xffff)))

        ;; Record framing around the frame of hdr + len bytes.
        (local.set $len (i32.add (local.get $hdr) (local.get $len)))
        (if (i32.eqz (local.get $fmt))
          (then
            (local.set $r (i32.sub (local.get $frame) (i32.const 28)))
            ;; zero the padding to a word boundary (the block is reused): the frame's last word
            ;; keeps its frame bytes, its bytes past the frame become zero
            (local.set $o (i32.add (local.get $frame) (local.get $len)))
            (if (i32.and (local.get $o) (i32.const 3))
              (then
                (local.set $j (i32.and (local.get $o) (i32.const -4)))
                (i32.store (local.get $j)
                  (i32.and (i32.load (local.get $j))
                    (i32.sub (i32.shl (i32.const 1) (i32.shl (i32.and (local.get $o) (i32.const 3)) (i32.const 3))) (i32.const 1))))
                (local.set $o (i32.add (local.get $j) (i32.const 4)))))
            (local.set $total (i32.sub (i32.add (local.get $o) (i32.const 16)) (local.get $r)))
            (i32.store offset=0 (local.get $o) (i32.const 0x00040002)) ;; epb_flags, length 4
            (i32.store offset=4 (local.get $o) (local.get $dir))
            (i32.store offset=8 (local.get $o) (i32.const 0)) ;; opt_endofopt
            (i32.store offset=12 (local.get $o) (local.get $total))
            (i32.store offset=0 (local.get $r) (i32.const 6)) ;; EPB
            (i32.store offset=4 (local.get $r) (local.get $total))
            (i32.store offset=8 (local.get $r) (i32.const 0)) ;; interface 0
            (i32.store offset=12 (local.get $r) (local.get $ts0))
            (i32.store offset=16 (local.get $r) (local.get $ts1))
            (i32.store offset=20 (local.get $r) (local.get $len))
            (i32.store offset=24 (local.get $r) (local.get $len))
            (if (i32.eqz (local.get $end)) (then (local.set $end (i32.add (local.get $r) (local.get $total))))))
          (else
            (local.set $r (i32.sub (local.get $frame) (i32.const 16)))
            (i32.store offset=0 (local.get $r) (local.get $ts0))
            (i32.store offset=4 (local.get $r) (local.get $ts1))
            (i32.store offset=8 (local.get $r) (local.get $len))
            (i32.store offset=12 (local.get $r) (local.get $len))
            (if (i32.eqz (local.get $end)) (then (local.set $end (i32.add (local.get $frame) (local.get $len)))))))
        (br $segment)))
    (local.get $end))
)
