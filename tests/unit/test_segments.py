"""Segmented launches (kernels/segments.py, kernels/ops_segments.py): one launch over several tensors
laid end to end gives, tensor by tensor, the bits of one launch per tensor; and the summable
exchange's step costs the same number of launches however many tensors it carries."""

import pytest
import torch
from one_tensor import start

from hvdquant.kernels import DitherKey, ops
from hvdquant.kernels.segments import Segments
from hvdquant.transports.collectives import Started
from hvdquant.transports.sum_schemes import DQSGSum
from hvdquant.transports.summed import SummedExchange

LENGTHS = (1000, 512, 7, 0, 3000, 513, 1)


def tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * (i + 1) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("ranks", [0, 4, 3])  # independent dither; stratified among a power of 2 and not
def test_each_segment_gets_the_bits_of_its_own_launch(ranks):
    keys = tuple(DitherKey(5, 3 + i, 100 + i, 1 if ranks else 7, ranks) for i in range(len(LENGTHS)))
    segs = Segments(LENGTHS, keys, 64)
    gs = tensors()
    rotated = ops.hadamard_rotate_segments(torch.cat(gs), segs)
    own = [ops.hadamard_rotate(g, 64, k) for g, k in zip(gs, keys)]
    assert torch.equal(rotated, torch.cat(own))
    absmax = ops.bucket_absmax_segments(rotated, segs)
    assert torch.equal(absmax, torch.cat([ops.bucket_absmax(r, 64) for r in own]))
    delta = ops.bucket_step(absmax, 3)
    deltas = delta.split(segs.buckets)
    words, counts = ops.dqsg_encode_fields_segments(rotated, delta, segs, 3, 29, 10)
    each = [ops.dqsg_encode_fields(r, d.contiguous(), 64, 3, k, 29, 10) for r, d, k in zip(own, deltas, keys)]
    assert torch.equal(words, torch.cat([w for w, _ in each]))
    assert counts == [c.tolist() for _, c in each]
    senders = ranks - 1 if ranks else 2
    first = Segments(LENGTHS, tuple(k.for_sender(0) for k in keys), 64)
    summed = words * 2.0  # a reduction that doubled the words (factor 2)
    decoded = ops.dqsg_decode_fields_segments(summed, 2.0, 29, 10, 3, delta, first, senders=senders)
    per = [ops.dqsg_decode_fields(w * 2.0, n, 2.0, 29, 10, 3, d.contiguous(), 64, k.for_sender(0), senders=senders)
           for (w, _), n, d, k in zip(each, LENGTHS, deltas, keys)]
    assert torch.equal(decoded, torch.cat(per))
    back = ops.hadamard_rotate_segments(decoded.clone(), first, inverse=True)
    assert torch.equal(back, torch.cat([ops.hadamard_rotate(p, 64, k, inverse=True) for p, k in zip(per, keys)]))


def test_one_launch_whatever_the_number_of_tensors():
    keys = tuple(DitherKey(5, 3, i, 0) for i in range(len(LENGTHS)))
    segs = Segments(LENGTHS, keys, 64)
    before = ops.launches["cpu"]
    ops.bucket_absmax_segments(torch.cat(tensors()), segs)
    assert ops.launches["cpu"] == before + 1


def test_segments_refuse_keys_of_different_senders_or_seeds():
    with pytest.raises(ValueError, match="share the seed, sender"):
        Segments((3, 4), (DitherKey(1, 0, 0, 0), DitherKey(1, 0, 1, 1)), 8)
    with pytest.raises(ValueError, match="one key per length"):
        Segments((3, 4), (DitherKey(1, 0, 0, 0),), 8)


class Immediate:
    rank, size = 0, 1

    def allreduce(self, tensor, name, op="sum"):
        return Started(lambda: tensor.clone(), 0)

    def allgather_bytes(self, buf, name):
        return Started(lambda: [buf], 0)

    def allgather_object(self, obj, name):
        return [obj]


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_summed_exchange_costs_a_constant_number_of_launches_per_step(rotation):
    """One exchange of 3 or of 30 tensors: the same kernel launches (per phase, one for all: rotation,
    maxima, steps, fields, decoding, rotation back)."""
    counts = []
    for count in (3, 30):
        gen = torch.Generator().manual_seed(count)
        grads = {f"layer{i}.weight": torch.randn(40 + 17 * i, 9, generator=gen) for i in range(count)}
        ex = SummedExchange(DQSGSum(3, 64, rotation=rotation), False, Immediate())
        for step in range(2):
            before = ops.launches["cpu"]
            handed = [start(ex, name, g, 5, step) for name, g in grads.items()]
            for finish in handed:
                finish()
            launched = ops.launches["cpu"] - before
        counts.append(launched)
    assert counts[0] == counts[1] == (6 if rotation == "hadamard" else 4)
