"""Summable field packing (docs/ALGORITHMS.md §3): sums through SUM and AVERAGE reductions stay exact."""

import pytest
import torch

from hvdquant.kernels import ops
from hvdquant.transports import SumFieldLayout


def reduce(payloads, factor):
    """What a SUM allreduce scaled by ``factor`` returns, in float64 as Horovod computes it."""
    total = torch.stack(payloads).sum(0)
    return total * factor


@pytest.mark.parametrize("levels,ranks", [(1, 1), (1, 2), (1, 4), (3, 2), (3, 8), (7, 5), (127, 16)])
@pytest.mark.parametrize("factor_of_p", ["sum", "average", "predivide"])
def test_roundtrip_exact(levels, ranks, factor_of_p):
    layout = SumFieldLayout.for_levels(levels, ranks)
    n = 1001
    gen = torch.Generator().manual_seed(levels * 100 + ranks)
    codes = [torch.randint(-levels, levels + 1, (n,), generator=gen, dtype=torch.int8) for _ in range(ranks)]
    codes[0][:50] = levels  # extremes: every field at its maximum sum on some coordinates
    for c in codes:
        c[:100] = levels  # the first words: every digit at its maximum sum R − 1, words near R^F
    factor = {"sum": 1.0, "average": 1.0 / ranks, "predivide": (1 / 3) * (3 / ranks)}[factor_of_p]
    ksum, got_factor = layout.unpack(reduce([layout.pack(c) for c in codes], factor), n)
    assert got_factor == pytest.approx(factor, rel=1e-12)
    assert torch.equal(ksum, torch.stack([c.int() for c in codes]).sum(0))


def test_radix_and_payload_size():
    layout = SumFieldLayout.for_levels(1, 2)  # offsets in [0, 2], sums in [0, 4]: base-5 digits
    assert (layout.radix, layout.per_word) == (5, 21)  # 5^21 ≈ 4.8e14 ≤ 2^50 < 5^22
    payload = layout.pack(torch.zeros(1000, dtype=torch.int8))
    assert payload.dtype == torch.float64 and payload.numel() == 48 + 1  # ceil(1000/21) + sentinel
    assert (SumFieldLayout.for_levels(1, 4).radix, SumFieldLayout.for_levels(1, 4).per_word) == (9, 15)


@pytest.mark.parametrize("span,ranks", [(1, 1), (2, 1), (2, 2), (2, 3), (2, 4), (2, 8), (6, 4), (2, 64), (254, 16),
                                        (1, 1 << 20), (254, 1 << 40)])
def test_per_word_is_the_most_digits_that_fit(span, ranks):
    """R^F ≤ 2^50 < R^(F+1): no float64 word is wasted and none can overflow."""
    layout = SumFieldLayout(0, span, ranks)
    r, f = layout.radix, layout.per_word
    assert r ** f <= 2 ** 50 < r ** (f + 1)


def test_bad_scaling_refused():
    layout = SumFieldLayout.for_levels(1, 2)
    payload = layout.pack(torch.zeros(10, dtype=torch.int8))
    payload[-1] = 0.0
    with pytest.raises(ValueError, match="scaled the payload"):
        layout.unpack(payload, 10)
    with pytest.raises(ValueError, match="expected"):
        layout.unpack(payload[:-1], 10)


def test_too_wide_refused():
    with pytest.raises(ValueError, match="float64 word"):
        SumFieldLayout.for_levels(127, 1 << 45)


@pytest.mark.parametrize("radix", [2, 3, 5, 7, 9, 13, 17, 25, 255, 4065, (1 << 16) + 1, (1 << 25) - 1, (1 << 31) - 1])
def test_digit_split_is_exact_up_to_the_word_limit(radix):
    """The float64 splitter (⌊(t + ½)·fl(1/R^j)⌋, no integer division) against Python's divmod, on
    the words where rounding would bite: R^F − 1 (every digit R − 1), multiples of R^j and their
    neighbours, and random words below R^F ≤ 2^50."""
    f = SumFieldLayout(0, radix - 1, 1).per_word
    assert SumFieldLayout(0, radix - 1, 1).radix == radix
    top = radix ** f
    gen = torch.Generator().manual_seed(radix)
    words = [top - 1, 0, 1, top // 2]
    for j in range(1, f):
        words += [radix ** j - 1, radix ** j, radix ** j + 1, top - radix ** j, top - radix ** j - 1]
    words += [int(x) for x in (torch.rand(2000, generator=gen, dtype=torch.float64) * top).long()]
    words = [min(max(w, 0), top - 1) for w in words]
    got = ops.unpack_sum_fields(torch.tensor(words, dtype=torch.float64), len(words) * f, 0, radix, f)
    want = []
    for w in words:
        for _ in range(f):
            w, d = divmod(w, radix)
            want.append(d)
    assert got.tolist() == want
