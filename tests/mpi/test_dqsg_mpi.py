"""DQSG across real MPI ranks (mpi4py, pytest-mpi): run with
``mpirun -n N python -m pytest --with-mpi tests/mpi`` for N = 2 and 4.

Every rank regenerates every sender's dither; common-scale index sums travel through
MPI_Allreduce of packed float64 words and decode to the same bits on every rank.
"""

import math

import numpy as np
import pytest
import torch

from hvdquant import DQSG
from hvdquant.kernels import DitherKey, ops, tensor_id
from hvdquant.transports import SumFieldLayout


def world():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
def test_any_rank_regenerates_any_senders_dither():
    MPI, comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    base = DitherKey(seed=99, step=5, tensor_id=tensor_id("layer.weight"), sender=0)
    mine = ops.dither(1003, base.for_sender(rank)).numpy()
    everyone = comm.allgather(mine)
    for sender in range(size):
        assert np.array_equal(everyone[sender], ops.dither(1003, base.for_sender(sender)).numpy())
    assert not np.array_equal(everyone[0], everyone[1])  # senders never share a dither


def allreduce_dqsg(comm, MPI, codec: DQSG, g: torch.Tensor, key: DitherKey) -> torch.Tensor:
    """Common-scale DQSG mean through MPI: MAX of scales, SUM of packed index words."""
    size = comm.Get_size()
    absmax = codec.bucket_absmax(g).numpy()
    common = np.empty_like(absmax)
    comm.Allreduce(absmax, common, op=MPI.MAX)
    delta = codec.step_size(torch.from_numpy(common))
    layout = SumFieldLayout.for_levels(codec.levels, size)
    words = layout.pack(codec.quantize(g, delta, key.for_sender(comm.Get_rank()))).numpy()
    reduced = np.empty_like(words)
    comm.Allreduce(words, reduced, op=MPI.SUM)
    reduced /= size  # what an AVERAGE allreduce returns: the layout's sentinel recovers the 1/P
    ksum, factor = layout.unpack(torch.from_numpy(reduced), g.numel())
    assert factor == pytest.approx(1 / size)
    return codec.decode_sum(ksum, delta, key.for_sender(0), senders=size, factor=factor), delta


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("levels,n", [(1, 1), (1, 1000), (3, 4099)])
def test_common_scale_mean_is_close_and_bit_identical(levels, n):
    MPI, comm = world()
    rank = comm.Get_rank()
    codec = DQSG(levels=levels, bucket_size=256)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1000 + rank)) * (rank + 1)
    mean, delta = allreduce_dqsg(comm, MPI, codec, g, DitherKey(7, 0, tensor_id("t"), 0))
    true = np.mean(comm.allgather(g.double().numpy()), axis=0)
    # Each sender's error is within Δ/2, so the mean's is too (plus float32 rounding).
    per_coord = delta.double().repeat_interleave(256)[:n].numpy()
    assert np.all(np.abs(mean.double().numpy() - true) <= per_coord / 2 + 1e-5)
    results = comm.allgather(mean.numpy().tobytes())
    assert all(r == results[0] for r in results), "ranks decoded different bits"


@pytest.mark.mpi(min_size=2)
def test_decoded_mean_is_unbiased_over_steps():
    """T = 200 steps of fresh dithers on fixed gradients. The mean over steps of the decoded mean
    minus the true mean has per-coordinate std Δ/√(12·P·T) (docs/ALGORITHMS.md §3); with 512
    coordinates, the standardized errors z must satisfy max|z| < 5 and mean z² ∈ [0.8, 1.2]
    (the latter is 512 χ²-samples: std of the mean 0.0625, so 3.2 standard deviations)."""
    MPI, comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    codec = DQSG(levels=1, bucket_size=512)
    g = torch.randn(512, generator=torch.Generator().manual_seed(rank))
    true = np.mean(comm.allgather(g.double().numpy()), axis=0)
    T = 200
    acc = np.zeros(512)
    for step in range(T):
        mean, delta = allreduce_dqsg(comm, MPI, codec, g, DitherKey(11, step, 3, 0))
        acc += mean.double().numpy()
    sd = float(delta[0]) / math.sqrt(12 * size * T)
    z = (acc / T - true) / sd
    assert np.abs(z).max() < 5
    assert 0.8 < float(np.mean(z**2)) < 1.2
