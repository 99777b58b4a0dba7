"""The payload transports over the MPI implementation of the collectives interface.

The same :class:`~hvdquant.transports.payload.PayloadExchange` that runs under Horovod runs here
over :class:`~hvdquant.transports.MPICollectives` (no Horovod): replicas bit-identical, results
within the quantizer's bound, NDQSG exact, a NaN on one rank raised on every rank, and the bytes
counted equal to the bytes handed to MPI.
"""

import pytest
import torch
from one_tensor import start, start_raw

from hvdquant import DQSG, NDQSG, OneBitSGD
from hvdquant.codecs import TensorContext
from hvdquant.transports import MPICollectives, make_exchange
from hvdquant.transports.session import dither_key


def gradient(rank: int, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank)).reshape(10, n // 10)


def same_everywhere(coll: MPICollectives, t: torch.Tensor) -> bool:
    return all(torch.equal(t, other) for other in coll.allgather_object(t, "check"))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_dqsg_exchange_over_mpi_is_identical_and_within_the_step(reducer):
    coll = MPICollectives()
    codec = DQSG(levels=1, bucket_size=64)
    out = start(make_exchange(codec, reducer, True, coll), "w", gradient(coll.rank), 3, 0)()
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
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_ndqsg_exchange_over_mpi_equals_the_fine_dqsg_decode(rotation):
    """Nested senders decoded with side information (and recovered where a checksum failed) give
    exactly DQSG(s₁)'s reconstruction of every sender, averaged in rank order; with a rotation, of
    every sender's R g, the mean rotated back once."""
    from hvdquant.kernels import ops

    coll = MPICollectives()
    codec = NDQSG(levels=(3, 1), bucket_size=64, adaptive=False, rotation=rotation)
    ex = make_exchange(codec, "allgather", True, coll)
    out = start(ex, "w", gradient(coll.rank), 5, 2)()
    total = torch.zeros(1000)
    for p in range(coll.size):
        ctx = TensorContext("w", (10, 100), dither_key(5, 2, "w", p), coll.size)
        g = codec.rotator.rotate(gradient(p).reshape(-1), ctx.key)
        total += codec.fine.decode(codec.fine.encode(g, ctx), ctx)
    mean = total / coll.size
    if rotation == "hadamard":
        mean = ops.hadamard_rotate(mean, 64, dither_key(5, 2, "w", 0), inverse=True)
    assert torch.equal(out.reshape(-1), mean)
    assert same_everywhere(coll, out)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_nan_on_one_rank_raises_on_every_rank_over_mpi(reducer):
    coll = MPICollectives()
    g = gradient(coll.rank)
    if coll.rank == 1:
        g[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'w'.*rank\(s\) \[1\]"):
        start(make_exchange(OneBitSGD(), reducer, True, coll), "w", g, 1, 0)()


@pytest.mark.mpi(min_size=2)
def test_bytes_counted_are_the_bytes_handed_to_mpi():
    """Allgather of one tensor: this rank's payload, its 8-byte size in the group header and the
    8-byte size word of the allgather itself, nothing estimated."""
    coll = MPICollectives()
    codec = DQSG(levels=1, bucket_size=64)
    ex = make_exchange(codec, "allgather", True, coll)
    start(ex, "w", gradient(coll.rank), 1, 0)()
    ctx = TensorContext("w", (10, 100), dither_key(1, 0, "w", coll.rank), coll.size)
    payload = codec.encode(gradient(coll.rank), ctx).to_bytes()
    assert ex.stats.bytes_handed == payload.numel() + 8 + 8
    assert ex.stats.coordinates == 1000


class Counting(MPICollectives):
    """MPICollectives that counts the byte collectives it starts (the rounds of a step)."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[str] = []

    def allgather_bytes(self, buf, name):
        self.rounds.append("allgather")
        return super().allgather_bytes(buf, name)

    def alltoall_bytes(self, bufs, name):
        self.rounds.append("alltoall")
        return super().alltoall_bytes(bufs, name)


def step_of_tensors(coll, reducer: str, threshold: int, poison: str | None = None):
    """Eight gradients (six compressed, two raw) queued as hooks would, finished in name order."""
    ex = make_exchange(OneBitSGD() if reducer == "scatter_reduce" else DQSG(1, 64), reducer, True, coll,
                       fusion_threshold=threshold)
    gen = torch.Generator().manual_seed(7 + coll.rank)
    finishers = {}
    for i in range(8):
        g = torch.randn(20 + 13 * i, 6, generator=gen)
        name = f"layer{i}.weight"
        if name == poison and coll.rank == 1:
            g[0, 0] = float("nan")
        finishers[name] = start_raw(ex, name, g) if i in (2, 5) else start(ex, name, g, 3, 0)
    outs = {}
    for name in sorted(finishers):
        try:
            outs[name] = finishers[name]()
        except FloatingPointError as err:
            outs[name] = str(err)
    return outs


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_a_step_of_many_tensors_is_one_round_per_phase(reducer):
    """Fused (default threshold): one allgather (scatter-reduce: one all-to-all and one allgather)
    for eight tensors; unfused (threshold 0): one group per tensor. The bits are the same."""
    fused, alone = Counting(), Counting()
    a = step_of_tensors(fused, reducer, 64 << 20)
    b = step_of_tensors(alone, reducer, 0)
    assert fused.rounds == (["allgather"] if reducer == "allgather" else ["alltoall", "allgather"])
    assert len(alone.rounds) == 8 * len(fused.rounds)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(same_everywhere(fused, a[name]) for name in sorted(a))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["allgather", "scatter_reduce"])
def test_nan_in_one_fused_tensor_names_it_and_spares_the_others(reducer):
    outs = step_of_tensors(Counting(), reducer, 64 << 20, poison="layer3.weight")
    assert "'layer3.weight' on rank(s) [1]" in outs["layer3.weight"]
    assert all(isinstance(v, torch.Tensor) for k, v in outs.items() if k != "layer3.weight")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer, average", [("allreduce", False), ("allgather", True)])
def test_rotated_dqsg_is_the_plain_exchange_in_rotated_coordinates(reducer, average):
    """DQSG(rotation="hadamard") over either reducer = R⁻¹ of the same exchange without rotation run
    on every rank's R g (R shared: keyed by seed, step and tensor, not by rank), bit for bit: the
    summable path sums rotated indices and rotates the sum back once (then averages), the payload
    path rotates the senders' mean back once. (Each reducer is compared where R⁻¹ is its last step.)"""
    from hvdquant.kernels import ops

    coll = MPICollectives()
    g = gradient(coll.rank)
    rotated = make_exchange(DQSG(3, 128, rotation="hadamard"), reducer, average, coll)
    out = start(rotated, "w", g, 4, 1)()
    key = dither_key(4, 1, "w", coll.rank)
    plain = make_exchange(DQSG(3, 128), reducer, average, coll)
    inner = start(plain, "w", ops.hadamard_rotate(g.reshape(-1).clone(), 128, key).reshape(g.shape), 4, 1)()
    assert torch.equal(out.reshape(-1), ops.hadamard_rotate(inner.reshape(-1).clone(), 128, key, inverse=True))
    assert same_everywhere(coll, out)
    mean = torch.stack([gradient(p) for p in range(coll.size)]).sum(0) / (coll.size if average else 1)
    # s = 3 on Gaussian data: ‖e‖²/‖g‖² ≈ 0.1 with a bucket's own Δ; a common Δ (max over ranks) raises it
    assert float(((out - mean) ** 2).sum() / (mean ** 2).sum()) < 0.25
