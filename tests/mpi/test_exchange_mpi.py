"""The payload transports over the MPI implementation of the collectives interface.

The same :class:`~hvdquant.transports.payload.PayloadExchange` that runs under Horovod runs here
over :class:`~hvdquant.transports.MPICollectives` (no Horovod): replicas bit-identical, results
within the quantizer's bound, NDQSG exact, a NaN on one rank raised on every rank, and the bytes
counted equal to the bytes handed to MPI.
"""

import pytest
import torch

from hvdquant import DQSG, NDQSG, OneBitSGD
from hvdquant.codecs import TensorContext
from hvdquant.keys import dither_key
from hvdquant.transports import MPICollectives, make_exchange


def gradient(rank: int, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank)).reshape(10, n // 10)


def same_everywhere(coll: MPICollectives, t: torch.Tensor) -> bool:
    return all(torch.equal(t, other) for other in coll.allgather_object(t, "check"))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_dqsg_exchange_over_mpi_is_identical_and_within_the_step(reducer):
    coll = MPICollectives()
    codec = DQSG(levels=1, bucket_size=64)
    out = make_exchange(codec, reducer, True, coll).start("w", gradient(coll.rank), seed=3, step=0)()
    everyone = [gradient(p) for p in range(coll.size)]
    mean = torch.stack(everyone).mean(0)
    # one quantization (allgather): |error| ≤ mean_p Δ_p/2 ≤ max_p max|g_p|/(2s);
    # scatter-reduce quantizes the mean once more: + max|mean|/(2s)
    bound = max(float(g.abs().max()) for g in everyone) / 2
    if reducer == "scatter_reduce":
        bound += float(mean.abs().max()) / 2
    assert same_everywhere(coll, out)
    assert float((out - mean).abs().max()) <= bound * (1 + 1e-5)


@pytest.mark.mpi(min_size=2)
def test_ndqsg_exchange_over_mpi_equals_the_fine_dqsg_decode():
    """Nested senders decoded with side information (and recovered where a checksum failed) give
    exactly DQSG(s₁)'s reconstruction of every sender, averaged in rank order."""
    coll = MPICollectives()
    codec = NDQSG(levels=(3, 1), bucket_size=64)
    ex = make_exchange(codec, "allgather", True, coll)
    out = ex.start("w", gradient(coll.rank), seed=5, step=2)()
    total = torch.zeros(1000)
    for p in range(coll.size):
        ctx = TensorContext("w", (10, 100), dither_key(5, 2, "w", p), coll.size)
        total += codec.fine.decode(codec.fine.encode(gradient(p), ctx), ctx)
    assert torch.equal(out.reshape(-1), total / coll.size)
    assert same_everywhere(coll, out)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_nan_on_one_rank_raises_on_every_rank_over_mpi(reducer):
    coll = MPICollectives()
    g = gradient(coll.rank)
    if coll.rank == 1:
        g[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'w'.*rank\(s\) \[1\]"):
        make_exchange(OneBitSGD(), reducer, True, coll).start("w", g, seed=1, step=0)()


@pytest.mark.mpi(min_size=2)
def test_bytes_counted_are_the_bytes_handed_to_mpi():
    """Allgather: this rank's payload plus one 8-byte size word, nothing estimated."""
    coll = MPICollectives()
    codec = DQSG(levels=1, bucket_size=64)
    ex = make_exchange(codec, "allgather", True, coll)
    ex.start("w", gradient(coll.rank), seed=1, step=0)()
    ctx = TensorContext("w", (10, 100), dither_key(1, 0, "w", coll.rank), coll.size)
    payload = codec.encode(gradient(coll.rank), ctx).to_bytes()
    assert ex.stats.bytes_handed == payload.numel() + 8
    assert ex.stats.coordinates == 1000
