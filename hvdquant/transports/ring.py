"""mpi4py reference ring-allreduce, plain or carrying coset indices (docs/ALGORITHMS.md §3).

    out = hvdquant.ring_allreduce(tensor, comm=MPI.COMM_WORLD)                       # float32 sums
    ring = hvdquant.coset_ring(hvdquant.NDQSG((3, 1), 512), side=hvdquant.PreviousMean(), seed=0)
    out = hvdquant.ring_allreduce(tensor, session=ring, name="layer.weight")        # coset ring

``coset_ring`` returns a :class:`~hvdquant.transports.session.Session` over a :class:`CosetRing`
exchange: the session agrees the configuration and seed at the first call, counts calls per name
(the dither step) and checkpoints the ring's state (``ring.state_dict()``: steps, adaptive nesting's
decisions, the side information's memory); ``ring.exchange.stats`` holds the :class:`RingStats`.

Bandwidth-optimal ring: the tensor is cut into P chunks (uneven sizes allowed, any P ≥ 1); P − 1
reduce-scatter steps leave rank r with the complete chunk (r + 1) mod P, and P − 1 allgather steps
copy every complete chunk to every rank, so all ranks end with the same bits.

Plain: chunk c is summed in the fixed order x_c, x_{c+1}, …, x_{c+P−1} (ranks mod P), the same
float32 additions on every run.

Coset: the ranks first agree one step Δ_b per bucket (MAX allreduce of max|g|, s₁ levels) and the
sum of their per-bucket checksums Σ_j w_j·k_j mod 2^32 (w_j: odd hashed weights of the position j).
Each rank sends the coset symbols (k + ⌊ρ/2⌋) mod ρ of its DQSG(s₁) indices; every hop adds packed
symbols modulo ρ (:func:`hvdquant.kernels.ops.modadd_cosets`), so each message is log2 ρ bits per coordinate
(⌈log2 ρ⌉ for powers of two, base-ρ bytes otherwise) however many ranks there are. After the
allgather every rank resolves K = Σ_p k_p from its residue with side information Y that is
bit-identical on every rank, checks the bucket checksums, and **recovers** failed buckets with a
second, small SUM allreduce of their DQSG(s₁) indices; the count is in :class:`RingStats`.

With ``NDQSG(..., adaptive=True)`` the ring switches nesting per tensor name from call to call: while
off, the ranks sum their DQSG(s₁) indices in summable fields (one SUM allreduce); while on, they run
the coset ring at the tensor's ratio. After each call every candidate ratio is priced on the exact
sums (the one in use at what the call cost, the others by a probe against the same side
information), and the next call nests, at the cheapest ratio, only if its bytes (cosets,
checksums, recovery) are at most ``NestingPolicy.ADAPTIVE_MARGIN`` × the fields'. Every rank sees
the same sums, so every rank decides alike. The decisions live in the :class:`CosetRing`'s ``codec_state``.

Buffers go through host memory (Debian's Open MPI is not CUDA-aware): CUDA tensors are staged.
This transport talks MPI directly; it is a reference and benchmark, not a Horovod hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hvdquant.codecs.base import all_finite
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.codecs.state import CodecState
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.stats import DecodeStats
from hvdquant.transports.collectives import MPICollectives, chunk_bounds
from hvdquant.transports.fused import FusedBuffer, Segment
from hvdquant.transports.session import Session
from hvdquant.transports.summable import SumFieldLayout


@dataclass
class RingStats(DecodeStats):
    """Bytes this rank handed to MPI and what the coset decoder saw (accumulated over calls): the
    decode counters of :class:`~hvdquant.stats.DecodeStats` plus the ring's own byte counts."""

    calls: int = 0
    coordinates: int = 0
    ring_bytes: int = 0
    scale_bytes: int = 0
    side_bytes: int = 0
    buckets: int = 0

    @property
    def bytes_sent(self) -> int:
        return self.ring_bytes + self.scale_bytes + self.side_bytes + self.recovery_bytes


def _ring(comm, chunks: list[np.ndarray], combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
          stats: RingStats | None) -> list[np.ndarray]:
    """Reduce-scatter then allgather over the ring, in place on ``chunks`` (one array per rank)."""
    p, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % p, (r - 1) % p
    for t in range(p - 1):  # reduce-scatter: after it, rank r holds the complete chunk (r + 1) % p
        send_c, recv_c = (r - t) % p, (r - t - 1) % p
        tmp = np.empty_like(chunks[recv_c])
        comm.Sendrecv(chunks[send_c], dest=right, recvbuf=tmp, source=left)
        chunks[recv_c] = combine(tmp, chunks[recv_c])
        if stats is not None:
            stats.ring_bytes += chunks[send_c].nbytes
    for t in range(p - 1):  # allgather
        send_c, recv_c = (r + 1 - t) % p, (r - t) % p
        comm.Sendrecv(chunks[send_c], dest=right, recvbuf=chunks[recv_c], source=left)
        if stats is not None:
            stats.ring_bytes += chunks[send_c].nbytes
    return chunks


@dataclass(frozen=True)
class SideRequest:
    """What a side-information estimator may use for one coset-ring call: the tensor name, the
    communicator and its size, this rank's gradient g, the common steps Δ_b, the codec, this rank's
    dither key and the statistics to charge extra bytes to."""

    name: str
    comm: object
    ranks: int
    g: torch.Tensor
    delta: torch.Tensor
    codec: NDQSG
    key: DitherKey
    stats: RingStats


class PreviousMean:
    """Side information: P × the previous call's decoded mean of the same tensor name (identical on
    every rank because every rank decoded the same bits). None on a name's first call."""

    def __init__(self) -> None:
        self.means: dict[str, torch.Tensor] = {}

    def estimate(self, req: SideRequest) -> torch.Tensor | None:
        mean = self.means.get(req.name)
        return None if mean is None or mean.numel() != req.g.numel() else mean * req.ranks

    def update(self, name: str, mean: torch.Tensor) -> None:
        self.means[name] = mean.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mean.clone() for name, mean in self.means.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.means = {str(name): mean.clone() for name, mean in state.items()}


class GroupDQSG:
    """Side information: ranks 0 … group−1 share their DQSG(s₁) indices (one SUM allreduce of summable
    fields, the other ranks adding zeros); Y = (P/G)·Σ_{p<G} ĝ_p. Costs its own collective."""

    def __init__(self, group: int = 1) -> None:
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be a positive int, got {group!r}")
        self.group = group

    def estimate(self, req: SideRequest) -> torch.Tensor:
        group = min(self.group, req.ranks)
        fine = req.codec.fine
        layout = SumFieldLayout.for_levels(fine.levels, group)
        if req.key.sender < group:
            words = layout.pack(fine.quantize(req.g, req.delta, req.key))
        else:
            words = torch.zeros(layout.words(req.g.numel()), dtype=torch.float64)
        summed = MPICollectives(req.comm).allreduce(words, "side")
        req.stats.side_bytes += summed.nbytes
        kg, _ = layout.unpack(summed.wait(), req.g.numel())
        return fine.decode_sum(kg, req.delta, req.key.for_sender(0), senders=group) * (req.ranks / group)

    def update(self, name: str, mean: torch.Tensor) -> None:
        pass


class CosetRing:
    """The coset ring as an exchange (:mod:`hvdquant.transports.exchange`): each compressed segment
    of a fused buffer through the coset ring of ``codec`` (an :class:`~hvdquant.NDQSG`: its s₁, ρ and
    bucket size; its dqsg_fraction does not apply, every rank sends cosets) with side information
    ``side`` (:class:`PreviousMean`, :class:`GroupDQSG`, or any object with
    ``estimate(SideRequest)``/``update(name, mean)``; None: every bucket through the recovery round),
    each uncompressed segment through the float32 ring. Returns sums. It owns adaptive nesting's
    decisions (``codec_state``) and the byte counts (``stats``)."""

    kind = "coset-ring"
    average = False

    def __init__(self, codec: NDQSG, side=None, comm=None) -> None:
        if not isinstance(codec, NDQSG):
            raise TypeError(f"the coset ring takes an hvdquant.NDQSG codec, got {type(codec).__name__}")
        if codec.rotation != "none":
            raise TypeError("the coset ring does not rotate: its side information lives in gradient coordinates "
                            "(use NDQSG(rotation='none'))")
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.coll = MPICollectives(self.comm)
        self.codec, self.side = codec, side
        self.codec_state = CodecState()
        self.stats = RingStats()

    def config(self) -> dict:
        return {"exchange": self.kind, "codec": self.codec.config(), "side": type(self.side).__name__}

    def statistics(self) -> dict:
        return {**asdict(self.stats), "bytes_sent": self.stats.bytes_sent}

    def state_dict(self) -> dict:
        """Adaptive nesting's decisions and the side information's memory (:class:`PreviousMean`)."""
        side = self.side.state_dict() if hasattr(self.side, "state_dict") else {}
        return {"kind": self.kind, "codec_state": self.codec_state.state_dict(), "side": side}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds {state.get('kind')!r} exchange state; this exchange is {self.kind!r}")
        self.codec_state.load_state_dict(state["codec_state"])
        if hasattr(self.side, "load_state_dict"):
            self.side.load_state_dict(state["side"])

    def start(self, buffer: FusedBuffer) -> Callable[[], torch.Tensor]:
        """The ring runs when the finisher is called (MPI, blocking), segment by segment."""
        def finish() -> torch.Tensor:
            return buffer.join([self._segment(buffer, seg) for seg in buffer.segments])

        return finish

    def send(self) -> None:
        """Nothing to send early: the ring runs, blocking, at the finisher."""

    def _segment(self, buffer: FusedBuffer, seg: Segment) -> torch.Tensor:
        """Σ_p of one segment: the coset ring for a compressed one, the float32 ring otherwise."""
        g = buffer.part(seg).to("cpu").contiguous()
        self.stats.calls += 1
        self.stats.coordinates += seg.length
        if not seg.compressed:
            return _float_ring(g, self.comm, self.stats)
        policy = self.codec_state.nesting if self.codec.adaptive else None
        return _coset_allreduce(g, self.comm, self.codec, self.side, seg.name, key=seg.key, stats=self.stats,
                                policy=policy)


def coset_ring(codec: NDQSG, side=None, comm=None, seed: int | None = 0) -> Session:
    """A session over a :class:`CosetRing` (``comm`` default COMM_WORLD; ``seed`` keys the dithers,
    rank 0's is used), for :func:`ring_allreduce`'s ``session=``."""
    return Session(CosetRing(codec, side, comm), seed, "hvdquant.ring")


def _float_ring(g: torch.Tensor, comm, stats: RingStats | None) -> torch.Tensor:
    """Σ_p g_p by the float32 ring (each chunk summed in a fixed rank order)."""
    x = g.numpy().copy()
    chunks = [x[lo:hi].copy() for lo, hi in chunk_bounds(g.numel(), comm.Get_size())]
    return torch.from_numpy(np.concatenate(_ring(comm, chunks, np.add, stats)))


def ring_allreduce(tensor: torch.Tensor, comm=None, *, session: Session | None = None, name: str = "tensor",
                   average: bool = False, stats: RingStats | None = None) -> torch.Tensor:
    """Allreduce ``tensor`` (sum, or mean with ``average=True``) over ``comm`` (default COMM_WORLD)
    by the float32 ring; with ``session`` (:func:`coset_ring`), by that session's coset ring, the
    dithers keyed by (agreed seed, calls so far for ``name``, ``name``, rank): ``name`` must match on
    every rank, and the ring's statistics are ``session.exchange.stats``."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError("ring_allreduce takes a floating-point torch.Tensor")
    if session is not None:
        if comm is not None or stats is not None:
            raise ValueError("with session=, the communicator and the statistics are the session's CosetRing's")
        if not isinstance(session.exchange, CosetRing):
            raise TypeError("ring_allreduce(session=...) takes a session made by hvdquant.coset_ring(...)")
        session.agree()
        buffer = session.buffer([(name, tensor)], None)
        out = session.exchange.start(buffer)()
        return buffer.unflatten(out / session.coll.size if average else out)[name]
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    g = tensor.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    stats = RingStats() if stats is None else stats
    stats.calls += 1
    stats.coordinates += g.numel()
    out = _float_ring(g, comm, stats)
    if average:
        out = out / comm.Get_size()
    return out.reshape(tensor.shape).to(device=tensor.device, dtype=tensor.dtype)


def _coset_allreduce(g: torch.Tensor, comm, codec: NDQSG, side, name: str, *, key: DitherKey, stats: RingStats,
                     policy: NestingPolicy | None) -> torch.Tensor:
    """Σ_p ĝ_p of one tensor by the coset ring (``key``: this rank's dither key; ``policy``: adaptive
    nesting's decisions, None for a fixed-nesting codec)."""
    ranks = comm.Get_size()
    fine, rho, d, n = codec.fine, codec.ratio(name, policy), codec.bucket_size, g.numel()
    coll = MPICollectives(comm)

    maxima = coll.allreduce(fine.bucket_absmax(g), "scale", op="max")
    common = maxima.wait()
    if not all_finite(common):  # the same reduced maxima on every rank: every rank raises
        raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}' on at least one rank")
    delta = fine.step_size(common)
    k = fine.quantize(g, delta, key)
    request = SideRequest(name, comm, ranks, g, delta, codec, key, stats)
    layout = SumFieldLayout.for_levels(fine.levels, ranks)

    def recover(idx: torch.Tensor) -> torch.Tensor:
        """The true index sums at ``idx``: one SUM allreduce of their DQSG(s₁) indices."""
        summed = coll.allreduce(layout.pack(k[idx].contiguous()), "recovery")
        stats.recovery_bytes += summed.nbytes
        return layout.unpack(summed.wait(), idx.numel())[0]

    if not codec.nests(name, policy):  # nesting off: DQSG(s₁) sums, then a probe
        summed = coll.allreduce(layout.pack(k), "fields")
        stats.scale_bytes += maxima.nbytes
        stats.ring_bytes += summed.nbytes
        plain = summed.nbytes
        kout = layout.unpack(summed.wait(), n)[0]
        estimate = None if side is None else side.estimate(request)
        if estimate is not None:
            cost = {r: _probed_bytes(codec, kout, delta, estimate, key, ranks, r, layout)
                    for r in codec.candidate_ratios()}
            policy.choose(name, cost, plain, buckets=delta.numel())
        return _finish(fine, kout, delta, key, ranks, side, name)

    check_sum = coll.allreduce(ops.bucket_checksum(k, d), "checksums")
    stats.scale_bytes += maxima.nbytes + check_sum.nbytes

    sym = ops.nested_encode(g, delta, d, fine.levels, rho, key)
    bits = sizes.coset_bits(rho)
    align = 8 if bits is not None else sizes.radix_per_byte(rho)
    bounds = chunk_bounds(n, ranks, align)
    chunks = [ops.pack_cosets(sym[lo:hi].contiguous(), rho).numpy() for lo, hi in bounds]

    def modadd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ops.modadd_cosets(torch.from_numpy(a), torch.from_numpy(b), rho).numpy()

    chunks = _ring(comm, chunks, modadd, stats)
    residues = torch.cat([ops.unpack_cosets(torch.from_numpy(c), rho, hi - lo) for c, (lo, hi) in zip(chunks, bounds)])

    estimate = None if side is None else side.estimate(request)
    stats.buckets += delta.numel()
    before = stats.recovery_bytes
    kout = codec.resolver.decode_sum(residues, delta, estimate, key.for_sender(0), ranks, check_sum.wait(), rho,
                                     recover=recover, stats=stats)
    if policy is not None:  # the ratio in use at what this call cost, the others probed on the exact sums
        cost = {r: _probed_bytes(codec, kout, delta, estimate, key, ranks, r, layout)
                for r in codec.candidate_ratios() if r != rho and estimate is not None}
        cost[rho] = _coset_ring_bytes(n, ranks, rho) + check_sum.nbytes + stats.recovery_bytes - before
        policy.choose(name, cost, 8 * layout.words(n), buckets=delta.numel())
    return _finish(fine, kout, delta, key, ranks, side, name)


def _probed_bytes(codec: NDQSG, ksum: torch.Tensor, delta: torch.Tensor, estimate: torch.Tensor, key: DitherKey,
                  ranks: int, rho: int, layout: SumFieldLayout) -> int:
    """Bytes one rank would have handed to the coset ring with ratio ``rho`` for the exact index sums
    ``ksum``: cosets, checksums and the recovery of the buckets that fail against ``estimate``."""
    bad = codec.resolver.probe(ksum, delta, estimate, key.for_sender(0), ranks, rho)
    return (_coset_ring_bytes(ksum.numel(), ranks, rho) + 8 * delta.numel()
            + 8 * layout.words(bucket_coordinates(bad, codec.bucket_size, ksum.numel()).numel()))


def _coset_ring_bytes(n: int, ranks: int, rho: int) -> int:
    """Bytes one rank hands to the ring for n coset symbols: 2(P − 1) chunks of about n/P symbols."""
    return 2 * (ranks - 1) * sizes.coset_bytes(-(-n // ranks), rho) if ranks > 1 else 0


def _finish(fine, kout: torch.Tensor, delta: torch.Tensor, key: DitherKey, ranks: int, side, name: str) -> torch.Tensor:
    """Σ_p ĝ_p from the exact index sums; the side information learns the mean."""
    total = fine.decode_sum(kout, delta, key.for_sender(0), senders=ranks)
    if side is not None:
        side.update(name, total / ranks)
    return total
