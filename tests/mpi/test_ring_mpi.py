"""hvdquant.ring_allreduce under mpirun -n 1 … 5 (pytest-mpi)."""

import numpy as np
import pytest
import torch

import hvdquant
from hvdquant import DQSG, NDQSG, GroupDQSG, PreviousMean, coset_ring, ring_allreduce
from hvdquant.kernels import DitherKey, tensor_id
from hvdquant.transports.collectives import chunk_bounds


def world():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


def serial_reference(inputs: list[np.ndarray]) -> np.ndarray:
    """The ring's fixed order: chunk c = ((x_c + x_{c+1}) + …) + x_{c+P−1}, ranks mod P."""
    p = len(inputs)
    out = np.empty_like(inputs[0])
    for c, (lo, hi) in enumerate(chunk_bounds(inputs[0].size, p)):
        acc = inputs[c][lo:hi].copy()
        for j in range(1, p):
            acc = acc + inputs[(c + j) % p][lo:hi]
        out[lo:hi] = acc
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("n", [0, 1, 5, 1000, 4099])
def test_plain_ring_equals_fixed_order_sum_on_every_rank(n):
    MPI, comm = world()
    x = torch.randn(n, generator=torch.Generator().manual_seed(comm.Get_rank() + 10 * n))
    out = ring_allreduce(x, comm)
    inputs = comm.allgather(x.numpy())
    assert np.array_equal(out.numpy(), serial_reference(inputs))
    mpi = np.empty_like(x.numpy())
    comm.Allreduce(x.numpy(), mpi, op=MPI.SUM)
    assert np.allclose(out.numpy(), mpi, rtol=1e-5, atol=1e-5)
    assert all(b == out.numpy().tobytes() for b in comm.allgather(out.numpy().tobytes()))
    mean = ring_allreduce(x.double(), comm, average=True)
    assert mean.dtype == torch.float64 and torch.allclose(mean, out.double() / comm.Get_size())


def exact_coset_reference(comm, g: torch.Tensor, codec: NDQSG, name: str, seed: int, step: int) -> torch.Tensor:
    """What the coset ring must return: the DQSG(s₁) sum from the true Σ_p k_p (common Δ)."""
    fine = codec.fine
    gs = [torch.from_numpy(a) for a in comm.allgather(g.numpy())]
    delta = fine.step_size(torch.stack([fine.bucket_absmax(x) for x in gs]).max(0).values)
    keys = [DitherKey(seed, step, tensor_id(name), p) for p in range(len(gs))]
    ksum = sum(fine.quantize(x, delta, k).int() for x, k in zip(gs, keys))
    return fine.decode_sum(ksum, delta, keys[0], senders=len(gs))


@pytest.mark.mpi
@pytest.mark.parametrize("rho_levels", [(3, 1), (8, 2), (15, 1), (5, 1)])
def test_coset_ring_is_exact_and_uses_side_information(rho_levels):
    """Three calls on slowly changing gradients with PreviousMean side information: the first has
    no side information (every bucket through the recovery round); later ones decode from the
    residues where |Σg − S| is small. Every call must equal the exact DQSG(s₁) sum, bit for bit."""
    _, comm = world()
    s1, s2 = rho_levels
    codec = NDQSG((s1, s2), bucket_size=100, adaptive=False)
    name = f"ring.side.{s1}.{s2}"
    ring = coset_ring(codec, PreviousMean(), comm, seed=7)
    stats = ring.exchange.stats
    base = torch.randn(2500, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        g = base + 1e-3 * torch.randn(2500, generator=torch.Generator().manual_seed(100 * step + comm.Get_rank()))
        out = ring_allreduce(g, session=ring, name=name)
        assert torch.equal(out, exact_coset_reference(comm, g, codec, name, 7, step))
    if codec.nesting_ratio > comm.Get_size():  # sufficient condition |Σg − S| < (ρ − P)Δ/2 can hold
        assert stats.failed_buckets < 2 * 25  # calls 2 and 3 have 25 buckets each


@pytest.mark.mpi
@pytest.mark.parametrize("drift,expect_nesting", [(1e-4, True), (1.0, False)])
def test_adaptive_coset_ring_switches_nesting_and_stays_exact(drift, expect_nesting):
    """NDQSG((8, 1), adaptive=True) on the ring with PreviousMean side information: the first call
    sums DQSG(s₁) indices (nesting off) and the next two probe; slowly drifting gradients (1e-4) then
    take the coset ring, fast-changing ones (drift 1, as large as the gradient) never do. Every call equals
    the exact DQSG(s₁) sum bit for bit, and every rank holds the same decision."""
    _, comm = world()
    codec = NDQSG((8, 1), bucket_size=100, adaptive=True)
    name = f"ring.adaptive.{drift}"
    ring = coset_ring(codec, PreviousMean(), comm, seed=7)
    state = ring.exchange.codec_state  # the ring's own: its decisions persist from call to call
    base = torch.randn(2500, generator=torch.Generator().manual_seed(3))
    for step in range(4):
        g = base + drift * torch.randn(2500, generator=torch.Generator().manual_seed(100 * step + comm.Get_rank()))
        out = ring_allreduce(g, session=ring, name=name)
        assert torch.equal(out, exact_coset_reference(comm, g, codec, name, 7, step))
        decisions = comm.allgather(state.nesting.state_dict())
        assert all(dec == decisions[0] for dec in decisions)
    if comm.Get_size() == 1 and not expect_nesting:
        # one sender's indices lie in [−s₁, s₁]: ρ = 2s₁ = 16 tells all of them but ±s₁ apart whatever the
        # side information, and 4-bit cosets beat the 17-value fields' 5.33 bits: nesting pays
        assert state.nesting.is_on(name) and state.nesting.ratio(name, codec.nesting_ratio) == 16
    else:
        assert state.nesting.is_on(name) == expect_nesting


@pytest.mark.mpi
def test_forced_failure_is_detected_and_recovered():
    """Side information deliberately wrong by 10ρΔ: every bucket fails its checksum, is counted and
    recovered; the result is still exact."""
    _, comm = world()
    codec = NDQSG((3, 1), bucket_size=64, adaptive=False)

    class Wrong:
        def estimate(self, req):
            return torch.full((req.g.numel(),), 10.0 * 3 * float(req.delta.max()) + 1.0)

        def update(self, name, mean):
            pass

    g = torch.randn(640, generator=torch.Generator().manual_seed(comm.Get_rank()))
    ring = coset_ring(codec, Wrong(), comm, seed=1)
    stats = ring.exchange.stats
    out = ring_allreduce(g, session=ring, name="ring.forced")
    assert torch.equal(out, exact_coset_reference(comm, g, codec, "ring.forced", 1, 0))
    assert stats.failed_buckets == 10 and stats.failed_coordinates > 0 and stats.recovery_bytes > 0


@pytest.mark.mpi
def test_group_dqsg_side_information():
    _, comm = world()
    codec = NDQSG((9, 1), bucket_size=128, adaptive=False)
    base = torch.randn(1280, generator=torch.Generator().manual_seed(9))
    g = base + 1e-3 * torch.randn(1280, generator=torch.Generator().manual_seed(comm.Get_rank()))
    ring = coset_ring(codec, GroupDQSG(1), comm, seed=2)
    stats = ring.exchange.stats
    out = ring_allreduce(g, session=ring, name="ring.group")
    assert torch.equal(out, exact_coset_reference(comm, g, codec, "ring.group", 2, 0))
    assert stats.side_bytes > 0


@pytest.mark.mpi
@pytest.mark.parametrize("rho,bits", [(4, 2.0), (8, 3.0), (3, 1.6), (9, 4.0)])
def test_ring_bytes_match_the_formula(rho, bits):
    """Bytes handed to MPI by the ring itself = 2(P−1)/P · n · b/8 within 2%, b the packed bits per
    symbol (log2 ρ for powers of two; base-3 bytes give 1.6 = 1.0095·log2 3)."""
    _, comm = world()
    p = comm.Get_size()
    n = 200_000
    codec = NDQSG((rho, 1), bucket_size=512, adaptive=False)
    g = torch.randn(n, generator=torch.Generator().manual_seed(comm.Get_rank()))
    ring = coset_ring(codec, None, comm)
    stats = ring.exchange.stats
    ring_allreduce(g, session=ring, name=f"ring.bytes.{rho}")
    expected = 2 * (p - 1) / p * n * bits / 8
    if p == 1:
        assert stats.ring_bytes == 0
    else:
        assert abs(stats.ring_bytes - expected) <= 0.02 * expected
    nb = -(-n // 512)
    assert stats.scale_bytes == nb * (4 + 8)
    assert stats.bytes_sent == stats.ring_bytes + stats.scale_bytes + stats.recovery_bytes + stats.side_bytes


@pytest.mark.mpi
def test_bad_input_refused():
    _, comm = world()
    with pytest.raises(TypeError, match="floating-point"):
        ring_allreduce(torch.arange(4), comm)
    with pytest.raises(TypeError, match="NDQSG"):
        coset_ring(DQSG(), None, comm)
    g = torch.ones(10)
    if comm.Get_rank() == 0:
        g[3] = float("nan")
    with pytest.raises(FloatingPointError, match="ring.nan"):
        ring_allreduce(g, session=coset_ring(NDQSG(), PreviousMean(), comm), name="ring.nan")
    with pytest.raises(ValueError, match="session's CosetRing"):
        ring_allreduce(torch.ones(10), comm, session=coset_ring(NDQSG(), None, comm), name="ring.both")
    assert hvdquant.ring_allreduce is ring_allreduce


@pytest.mark.mpi
def test_ring_checkpoint_resumes_bit_for_bit():
    """A coset-ring session's state_dict (steps, adaptive nesting's decisions, PreviousMean's memory),
    loaded into a new session, continues exactly as the session that kept running."""
    _, comm = world()
    codec = NDQSG((8, 1), bucket_size=100, adaptive=True)
    base = torch.randn(1500, generator=torch.Generator().manual_seed(5))

    def grad(step: int) -> torch.Tensor:
        return base + 1e-4 * torch.randn(1500, generator=torch.Generator().manual_seed(50 * step + comm.Get_rank()))

    kept = coset_ring(codec, PreviousMean(), comm, seed=3)
    for step in range(4):
        ring_allreduce(grad(step), session=kept, name="w")
    resumed = coset_ring(codec, PreviousMean(), comm, seed=99)  # the checkpoint's seed wins
    resumed.load_state_dict(kept.state_dict())
    for step in range(4, 7):
        assert torch.equal(ring_allreduce(grad(step), session=resumed, name="w"),
                           ring_allreduce(grad(step), session=kept, name="w"))
