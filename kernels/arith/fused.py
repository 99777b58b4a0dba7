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
        scatter of increments does not) for small alphabets, the scatter for large ones."""
        if alphabet <= 16:
            for v in range(alphabet):
                c = 0
                for i in range(n):
                    c += np.int64(sym[i] == v)
                tally(counts, row, v, c)
        else:
            for i in range(n):
                tally(counts, row, sym[i], 1)

    # ------------------------------------------------------------------ fused DQSG payload passes
    # One pass per range [i0, i1) from the gradient to its packed payload and back (i0 a multiple of
    # 4 and of the packing group: ``per_byte`` symbols for radix packing, 8 for bit packing), through
    # scratch buffers u (float32) and sym (uint8) of at least i1 − i0 entries: no symbol array in
    # memory. ``radix`` > 0 selects radix packing, else bit packing with ``nbits``.

    @jit
    def dqsg_encode_packed(i0, i1, u, sym, g, delta, scaled, bucket, levels, radix, nbits, per_byte, packed,
                           counts, row, step, tid, sender, ranks, key0, key1):
        """Own-scale DQSG payload of [i0, i1): with ``scaled``, first Δ_b = max|g|/s of the buckets the
        range holds (whole buckets; NaN → +inf as :func:`bucket_absmax`), then the symbols k + s
        (:func:`dqsg_encode`), counted into counts[row] (for the entropy statistic) and packed."""
        if scaled:
            for b in range(i0 // bucket, (i1 + bucket - 1) // bucket):
                bucket_absmax(b, g, bucket, delta)
                bucket_step(b, delta, levels, delta)
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, levels, sym, i0)
        count_symbols(sym, i1 - i0, 2 * levels + 1, counts, row % counts.shape[0])
        pack_range(i0, i1, sym, radix, nbits, per_byte, packed)

    @jit
    def dqsg_decode_packed(i0, i1, u, sym, packed, levels, radix, nbits, per_byte, delta, bucket, out, step, tid,
                           sender, ranks, key0, key1):
        """Inverse of :func:`dqsg_encode_packed`: out[i] = Δ_b (k_i − u_i) from the packed symbols."""
        n = i1 - i0
        if radix > 0:
            for q in range(0, n, per_byte):
                unpack_radix(packed, (i0 + q) // per_byte, radix, per_byte, sym, q, n)
        else:
            for q in range(0, n, 8):
                unpack_bits(packed, (i0 + q) // 8 * nbits, nbits, sym, q, n)
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, sym, levels, delta, bucket, F32_ONE, out, i0)

    # ------------------------------------------------------------------ fused DQSG summable fields
    # The stock path's passes (docs/ALGORITHMS.md §3) fused like the payload ones: ranges [i0, i1)
    # start at multiples of 4 and of ``per_word``; scratch u (float32) and sym/ksum of i1 − i0 entries.

    @jit
    def dqsg_encode_fields(i0, i1, u, sym, g, delta, bucket, levels, radix, per_word, words, counts, row, step, tid,
                           sender, ranks, key0, key1):
        """words[i0/F ..] = the summable fields of the symbols k + s of [i0, i1) (:func:`dqsg_encode` with a
        common Δ, then :func:`pack_sum_fields`), the symbols counted into counts[row]."""
        dither_range(i0, i1, sender, 1, ranks, u, step, tid, key0, key1)
        quantize_range(i0, i1, u, g, delta, bucket, levels, levels, sym, i0)
        count_symbols(sym, i1 - i0, 2 * levels + 1, counts, row % counts.shape[0])
        n = i1 - i0
        for q in range(0, n, per_word):
            words[(i0 + q) // per_word] = field_word(sym, q, n, 0, radix, per_word)

    @jit
    def dqsg_decode_fields(i0, i1, u, ksum, words, factor, radix, inverses, per_word, offset, delta, bucket, first,
                           senders, out, step, tid, ranks, key0, key1):
        """out[i] = Δ_b (Σ_p k_p[i] − Σ_p u_p[i]) for [i0, i1), the index sums read from the reduced
        words (:func:`unpack_sum_fields` with ``offset`` = P·s, then :func:`dqsg_decode`)."""
        n = i1 - i0
        for q in range(0, n, per_word):
            split_word(words, (i0 + q) // per_word, factor, radix, inverses, per_word, offset, ksum, q, n)
        dither_range(i0, i1, first, senders, ranks, u, step, tid, key0, key1)
        reconstruct_range(i0, i1, u, ksum, 0, delta, bucket, F32_ONE, out, i0)

    return SimpleNamespace(count_symbols=count_symbols, dqsg_encode_packed=dqsg_encode_packed,
                           dqsg_decode_packed=dqsg_decode_packed, dqsg_encode_fields=dqsg_encode_fields,
                           dqsg_decode_fields=dqsg_decode_fields)
