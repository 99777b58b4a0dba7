"""NDQSG: nested dithered quantization with side information (docs/ALGORITHMS.md §2).

Fine lattice Δℤ with Δ_b = ‖g_b‖∞/s₁; coarse lattice ρΔℤ, nesting ratio ρ = s₁/s₂. A fraction
``dqsg_fraction`` (r) of the ranks — ranks 0 … ⌈rP⌉−1, at least one — send plain DQSG(s₁); the
others send only the coset symbol (k + ⌊ρ/2⌋) mod ρ of each fine index k (log2 ρ bits), one
float32 Δ_b and one uint32 checksum Σ_j (2j+1)·k_j mod 2^32 per bucket.

The receiver decodes senders in rank order, keeping the running mean of everything decoded so far;
that mean is the side information y of the next nested sender: K̂ = resolved index nearest
y/Δ + u in k's coset. Decoding is exact (ĝ equals DQSG(s₁)'s reconstruction, bit for bit) iff
|g − y + eΔ| < ρΔ/2. A bucket whose resolved indices do not reproduce the sender's checksum has
failed: it is counted and **recovered** — the transport asks that sender for the bucket's DQSG(s₁)
symbols in a second round (every rank finds the same failures, so every rank takes part) — and
decoding restarts with the corrected values until no bucket fails. Nothing wrong is passed on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from hvdquant.codecs.base import (
    Codec,
    Encoded,
    Layout,
    Recover,
    TensorContext,
    all_finite,
    check_int,
    flat32,
)
from hvdquant.codecs.dqsg import DQSG
from hvdquant.kernels import DitherKey, ops
from hvdquant.stats import DecodeStats


@dataclass(frozen=True)
class NDQSG(Codec):
    """Nested DQSG with ``levels`` = (s₁, s₂), ρ = s₁/s₂, buckets of ``bucket_size``, and a fraction
    ``dqsg_fraction`` of ranks sending plain DQSG(s₁). The paper's setting: (3, 1), r = 0.5.
    ``dither`` as in :class:`DQSG`: under ``"stratified"`` each nested rank's u_p is still its own
    function of the key, so it is decoded against side information exactly as before.

    ``adaptive=True`` (the default; ``adaptive=False`` is the paper's fixed nesting): nesting is
    decided per tensor name for the next
    step from what every rank decoded at this one — the nested senders' bytes (recovery included)
    when nesting was on, or a probe (their DQSG(s₁) indices resolved from their residues against
    the same side information) when it was off — and kept on only where it sends at most
    ``ADAPTIVE_MARGIN`` × the DQSG(s₁) bytes. A tensor starts with nesting off. The decisions are
    identical on every rank without a collective, live in :meth:`state_dict`, and cost one nested
    decode per nested sender while off. The stock path (:class:`~hvdquant.transports.summed.NestedSum`)
    and the coset ring (:func:`hvdquant.ring_allreduce`) take the same switch. (docs/RESULTS.md,
    "When nesting pays".)"""

    levels: tuple[int, int] = (3, 1)
    bucket_size: int = 512
    dqsg_fraction: float = 0.5
    dither: str = "independent"
    adaptive: bool = True
    #: adaptive nesting: per tensor name, whether its nested senders send cosets at the next step
    nesting: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: per name while off: consecutive steps that would have paid; times nesting was switched off again
    streak: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    reversals: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    scheme = "ndqsg"
    #: adaptive nesting stays on (or turns on) only where it is expected to send at most this
    #: fraction of the nested senders' DQSG(s₁) bytes
    ADAPTIVE_MARGIN = 0.95
    #: good steps in a row before nesting with the previous step's mean as side information
    PREVIOUS_MEAN_CONFIRM = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.levels, tuple) and len(self.levels) == 2):
            raise TypeError(f"NDQSG levels must be a tuple (s1, s2), got {self.levels!r}")
        s1, s2 = self.levels
        check_int("NDQSG", "levels[0] (s1)", s1, 2, 127)
        check_int("NDQSG", "levels[1] (s2)", s2, 1, 126)
        if s1 % s2 or s1 // s2 < 2:
            raise ValueError(f"NDQSG levels {self.levels}: s1 must be a multiple of s2 with s1/s2 >= 2 "
                             "(the nesting ratio)")
        check_int("NDQSG", "bucket_size", self.bucket_size, 1, 1 << 30)
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"NDQSG adaptive must be a bool, got {type(self.adaptive).__name__}")
        if isinstance(self.dqsg_fraction, bool) or not isinstance(self.dqsg_fraction, (int, float)) \
                or not 0.0 <= self.dqsg_fraction <= 1.0:
            raise ValueError(f"NDQSG dqsg_fraction={self.dqsg_fraction!r} must be a number in [0, 1]")

    @property
    def nesting_ratio(self) -> int:
        return self.levels[0] // self.levels[1]

    @property
    def fine(self) -> DQSG:
        """DQSG(s₁): what the DQSG ranks send and what a successful nested decode reproduces."""
        return DQSG(self.levels[0], self.bucket_size, self.dither)

    def dqsg_senders(self, ranks: int) -> int:
        """⌈rP⌉ ranks (at least one: the first decoded sender must not need side information)."""
        return max(1, math.ceil(self.dqsg_fraction * ranks - 1e-9))

    def config(self) -> dict:
        return {"scheme": self.scheme, **{k: v for k, v in asdict(self).items()
                                          if k not in ("nesting", "streak", "reversals")}}

    def is_nested(self, sender: int, ranks: int, name: str | None = None) -> bool:
        """Whether ``sender`` sends coset symbols (of tensor ``name``, under adaptive nesting)."""
        return sender >= self.dqsg_senders(ranks) and (not self.adaptive or self.nesting.get(name, False))

    def observe(self, name: str, pays: bool, confirm: int = 1) -> None:
        """Adaptive nesting's rule, after a step of tensor ``name`` whose nesting would have paid
        (or paid) iff ``pays``: nesting that did not pay is switched off at once; nesting that is off
        is switched on after confirm·2^r consecutive steps that would have paid, r being the number
        of times it was switched off before (a tensor whose outcome keeps changing stops
        oscillating). The payload path confirms once (its side information is this step's own
        senders); the stock nested sum and the coset ring, whose side information is the previous
        step's mean, confirm twice."""
        if self.nesting.get(name, False):
            if not pays:
                self.nesting[name] = False
                self.reversals[name] = self.reversals.get(name, 0) + 1
                self.streak[name] = 0
            return
        self.streak[name] = self.streak.get(name, 0) + 1 if pays else 0
        if self.streak[name] >= confirm * 2 ** self.reversals.get(name, 0):
            self.nesting[name] = True
            self.streak[name] = 0

    def state_dict(self) -> dict[str, dict]:
        """The adaptive nesting state (a checkpoint resumes with it)."""
        return {"nesting": dict(self.nesting), "streak": dict(self.streak), "reversals": dict(self.reversals)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for mine, kind, key in ((self.nesting, bool, "nesting"), (self.streak, int, "streak"),
                                (self.reversals, int, "reversals")):
            mine.clear()
            mine.update({str(k): kind(v) for k, v in state.get(key, {}).items()})

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        if not self.is_nested(ctx.key.sender, ctx.ranks, ctx.name):
            return self.fine.layout(n)
        nb = ops.num_buckets(n, self.bucket_size)
        return [("delta", torch.float32, nb), ("checksum", torch.int32, nb),
                ("cosets", torch.uint8, ops.coset_bytes(n, self.nesting_ratio))]

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        if not n:
            return 0.0
        return 8.0 * sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.layout(n, ctx)) / n

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        if not self.is_nested(ctx.key.sender, ctx.ranks, ctx.name):
            return self.fine.encode(g, ctx)
        flat = flat32(g)
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(flat))
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        rho = self.nesting_ratio
        key = fine.keyed(ctx.key, ctx.ranks)
        k = fine.quantize(flat, delta, key)
        checksum = ops.bucket_checksum(k, self.bucket_size).to(torch.int32)
        cosets = ops.nested_encode(flat, delta, self.bucket_size, self.levels[0], rho, key)
        return Encoded(flat.numel(), {"delta": delta, "checksum": checksum, "cosets": ops.pack_cosets(cosets, rho)},
                       symbols=cosets, alphabet=rho, side_bits=64.0 * delta.numel(), source=flat)

    def decode(self, enc: Encoded, ctx: TensorContext, side: torch.Tensor | None = None) -> torch.Tensor:
        """One sender alone. A nested payload needs side information ``side`` (an estimate of g)."""
        if "cosets" not in enc.fields:
            return self.fine.decode(enc, ctx)
        if side is None:
            raise ValueError("a nested (coset) payload cannot be decoded without side information")
        key = self.fine.keyed(ctx.key, ctx.ranks)
        kout, _ = self.resolve(self._residues(enc), enc.fields["delta"], side, key, 1, enc.fields["checksum"])
        return self.fine.decode_sum(kout, enc.fields["delta"], key)

    # ------------------------------------------------------------- the coset-sum resolver
    def resolve(self, residues: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                senders: int, checksums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Resolve an index sum from its residues mod ρ (§2, §3).

        ``residues``: (Σ_p k_p + senders·⌊ρ/2⌋) mod ρ for the ``senders`` senders key.sender, … ;
        ``side``: an estimate of Σ_p g_p, bit-identical on every rank. Each coordinate takes the
        member of its coset nearest side/Δ + Σ_p u_p. Returns the resolved sums K̂ (int32) and the
        buckets whose checksum Σ_j (2j+1)·K̂_j mod 2^32 differs from ``checksums`` (the senders'
        checksums summed mod 2^32): exactly the buckets where some coordinate resolved wrongly,
        up to checksum collisions."""
        kout = torch.empty(residues.numel(), dtype=torch.int32)
        ops.nested_decode(residues, delta, self.bucket_size, self.nesting_ratio, side.contiguous(), key,
                          senders=senders, kout=kout)
        sent = checksums.to(torch.int64) & 0xFFFFFFFF
        bad = torch.nonzero(ops.bucket_checksum(kout, self.bucket_size) != sent).flatten().tolist()
        return kout, bad

    def probe(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
              senders: int) -> list[int]:
        """The buckets that would fail if the exact index sums ``ksum`` (int32) of ``senders`` senders
        had been sent as their residues mod ρ and resolved against ``side`` (adaptive nesting's
        probe: what nesting would have cost, from data the receiver already holds)."""
        rho = self.nesting_ratio
        residues = ((ksum + senders * (rho // 2)) % rho).to(torch.uint8)
        _, bad = self.resolve(residues, delta, side, key, senders, ops.bucket_checksum(ksum, self.bucket_size))
        return bad

    def patch(self, kout: torch.Tensor, buckets: list[int], truth: torch.Tensor, stats: DecodeStats) -> None:
        """Write the recovered true index sums ``truth`` of failed ``buckets`` (their coordinates in
        the order given) into ``kout``, counting the buckets and the coordinates that had been wrong."""
        idx = bucket_coordinates(buckets, self.bucket_size, kout.numel())
        if truth.numel() != idx.numel():
            raise ValueError(f"recovery gave {truth.numel()} values; {len(buckets)} failed bucket(s) hold "
                             f"{idx.numel()} coordinates")
        truth = truth.to(torch.int32)
        stats.failed_buckets += len(buckets)
        stats.failed_coordinates += int((kout[idx] != truth).sum())
        kout[idx] = truth

    def decode_sum(self, residues: torch.Tensor, delta: torch.Tensor, side: torch.Tensor | None, key: DitherKey,
                   senders: int, checksums: torch.Tensor, *, recover: Callable[[torch.Tensor], torch.Tensor],
                   stats: DecodeStats) -> torch.Tensor:
        """Σ_p k_p over ``senders`` senders, exact: resolved with side information, failed buckets
        replaced by ``recover(coordinates)`` (a collective giving the true index sums there; every
        rank finds the same failures, so every rank takes part). Without side information every
        bucket is recovered (not counted as a failure)."""
        n = residues.numel()
        if side is None:
            kout, bad = torch.empty(n, dtype=torch.int32), list(range(ops.num_buckets(n, self.bucket_size)))
        else:
            kout, bad = self.resolve(residues, delta, side, key, senders, checksums)
        if bad:
            stats.recovery_rounds += 1
            truth = recover(bucket_coordinates(bad, self.bucket_size, n))
            self.patch(kout, bad, truth, DecodeStats() if side is None else stats)
        return kout

    # ------------------------------------------------------------- payload path (paper's NDQSG)
    def recovery_payload(self, enc: Encoded, ctx: TensorContext, buckets: list[int]) -> torch.Tensor:
        """This sender's DQSG(s₁) symbols for the failed buckets, concatenated in the order given and
        packed as one stream."""
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload can be recovered")
        flat = enc.source
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(flat))
        sym = fine.quantize(flat, delta, fine.keyed(ctx.key, ctx.ranks), symbols=True)
        idx = bucket_coordinates(buckets, self.bucket_size, flat.numel())
        return ops.pack_symbols(sym[idx].contiguous(), fine.symbols)

    def _residues(self, enc: Encoded) -> torch.Tensor:
        return ops.unpack_cosets(enc.fields["cosets"], self.nesting_ratio, enc.n)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Decode in rank order with the running mean as side information; detect failed buckets by
        checksum and recover them through ``recover`` (a collective the transport runs), then decode
        again with the corrected values until no bucket fails."""
        ranks, n = len(payloads), payloads[0].n
        fine = self.fine
        known: dict[int, list[tuple[list[int], torch.Tensor]]] = {}  # sender -> recovered (buckets, indices)
        stats = DecodeStats()
        probed = 0  # adaptive, nesting off: bytes the nested senders would have sent with nesting on
        while True:
            total = torch.zeros(n, dtype=torch.float32)
            failed: dict[int, list[int]] = {}
            resolved: dict[int, torch.Tensor] = {}
            for p, enc in enumerate(payloads):
                pctx = ctx.sender(p)
                if "cosets" not in enc.fields:
                    if self.adaptive and p >= self.dqsg_senders(ranks):
                        probed += self._probe(enc, pctx, total / p)
                    total += fine.decode(enc, pctx)
                    continue
                key = fine.keyed(pctx.key, pctx.ranks)
                kout, bad = self.resolve(self._residues(enc), enc.fields["delta"], total / p, key, 1,
                                         enc.fields["checksum"])
                done: set[int] = set()
                for buckets, truth in known.get(p, ()):  # keep recovered buckets exact
                    self.patch(kout, buckets, truth, DecodeStats())
                    done.update(buckets)
                bad = [b for b in bad if b not in done]
                if bad:
                    failed[p], resolved[p] = bad, kout
                total += fine.decode_sum(kout, enc.fields["delta"], key)
            if not failed:
                if self.adaptive:
                    self._decide(ctx, ranks, n, probed, known)
                return total / ranks, stats
            if recover is None:
                raise RuntimeError(f"NDQSG decoding failed in {sum(map(len, failed.values()))} bucket(s) of "
                                   f"'{ctx.name}' and no recovery round is available")
            stats.recovery_rounds += 1
            replies = recover(failed)
            for p, buckets in failed.items():
                truth = self._recovered_codes(replies[p], n, buckets)
                self.patch(resolved[p], buckets, truth, stats)
                known.setdefault(p, []).append((buckets, truth))

    # ------------------------------------------------------------- adaptive nesting
    def nested_bytes(self, n: int, recovered: int) -> int:
        """Bytes a nested sender hands over for n coordinates, ``recovered`` of them resent as DQSG(s₁)."""
        nb = ops.num_buckets(n, self.bucket_size)
        return 8 * nb + ops.coset_bytes(n, self.nesting_ratio) + (
            ops.symbol_bytes(recovered, self.fine.symbols) if recovered else 0)

    def _probe(self, enc: Encoded, ctx: TensorContext, side: torch.Tensor) -> int:
        """Bytes this DQSG(s₁) payload would have cost as a nested one: its indices' residues mod ρ
        resolved against the same side information a nested payload would have met, the failed
        buckets counted as recovered."""
        fine, n = self.fine, enc.n
        k = ops.unpack_symbols(enc.fields["symbols"], fine.symbols, n).to(torch.int32) - fine.levels
        bad = self.probe(k, enc.fields["delta"], side, fine.keyed(ctx.key, ctx.ranks), 1)
        return self.nested_bytes(n, bucket_coordinates(bad, self.bucket_size, n).numel())

    def _decide(self, ctx: TensorContext, ranks: int, n: int, probed: int,
                known: dict[int, list[tuple[list[int], torch.Tensor]]]) -> None:
        """Nesting of ``ctx.name`` at its next step (:meth:`observe`), from whether the nested senders'
        bytes this step (sent, recovery included, or probed) were at most ADAPTIVE_MARGIN × their
        DQSG(s₁) bytes. Every rank decodes every payload alike, so every rank decides alike, without
        a collective."""
        senders = ranks - self.dqsg_senders(ranks)
        if not senders:
            return
        if self.nesting.get(ctx.name, False):
            spent = sum(self.nested_bytes(n, sum(bucket_coordinates(b, self.bucket_size, n).numel()
                                                 for b, _ in known.get(p, ())))
                        for p in range(ranks - senders, ranks))
        else:
            spent = probed
        plain = senders * sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.fine.layout(n))
        self.observe(ctx.name, spent <= self.ADAPTIVE_MARGIN * plain)

    def _recovered_codes(self, buf: torch.Tensor, n: int, buckets: list[int]) -> torch.Tensor:
        """A recovery reply (packed DQSG(s₁) symbols of the buckets) as int32 indices."""
        fine = self.fine
        count = bucket_coordinates(buckets, self.bucket_size, n).numel()
        if ops.symbol_bytes(count, fine.symbols) != buf.numel():
            raise ValueError(f"recovery payload has {buf.numel()} bytes; {len(buckets)} failed bucket(s) need "
                             f"{ops.symbol_bytes(count, fine.symbols)}")
        return ops.unpack_symbols(buf, fine.symbols, count).to(torch.int32) - fine.levels


def bucket_coordinates(buckets: list[int], bucket_size: int, n: int) -> torch.Tensor:
    """Coordinates of the given buckets, bucket by bucket in the order given (the last may be short)."""
    if not buckets:
        return torch.empty(0, dtype=torch.int64)
    idx = (torch.tensor(buckets, dtype=torch.int64)[:, None] * bucket_size
           + torch.arange(min(bucket_size, n), dtype=torch.int64)[None, :]).reshape(-1)
    return idx[idx < n]
