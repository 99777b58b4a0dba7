"""Entropy coding of symbols with a static table: byte-wise rANS in independent chunks
(docs/ALGORITHMS.md §11; J. Duda, "Asymmetric numeral systems", 2013; the byte-renormalized
32-bit variant).

A table of frequencies f_a (integers summing to M = 2^PROB_BITS, f_a ≥ 1 for every symbol that
occurs) and cumulative counts c_a = Σ_{a' < a} f_{a'} is shared by encoder and decoder (it travels in
the payload). With several tables (rows of ``freq``), symbol i is coded with row ctx[i·ctx_stride]: a
context both sides know before symbol i is coded (``ctx_stride`` = 0: row ctx[0] for every symbol, the
static case). Chunk b holds symbols [b·C, (b+1)·C) and is coded on its own, so chunks encode and
decode in parallel. Its state x lives in [L, 256·L), L = 2^23:

    encode (symbols in reverse order): while x ≥ x_max(a) = 256·(L/M)·f_a:
                                           emit x mod 256 (bytes written backwards), x ← ⌊x/256⌋;
                                       x ← ⌊x/f_a⌋·M + (x mod f_a) + c_a;
                                       finally the 4 bytes of x, lowest first, in front;
    decode (symbols in order):         slot = x mod M; a = the symbol with c_a ≤ slot < c_a + f_a;
                                       x ← f_a·⌊x/M⌋ + slot − c_a; while x < L: x ← 256·x + next byte.

A symbol costs log2(M/f_a) bits plus at most a few bits per chunk: the chunk's size approaches
n_b·H (H the entropy of the table's distribution) for long chunks. Integer arithmetic only, so the
CPU and CUDA kernels give the same bytes. The decoder checks that every chunk ends in the
encoder's initial state having read exactly its bytes; a corrupt chunk sets its status to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 23
U8_MASK = np.uint64(0xFF)
U8_SHIFT = np.uint64(8)
PROB_SHIFT = np.uint64(PROB_BITS)
PROB_MASK = np.uint64(PROB_SCALE - 1)
STATE_LOW = np.uint64(RANS_L)
X_MAX_UNIT = np.uint64((RANS_L >> PROB_BITS) << 8)  # x_max = X_MAX_UNIT · f_a: the state after encoding stays < 2^31
CHUNK_SLACK = 8  # bytes of a chunk's scratch region beyond 2 per symbol: the 4-byte state and margin


def build(jit: Callable, leaf: Callable) -> SimpleNamespace:
    """The chunk encoder, the gather of the chunks into one stream, and the chunk decoder."""

    @leaf
    def rans_encode(b, sym, ctx, ctx_stride, chunk, freq, cum, region, scratch, lengths):
        """Chunk b of ``sym`` coded backwards into the end of scratch[b·region, (b+1)·region);
        its byte count in lengths[b] (−1 if a symbol has frequency 0 in its table). A symbol costs at
        most PROB_BITS bits (f_a ≥ 1), i.e. < 2 bytes, so a region of 2·chunk + CHUNK_SLACK bytes
        always holds the chunk."""
        i0 = b * chunk
        i1 = min(sym.shape[0], i0 + chunk)
        end = b * region + region
        pos = end
        x = STATE_LOW
        for i in range(i1 - 1, i0 - 1, -1):
            a = sym[i]
            m = ctx[i * ctx_stride]
            f = np.uint64(freq[m, a])
            if f == 0:  # a symbol its table cannot code: the chunk is refused, not looped on forever
                lengths[b] = -1
                return
            x_max = X_MAX_UNIT * f
            while x >= x_max:
                pos -= 1
                scratch[pos] = np.uint8(x & U8_MASK)
                x = x >> U8_SHIFT
            x = (x // f) * np.uint64(PROB_SCALE) + (x % f) + np.uint64(cum[m, a])
        for k in range(4):
            scratch[pos - 4 + k] = np.uint8((x >> np.uint64(8 * k)) & U8_MASK)
        lengths[b] = end - (pos - 4)

    @leaf
    def rans_gather(b, scratch, region, lengths, offsets, out):
        """Chunk b's bytes (the last lengths[b] of its scratch region) to out[offsets[b] …]."""
        m = lengths[b]
        src = b * region + region - m
        dst = offsets[b]
        for j in range(m):
            out[dst + j] = scratch[src + j]

    @leaf
    def rans_decode(b, stream, offsets, lengths, chunk, total, ctx, ctx_stride, freq, cum, slot_symbol, out, status):
        """Symbols [b·chunk, min(total, (b+1)·chunk)) from chunk b's bytes; status[b] = 1 if the chunk is corrupt (reads
        past its bytes, leaves bytes unread, or does not end in the encoder's initial state)."""
        i0 = b * chunk
        i1 = min(total, i0 + chunk)
        pos = offsets[b]
        end = pos + lengths[b]
        bad = 0
        if lengths[b] < 4:
            status[b] = 1
            return
        x = np.uint64(0)
        for k in range(4):
            x = x | (np.uint64(stream[pos + k]) << np.uint64(8 * k))
        pos += 4
        for i in range(i0, i1):
            slot = x & PROB_MASK
            m = ctx[i * ctx_stride]
            a = slot_symbol[m, slot]
            x = np.uint64(freq[m, a]) * (x >> PROB_SHIFT) + slot - np.uint64(cum[m, a])
            while x < STATE_LOW:
                byte = np.uint64(0)
                if pos < end:
                    byte = np.uint64(stream[pos])
                else:
                    bad = 1
                pos += 1
                x = (x << U8_SHIFT) | byte
            out[i] = a
        if bad == 1 or pos != end or x != STATE_LOW:
            status[b] = 1
        else:
            status[b] = 0

    return SimpleNamespace(rans_encode=rans_encode, rans_gather=rans_gather, rans_decode=rans_decode)
