"""The fused DQSG passes: one pass per range from the gradient to its packed payload (own
scales) or to its summable fields (common scales, docs/ALGORITHMS.md §3), and back, through
scratch buffers: no symbol array in memory. Bit-identical to the unfused kernels run in turn."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from .constants import F32_ONE


def build(jit: Callable, leaf: Callable, *, tally, dither_range, bucket_absmax, bucket_step, unpack_bits, unpack_radix,
          pack_range, field_word, split_word, quantize_range, reconstruct_range) -> SimpleNamespace:
    """The fused payload and summable-field passes, compiled."""

    @leaf
    def count_symbols(sym, n, alphabet, counts, row):
        """counts[row, v] += #{i < n : sym[i] = v}: one counting pass per value (they vectorize; a
        scatter of increments does not) for small alphabets, the scatter for large ones. Values
        that do not occur add nothing (on the GPU every tally is an atomic add)."""
        if alphabet <= 16:
            for v in range(alphabet):
                c = 0
                for i in range(n):
                    c += np.int64(sym[i] == v)
                if c:
                    tally(counts, row, v, c)
        else:
            for i in range(n):
                tally(counts, row, sym[i], 1)

    # Each fused pass is a sequence of *phases*, range functions named in its table entry with the
    # unit a phase works in (4 elements: a Philox block; a packing group; a summable word). The
    # block function runs its phases in turn over its whole range (the CPU: one range per chunk,
    # vectorized); the GPU runs a range per CUDA block, each phase's units spread over the block's
    # threads with a barrier between phases, the scratch buffers in shared memory
    # (kernels/cuda.py). Every phase reads and writes only its own units, so both orders give the
    # same bits. A phase's parameters are named as the block function's (its scratch buffers
    # indexed from its own i0).

    # ------------------------------------------------------------------ fused DQSG payload passes
    # One pass per range [i0, i1) from the gradient to its packed payload and back (i0 a multiple of
    # 4 and of the packing group: ``per_byte`` symbols for radix packing, 8 for bit packing), through
    # scratch buffers u (float32) and sym (uint8) of at least i1 − i0 entries: no symbol array in
    # memory. ``radix`` > 0 selects radix packing, else bit packing with ``nbits``.

    @jit
    def quantize_symbols(i0, i1, u, sym, g, delta, bucket, levels, counts, row, step, tid, sender, ranks, key0, key1):
        """Phase: sym[i − i0] = k_i + s, the DQSG symbols of [i0, i1) (:func:`dqsg_encode` with offset
        s), counted into counts[row] (for the entropy statistic)."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, levels, sym, i0)
        count_symbols(sym, i1 - i0, 2 * levels + 1, counts, row % counts.shape[0])

    @leaf
    def pack_symbols(i0, i1, sym, radix, nbits, per_byte, packed):
        """Phase: the symbols sym[0 : i1 − i0] packed into their bytes of ``packed``."""
        pack_range(i0, i1, sym, radix, nbits, per_byte, packed)

    @leaf
    def unpack_symbols(i0, i1, sym, packed, radix, nbits, per_byte):
        """Phase: the symbols of [i0, i1) unpacked from ``packed`` into sym[0 : i1 − i0]."""
        n = i1 - i0
        if radix > 0:
            for q in range(0, n, per_byte):
                unpack_radix(packed, (i0 + q) // per_byte, radix, per_byte, sym, q, n)
        else:
            for q in range(0, n, 8):
                unpack_bits(packed, (i0 + q) // 8 * nbits, nbits, sym, q, n)

    @jit
    def reconstruct_own(i0, i1, u, sym, levels, delta, bucket, out, step, tid, sender, ranks, key0, key1):
        """Phase: out[i] = Δ_b (k_i − u_i) for [i0, i1) from the symbols k + s in sym."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, sym, levels, delta, bucket, F32_ONE, out, i0)

    @jit
    def dqsg_encode_packed(i0, i1, u, sym, g, delta, scaled, bucket, levels, radix, nbits, per_byte, packed,
                           counts, row, step, tid, sender, ranks, key0, key1):
        """Own-scale DQSG payload of [i0, i1): with ``scaled`` (CPU only: a GPU range never holds
        whole buckets, kernels/dispatch.py ``range_span``), first Δ_b = max|g|/s of the buckets the
        range holds (whole buckets; NaN → +inf as :func:`bucket_absmax`); then the phases
        :func:`quantize_symbols` and :func:`pack_symbols`."""
        if scaled:
            for b in range(i0 // bucket, (i1 + bucket - 1) // bucket):
                bucket_absmax(b, g, bucket, delta)
                bucket_step(b, delta, levels, delta)
        quantize_symbols(i0, i1, u, sym, g, delta, bucket, levels, counts, row, step, tid, sender, ranks, key0, key1)
        pack_symbols(i0, i1, sym, radix, nbits, per_byte, packed)

    @jit
    def dqsg_decode_packed(i0, i1, u, sym, packed, levels, radix, nbits, per_byte, delta, bucket, out, step, tid,
                           sender, ranks, key0, key1):
        """Inverse of :func:`dqsg_encode_packed`: out[i] = Δ_b (k_i − u_i) from the packed symbols
        (phases :func:`unpack_symbols`, :func:`reconstruct_own`)."""
        unpack_symbols(i0, i1, sym, packed, radix, nbits, per_byte)
        reconstruct_own(i0, i1, u, sym, levels, delta, bucket, out, step, tid, sender, ranks, key0, key1)

    # ------------------------------------------------------------------ fused DQSG summable fields
    # The stock path's passes (docs/ALGORITHMS.md §3) fused like the payload ones: ranges [i0, i1)
    # start at multiples of 4 and of ``per_word``; scratch u (float32) and sym/ksum of i1 − i0 entries.

    @leaf
    def symbol_words(i0, i1, sym, radix, per_word, words):
        """Phase: words[i0/F ..] = the summable words of the symbols sym[0 : i1 − i0] (F = per_word)."""
        n = i1 - i0
        for q in range(0, n, per_word):
            words[(i0 + q) // per_word] = field_word(sym, q, n, 0, radix, per_word)

    @leaf
    def word_sums(i0, i1, ksum, words, factor, radix, inverses, per_word, offset):
        """Phase: ksum[0 : i1 − i0] = the index sums Σ_p k_p of [i0, i1), split from the reduced words
        (:func:`unpack_sum_fields` with ``offset`` = P·s)."""
        n = i1 - i0
        for q in range(0, n, per_word):
            split_word(words, (i0 + q) // per_word, factor, radix, inverses, per_word, offset, ksum, q, n)

    @jit
    def reconstruct_sums(i0, i1, u, ksum, delta, bucket, first, senders, out, step, tid, ranks, key0, key1):
        """Phase: out[i] = Δ_b (Σ_p k_p[i] − Σ_p u_p[i]) for [i0, i1) (:func:`dqsg_decode`)."""
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, ksum, 0, delta, bucket, F32_ONE, out, i0)

    @jit
    def dqsg_encode_fields(i0, i1, u, sym, g, delta, bucket, levels, radix, per_word, words, counts, row, step, tid,
                           sender, ranks, key0, key1):
        """words[i0/F ..] = the summable fields of the symbols k + s of [i0, i1) (:func:`dqsg_encode` with a
        common Δ, then :func:`pack_sum_fields`), the symbols counted into counts[row]: the phases
        :func:`quantize_symbols` and :func:`symbol_words`."""
        quantize_symbols(i0, i1, u, sym, g, delta, bucket, levels, counts, row, step, tid, sender, ranks, key0, key1)
        symbol_words(i0, i1, sym, radix, per_word, words)

    @jit
    def dqsg_decode_fields(i0, i1, u, ksum, words, factor, radix, inverses, per_word, offset, delta, bucket, first,
                           senders, out, step, tid, ranks, key0, key1):
        """out[i] = Δ_b (Σ_p k_p[i] − Σ_p u_p[i]) for [i0, i1), the index sums read from the reduced
        words: the phases :func:`word_sums` and :func:`reconstruct_sums`."""
        word_sums(i0, i1, ksum, words, factor, radix, inverses, per_word, offset)
        reconstruct_sums(i0, i1, u, ksum, delta, bucket, first, senders, out, step, tid, ranks, key0, key1)

    return SimpleNamespace(count_symbols=count_symbols, quantize_symbols=quantize_symbols, pack_symbols=pack_symbols,
                           unpack_symbols=unpack_symbols, reconstruct_own=reconstruct_own,
                           dqsg_encode_packed=dqsg_encode_packed, dqsg_decode_packed=dqsg_decode_packed,
                           symbol_words=symbol_words, word_sums=word_sums, reconstruct_sums=reconstruct_sums,
                           dqsg_encode_fields=dqsg_encode_fields, dqsg_decode_fields=dqsg_decode_fields)
