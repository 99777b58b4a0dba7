"""Entropy coding (docs/ALGORITHMS.md §11): chunked rANS round trips on awkward sizes and tables,
its size against the symbols' entropy, refusal of corrupt input, and DQSG(coding="rans"): the same
reconstruction as the fixed-rate payload in fewer bytes where the symbols are far from uniform."""

import math

import pytest
import torch

from hvdquant import DQSG
from hvdquant.codecs import TensorContext
from hvdquant.kernels import DitherKey, ops
from hvdquant.transports.sum_schemes import scheme_for


def draw(probs: list[float], n: int, seed: int = 0) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.multinomial(p, n, replacement=True, generator=gen).to(torch.uint8)


def entropy_bits(sym: torch.Tensor, alphabet: int) -> float:
    counts = torch.bincount(sym, minlength=alphabet).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) * sym.numel()


CHUNK = ops.RANS_CHUNK


@pytest.mark.parametrize("n", [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("probs", [[1.0], [0.5, 0.5], [0.001, 0.05, 0.898, 0.05, 0.001], [1 / 256] * 256,
                                   [0.3, 0.0, 0.7]])
def test_roundtrip_and_size_near_the_entropy(n, probs):
    """Decodes to the same symbols; bytes ≤ entropy + 0.5% + 0.01 bit per symbol (the table's
    rounding to 1/2^14: a symbol of probability p costs log2(M/f) with |f − pM| ≤ 1) + 8 bytes a
    chunk (state and length)."""
    sym = draw(probs, n)
    alphabet = len(probs)
    freq, lengths, stream = ops.rans_encode(sym, torch.bincount(sym, minlength=alphabet))
    assert torch.equal(ops.rans_decode(freq, lengths, stream, n), sym)
    assert lengths.numel() == ops.rans_chunks(n) and freq.numel() == alphabet
    bound = entropy_bits(sym, alphabet) * 1.005 + 0.01 * n + 32 * ops.rans_chunks(n)
    assert 8 * stream.numel() <= bound + 8


def test_table_keeps_every_present_symbol_and_sums_to_the_scale():
    counts = torch.tensor([10**9, 1, 0, 1, 5])
    freq = ops.rans_table(counts)
    assert int(freq.to(torch.int64).sum()) == 1 << 14
    assert freq.tolist()[1:] == [1, 0, 1, 1] and freq.dtype == torch.int16


def test_corrupt_input_is_refused():
    sym = draw([0.2, 0.5, 0.3], 20000)
    freq, lengths, stream = ops.rans_encode(sym, torch.bincount(sym, minlength=3))
    bad = stream.clone()
    bad[len(bad) // 2] ^= 0x5A
    with pytest.raises(ValueError, match="corrupt rANS stream"):
        ops.rans_decode(freq, lengths, bad, sym.numel())
    with pytest.raises(ValueError, match="lengths add up"):
        ops.rans_decode(freq, lengths, stream[:-1], sym.numel())
    wrong = freq.clone()
    wrong[0] += 1
    with pytest.raises(ValueError, match="not a rANS table"):
        ops.rans_decode(wrong, lengths, stream, sym.numel())
    with pytest.raises(ValueError, match="counts sum"):
        ops.rans_encode(sym, torch.bincount(sym[1:], minlength=3))


def context(n: int) -> TensorContext:
    return TensorContext("w", (n,), DitherKey(4, 1, 9, 0), 1)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("levels", [1, 3, 7])
def test_dqsg_rans_reconstructs_as_the_fixed_payload(rotation, levels):
    n = 3 * CHUNK + 100
    torch.manual_seed(levels)
    g = torch.distributions.StudentT(3.0).sample((n,))
    ctx = context(n)
    fixed, coded = DQSG(levels, 512, rotation=rotation), DQSG(levels, 512, rotation=rotation, coding="rans")
    a, b = fixed.encode(g, ctx), coded.encode(g, ctx)
    assert torch.equal(fixed.decode(a, ctx), coded.decode(b, ctx))
    back = coded.from_bytes(b.to_bytes(), n, ctx)
    assert torch.equal(coded.decode(back, ctx), coded.decode(b, ctx))
    # measured bytes: the symbols' entropy plus the scales, the table and 8 bytes a chunk, within 0.02 bit
    expected = n * b.entropy() + 32 * fixed.num_buckets(n) + 16 * (2 * levels + 1) + 64 * ops.rans_chunks(n)
    assert 8 * b.nbytes() <= expected + 0.02 * n
    if rotation == "hadamard" or levels > 1:  # far from uniform symbols: fewer bytes than the packing
        assert b.nbytes() < a.nbytes()


def test_dqsg_rans_aggregate_and_refusals():
    n = 5000
    codec = DQSG(3, 256, rotation="hadamard", coding="rans")
    ctx = TensorContext("w", (n,), DitherKey(4, 1, 9, 0).stratified(3), 3)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(p)) for p in range(3)]
    payloads = [codec.encode(g, ctx.sender(p)) for p, g in enumerate(gs)]
    mean, _ = codec.aggregate(payloads, ctx)
    plain = DQSG(3, 256, rotation="hadamard")
    expected, _ = plain.aggregate([plain.encode(g, ctx.sender(p)) for p, g in enumerate(gs)], ctx)
    assert torch.equal(mean, expected)
    with pytest.raises(TypeError, match="cannot be summed"):
        scheme_for(codec)
    with pytest.raises(ValueError, match="coding"):
        DQSG(coding="huffman")
    assert math.isclose(codec.formula_bits(n), plain.formula_bits(n))
