"""The kernel calls that the CUDA twin tests (tests/unit/test_kernels_cuda.py) and the PTX audit
(tests/unit/ptx_audit.py) share: every kernel of kernels/cuda.py, on awkward sizes, with both dither
families and both code layouts. ``CASES[name](n)`` returns the outputs of one group of calls."""

import torch

from hvdquant.kernels import DitherKey, ops

KEY = DitherKey(seed=123456789, step=11, tensor_id=5, sender=1)
STRAT4 = KEY.stratified(4)  # stratified dither among 4 ranks (a power of 2) and among 3 (cycle walk + shift)
STRAT3 = KEY.stratified(3)
SIZES = [0, 1, 7, 130, 517]


def g_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def scales(g, bucket, levels=1):
    return ops.bucket_absmax(g, bucket) / levels


def sym_of(n, hi, seed=0):
    return torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def nested_decode_with_kout(n):
    kout = torch.empty(n, dtype=torch.int32)
    ghat = ops.nested_decode(sym_of(n, 5), scales(g_of(n), 64, 2), 64, 5, g_of(n, 3) * 2, KEY.for_sender(0),
                             senders=2, factor=0.5, kout=kout)
    return ghat, kout


def rotated_in_place(n, bucket, inverse):
    """The rotation with ``out`` = its input (the codec's inverse runs so)."""
    x = g_of(n)
    return ops.hadamard_rotate(x, bucket, KEY, inverse=inverse, out=x)


def rans_roundtrip(n):
    """Skewed symbols over 7 values (one absent), encoded then decoded; n spans several chunks here."""
    m = n * 40  # 0 … 20680 symbols: up to 3 chunks of ops.RANS_CHUNK
    sym = torch.multinomial(torch.tensor([0.02, 0.1, 0.5, 0.0, 0.3, 0.07, 0.01]), m, replacement=True,
                            generator=torch.Generator().manual_seed(n)).to(torch.uint8) if m else \
        torch.empty(0, dtype=torch.uint8)
    freq, lengths, stream = ops.rans_encode(sym, torch.bincount(sym, minlength=7))
    return freq, lengths, stream, ops.rans_decode(freq, lengths, stream, m)


def rans_modelled_roundtrip(n):
    """Symbols over 5 values coded with one of 4 tables chosen by the dither's bins (one table gives
    a present symbol only frequency 1), encoded then decoded."""
    m = n * 40
    contexts = ops.dither_bins(m, STRAT3, 4)
    sym = sym_of(m, 5, 3)
    freq = torch.tensor([[1, 4000, 8000, 4000, 383], [16380, 1, 1, 1, 1], [3000, 3000, 3000, 3000, 4384],
                         [100, 200, 300, 400, 15384]], dtype=torch.int16)
    lengths, stream = ops.rans_encode_modelled(sym, freq, contexts)
    return contexts, lengths, stream, ops.rans_decode(freq, lengths, stream, m, contexts=contexts)


def segmented(n):
    """The segmented twins over four tensors of awkward lengths (one empty), stratified keys."""
    from hvdquant.kernels.segments import Segments

    lengths = (n, 3, 0, 2 * n + 5)
    keys = tuple(DitherKey(123456789, 11 + i, 5 + i, 1, 3) for i in range(4))
    segs = Segments(lengths, keys, 64)
    g = g_of(sum(lengths))
    rotated = ops.hadamard_rotate_segments(g, segs)
    delta = ops.bucket_step(ops.bucket_absmax_segments(rotated, segs), 3)
    words, counts = ops.dqsg_encode_fields_segments(rotated, delta, segs, 3, 19, 11)
    first = Segments(lengths, tuple(k.for_sender(0) for k in keys), 64)
    decoded = ops.dqsg_decode_fields_segments(words * 0.5, 0.5, 19, 11, 9, delta, first, senders=3)
    back = ops.hadamard_rotate_segments(decoded, first, inverse=True, out=decoded)
    return rotated, delta, words, torch.tensor(counts), back


def segmented_nested(n):
    """NDQSG's twins over the same four tensors: checksums of some of them, cosets encoded and
    resolved with their own ratios (one tensor not resolved), packed and unpacked by bits and by
    radix, summable fields of their own radices, and index sums decoded."""
    from hvdquant.kernels.segments import Segments

    lengths = (n, 3, 0, 2 * n + 5)
    keys = tuple(DitherKey(123456789, 11 + i, 5 + i, 0, 3) for i in range(4))
    segs = Segments(lengths, keys, 64)
    g = g_of(sum(lengths))
    delta = ops.bucket_step(ops.bucket_absmax_segments(g, segs), 4)
    k = ops.dqsg_encode_segments(g, delta, segs, 4).to(torch.int32) - 4
    ratios = (4, 0, 2, 8)
    cosets = ops.nested_encode_segments(g, delta, segs, 4, ratios, torch.zeros(sum(lengths), dtype=torch.uint8))
    residues = (k + 2).remainder(4).to(torch.uint8)  # some resolve wrongly at ratios 2 and 8
    kout = ops.nested_decode_segments(residues, delta, segs, ratios, g * 1.01, senders=2)
    unreduced = ops.nested_decode_segments(k * 3 + 2, delta, segs, ratios, g * 0.99, senders=2)
    fields = ((7, 12), (9, 5), (4, 3), (25, 10))
    codes = sym_of(sum(lengths), 4)
    words = ops.pack_sum_fields_segments(codes, segs, fields)
    packed = [ops.pack_cosets_segments(sym_of(sum(lengths), rho, rho), segs, rho) for rho in (4, 6)]
    return (ops.bucket_checksum_segments(k, segs), ops.bucket_checksum_segments(kout, segs, (True, False, True, True)),
            cosets, kout, unreduced, words, *packed,
            *(ops.unpack_cosets_segments(p, segs, rho) for p, rho in zip(packed, (4, 6))),
            ops.unpack_sum_fields_segments(words * 3.0, segs, fields, 3.0),
            ops.dqsg_decode_segments(kout, delta, segs, 0, senders=2))


def segmented_payloads(n):
    """The payload codecs' segmented twins over the same four tensors: DQSG's fused packed passes, 1-bit
    SGD, QSGD, ECDQ's indices, dither bins and rANS. (Their loops are the segmented loops that
    :func:`segmented` runs with several block sizes, around block functions that the single-tensor
    cases run with several block sizes.)"""
    from hvdquant.kernels.segments import Segments

    lengths = (n, 3, 0, 2 * n + 5)
    keys = tuple(DitherKey(123456789, 11 + i, 5 + i, 1, 3) for i in range(4))
    segs = Segments(lengths, keys, 64)
    g = g_of(sum(lengths))
    cols = (next(c for c in (13, 11, 7, 1) if n % c == 0), 3, 1, 1)  # several columns, one, an empty tensor
    pos, neg = ops.onebit_column_means_segments(g, segs, cols)
    bits = ops.bitunpack_segments(ops.bitpack_segments(ops.onebit_encode(g), segs, 1), segs, 1)
    norm = ops.bucket_l2_segments(g, segs)
    codes = ops.qsgd_encode_segments(g, norm, segs, 2)
    levels = ops.unpack_symbols_segments(ops.pack_symbols_segments((codes + 2).view(torch.uint8), segs, 5), segs, 5)
    step = ops.bucket_step(ops.bucket_absmax_segments(g, segs), 4)
    symbols = ops.dqsg_encode_segments(g, step, segs, 9)  # |k| ≤ 4 < 9: the ECDQ layout, never clipped
    bins = ops.dither_bins(segs.elements, segs.key, 8, g.device, segments=segs)
    freq = torch.full((8, 19), 862, dtype=torch.int16)
    freq[:, 0] += 16384 - 862 * 19  # every row sums to M = 2^14
    tables = ops.RansTables(freq)
    chunk_lengths, stream = ops.rans_encode_modelled(symbols, tables, bins, segs)
    decoded_symbols = ops.rans_decode(tables, chunk_lengths, stream, segs.elements, contexts=bins, segments=segs)
    packed_payloads = []
    for s in (1, 3):  # radix and bit packing
        scale, packed, symbol_counts = ops.dqsg_encode_packed_segments(g, segs, s)
        packed_payloads += [scale, packed, torch.tensor(symbol_counts),
                            ops.dqsg_decode_packed_segments(packed, scale, segs, s)]
    return (*packed_payloads, pos, neg, ops.onebit_decode_segments(bits, segs, cols, pos, neg), norm, codes, levels,
            ops.scale_decode_segments(levels.view(torch.int8) - 2, norm, segs, 2), symbols, bins, chunk_lengths,
            stream, decoded_symbols, ops.dqsg_decode_segments(decoded_symbols, step, segs, 9))


CASES = {
    "dither": lambda n: (ops.dither(n, KEY),),
    "absmax": lambda n: (ops.bucket_absmax(g_of(n), 64),
                         ops.bucket_absmax(torch.where(torch.arange(n) % 97 == 3, float("nan"), g_of(n)), 100)),
    "checksum": lambda n: (ops.bucket_checksum(sym_of(n, 15).to(torch.int32) - 7, 64),),
    "l2": lambda n: (ops.bucket_l2(g_of(n), 64), ops.bucket_l2(g_of(n), 100), ops.bucket_l2(g_of(n), 20)),
    "step": lambda n: (ops.bucket_step(ops.bucket_absmax(g_of(n), 64), 3), ops.bucket_step(g_of(n).abs(), 7)),
    "dqsg_encode": lambda n: (ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, KEY),
                              ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, KEY, symbols=True)),
    "dqsg_decode": lambda n: (ops.dqsg_decode(
        torch.randint(-6, 7, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(1)),
        scales(g_of(n), 64, 3), 64, KEY.for_sender(0), senders=3, factor=1 / 3),
                              ops.dqsg_decode(sym_of(n, 7), scales(g_of(n), 64, 3), 64, KEY, offset=3)),
    "stratified": lambda n: (ops.dither(n, STRAT4), ops.dither(n, STRAT3),
                             ops.dqsg_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, STRAT3),
                             ops.dqsg_decode(torch.randint(-6, 7, (n,), dtype=torch.int32,
                                                           generator=torch.Generator().manual_seed(2)),
                                             scales(g_of(n), 64, 3), 64, STRAT4.for_sender(1), senders=2),
                             ops.dqsg_decode(torch.ones(n, dtype=torch.int32), scales(g_of(n), 64, 3), 64,
                                             STRAT4.for_sender(0), senders=4),
                             ops.dqsg_aggregate(torch.stack([sym_of(n, 7, p).view(torch.int8) - 3 for p in range(3)]),
                                                torch.stack([scales(g_of(n, p), 64, 3) for p in range(3)]), 64,
                                                STRAT3.for_sender(0), factor=1 / 3),
                             ops.dqsg_aggregate(torch.stack([sym_of(n, 7, p) for p in range(3)]),
                                                torch.stack([scales(g_of(n, p), 64, 3) for p in range(3)]), 64,
                                                STRAT3.for_sender(0), factor=1 / 3, offset=3)),
    "dqsg_fused": lambda n: (*ops.dqsg_encode_packed(g_of(n), 64, 1, STRAT3),
                             *ops.dqsg_encode_packed(g_of(n), 64, 3, KEY),
                             ops.dqsg_decode_packed(ops.radixpack(sym_of(n, 3), 3), scales(g_of(n), 64), 64, 1,
                                                    STRAT4, n),
                             ops.dqsg_decode_packed(ops.bitpack(sym_of(n, 7), 3), scales(g_of(n), 64, 3), 64, 3,
                                                    KEY, n)),
    "dqsg_fields": lambda n: (*ops.dqsg_encode_fields(g_of(n), scales(g_of(n), 64, 3), 64, 3, STRAT3, 19, 11),
                              ops.dqsg_encode_fields(g_of(n), scales(g_of(n), 64), 64, 1, KEY, 7, 7)[0],
                              ops.dqsg_decode_fields(ops.pack_sum_fields(sym_of(n, 7).to(torch.int8) - 3, 9, 19, 11)
                                                     * 0.5, n, 0.5, 19, 11, 9, scales(g_of(n), 64, 3), 64,
                                                     STRAT3.for_sender(0), senders=3)),
    "hadamard": lambda n: (ops.hadamard_rotate(g_of(n), 256, KEY), ops.hadamard_rotate(g_of(n), 100, STRAT3),
                           ops.hadamard_rotate(g_of(n), 64, KEY, inverse=True),
                           ops.hadamard_rotate(g_of(n), 512, KEY, inverse=True),
                           rotated_in_place(n, 96, False), rotated_in_place(n, 128, True)),
    "rans": lambda n: rans_roundtrip(n),
    "rans_modelled": lambda n: rans_modelled_roundtrip(n),
    "segmented": segmented,
    "segmented_payloads": segmented_payloads,
    "segmented_nested": segmented_nested,
    "dither_bins": lambda n: (ops.dither_bins(n, KEY, 16), ops.dither_bins(n, STRAT4, 256), ops.dither_bins(n, KEY, 1)),
    "nested_encode": lambda n: (ops.nested_encode(g_of(n), scales(g_of(n), 64, 3), 64, 3, 4, KEY),),
    "nested_decode": lambda n: nested_decode_with_kout(n),
    "qsgd": lambda n: (ops.qsgd_encode(g_of(n), ops.bucket_l2(g_of(n), 64), 64, 4, KEY),
                       ops.scale_decode(sym_of(n, 9).to(torch.int8) - 4, ops.bucket_l2(g_of(n), 64),
                                        64, 4)),
    "onebit": lambda n: (*ops.onebit_column_means(g_of(n), 1), *ops.onebit_column_means(g_of(7 * (n // 7 + 1)), 7),
                         ops.onebit_encode(g_of(n)),
                         ops.onebit_decode(sym_of(n, 2), 1, torch.ones(1), -torch.ones(1))),
    "bitpack3": lambda n: (ops.bitpack(sym_of(n, 8), 3), ops.bitunpack(ops.bitpack(sym_of(n, 8), 3), 3, n)),
    "bitpack1": lambda n: (ops.bitpack(sym_of(n, 2), 1),),
    "radix3": lambda n: (ops.radixpack(sym_of(n, 3), 3), ops.radixunpack(ops.radixpack(sym_of(n, 3), 3), 3, n)),
    "modadd4": lambda n: (ops.modadd_cosets(ops.pack_cosets(sym_of(n, 4, 1), 4), ops.pack_cosets(sym_of(n, 4, 2), 4),
                                            4),),
    "modadd5": lambda n: (ops.modadd_cosets(ops.pack_cosets(sym_of(n, 5, 1), 5), ops.pack_cosets(sym_of(n, 5, 2), 5),
                                            5),),
    "sum_fields": lambda n: (ops.pack_sum_fields(sym_of(n, 7).to(torch.int8) - 3, 3, 7, 12),
                             ops.unpack_sum_fields(ops.pack_sum_fields(torch.full((n,), 2, dtype=torch.int8), 3, 7, 12)
                                                   * 0.25, n, 3, 7, 12, factor=0.25)),
}
