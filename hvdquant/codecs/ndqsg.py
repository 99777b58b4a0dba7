"""NDQSG: nested dithered quantization with side information (docs/ALGORITHMS.md §2).

Fine lattice Δℤ with Δ_b = ‖g_b‖∞/s₁; coarse lattice ρΔℤ, nesting ratio ρ = s₁/s₂. A fraction
``dqsg_fraction`` (r) of the ranks — ranks 0 … ⌈rP⌉−1, at least one — send plain DQSG(s₁); the
others send only the coset symbol (k + ⌊ρ/2⌋) mod ρ of each fine index k (log2 ρ bits), one
float32 Δ_b and one uint32 checksum Σ_j w_j·k_j mod 2^32 per bucket (w_j: odd hashed weights of the
position j).

The receiver decodes senders in rank order, keeping the running mean of everything decoded so far;
that mean is the side information y of the next nested sender: K̂ = resolved index nearest
y/Δ + u in k's coset. Decoding is exact (ĝ equals DQSG(s₁)'s reconstruction, bit for bit) iff
|g − y + eΔ| < ρΔ/2. A bucket whose resolved indices do not reproduce the sender's checksum has
failed: it is counted and **recovered** — the transport asks that sender for the bucket's DQSG(s₁)
symbols in a second round (every rank finds the same failures, so every rank takes part) — and
decoding restarts with the corrected values until no bucket fails. Nothing wrong is passed on.

With ``locate`` (on by default under adaptive nesting) a failed bucket is first asked for 2t
power-sum syndromes Σ_j k_j·(j+1)^m mod 65521 (m < 2t; 2 bytes each, t = 4, then 16): up to t
wrong coordinates are located and corrected from them (Berlekamp–Massey, Chien search, Forney),
and a correction is accepted only if the corrected bucket reproduces every syndrome, the uint32
checksum and the index range; only buckets it cannot explain are resent whole.

This module is the codec: configuration, payload layout, encoding, decoding and the rank-order
aggregation with its pricing of adaptive nesting. Its parts live apart: resolving and repairing
index sums (:mod:`~hvdquant.codecs.coset_resolver`), the recovery requests and replies
(:mod:`~hvdquant.codecs.recovery`), adaptive nesting's rule and decisions
(:mod:`~hvdquant.codecs.nesting`, kept in the exchange's :class:`~hvdquant.codecs.state.CodecState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from hvdquant.codecs.coset_resolver import CosetResolver, bucket_coordinates
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.nesting import NestingPolicy, candidate_ratios
from hvdquant.codecs.recovery import RecoveryProtocol
from hvdquant.codecs.state import require_state
from hvdquant.codecs.syndromes import LOCATE_PRIME
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.stats import DecodeStats

#: what decoding met per nested-role sender, for pricing: its exact indices, Δ, its key, and the
#: side information its payload met
Met = tuple[torch.Tensor, torch.Tensor, DitherKey, torch.Tensor]


@dataclass(frozen=True)
class NDQSG(Codec):
    """Nested DQSG with ``levels`` = (s₁, s₂), ρ = s₁/s₂, buckets of ``bucket_size``, and a fraction
    ``dqsg_fraction`` of ranks sending plain DQSG(s₁). The paper's setting: (3, 1), r = 0.5.
    ``dither`` as in :class:`DQSG`: under ``"stratified"`` each nested rank's u_p is still its own
    function of the key, so it is decoded against side information exactly as before.

    ``adaptive=True`` (the default; ``adaptive=False`` is the paper's fixed nesting): nesting and
    its ratio ρ (:meth:`candidate_ratios`) are decided per tensor name for the next step from what
    every rank decoded at this one — the nested senders' bytes (recovery included) for the ratio in
    use, and a probe (their exact indices resolved from their residues mod ρ against the same side
    information) for the others — keeping the cheapest ρ, and nesting only where it sends at most
    ``NestingPolicy.ADAPTIVE_MARGIN`` × the DQSG(s₁) bytes (rule: :meth:`NestingPolicy.observe`).
    A tensor starts with nesting off. The decisions are identical on every rank without a
    collective and are state, not configuration: they live in ``ctx.state.nesting`` (the
    exchange's :class:`~hvdquant.codecs.state.CodecState`, required under adaptive nesting), and
    cost one nested decode per nested sender and candidate ratio. The stock path
    (:class:`~hvdquant.transports.summed.NestedSum`) and the coset ring
    (:func:`hvdquant.ring_allreduce`) take the same switch and ratio choice. (docs/RESULTS.md,
    "When nesting pays".)

    ``locate`` (``None``: the same as ``adaptive``): a failed bucket of the payload path is first
    asked for syndromes that locate up to t = 4, then 16 wrong coordinates (``LOCATE_ERRORS``) and
    is resent whole only if they do not explain it; the payload format does not change, the
    replies count in the bytes and in adaptive nesting's decisions (docs/ALGORITHMS.md §2)."""

    levels: tuple[int, int] = (3, 1)
    bucket_size: int = 512
    dqsg_fraction: float = 0.5
    dither: str = "independent"
    adaptive: bool = True
    #: recover failed buckets by locating their wrong coordinates from syndromes sent on request
    #: (docs/ALGORITHMS.md §2) before resending them whole; ``None``: on iff ``adaptive``
    locate: bool | None = None

    scheme = "ndqsg"
    summable = True  # coset indices sum (transports.summed.NestedSum)
    #: locating: the numbers of wrong coordinates t a failed bucket's syndromes can correct, stage by
    #: stage (2t syndromes in all after a stage; each stage is one more request round). Capped so that
    #: a bucket's syndromes cost at most half of its DQSG(s₁) symbols.
    LOCATE_ERRORS = (4, 16)

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
        if self.locate is not None and not isinstance(self.locate, bool):
            raise TypeError(f"NDQSG locate must be a bool or None, got {type(self.locate).__name__}")
        if isinstance(self.dqsg_fraction, bool) or not isinstance(self.dqsg_fraction, (int, float)) \
                or not 0.0 <= self.dqsg_fraction <= 1.0:
            raise ValueError(f"NDQSG dqsg_fraction={self.dqsg_fraction!r} must be a number in [0, 1]")

    # ------------------------------------------------------------- configuration
    @property
    def nesting_ratio(self) -> int:
        """ρ = s₁/s₂, the paper's (fixed) nesting ratio."""
        return self.levels[0] // self.levels[1]

    @property
    def fine(self) -> DQSG:
        """DQSG(s₁): what the DQSG ranks send and what a successful nested decode reproduces."""
        return DQSG(self.levels[0], self.bucket_size, self.dither)

    @property
    def resolver(self) -> CosetResolver:
        """Resolving index sums of DQSG(s₁) indices from their cosets (:mod:`~hvdquant.codecs.coset_resolver`)."""
        return CosetResolver(self.bucket_size, self.levels[0])

    @property
    def recovery(self) -> RecoveryProtocol:
        """This codec's recovery requests and replies (:mod:`~hvdquant.codecs.recovery`)."""
        return RecoveryProtocol(self.fine, self.locate_stages())

    @property
    def locating(self) -> bool:
        """Whether failed buckets are first located from syndromes (``locate``; default: ``adaptive``)."""
        return self.adaptive if self.locate is None else self.locate

    def locate_stages(self) -> tuple[int, ...]:
        """Cumulative syndrome counts 2t of the locating stages (empty: failed buckets are resent
        whole at once). Locators j+1 must be distinct mod the prime, so bucket_size < 65521."""
        if not self.locating or self.bucket_size >= LOCATE_PRIME:
            return ()
        whole = sizes.symbol_bytes(self.bucket_size, self.fine.symbols)
        out: list[int] = []
        for t in self.LOCATE_ERRORS:
            t = min(t, whole // 8, self.bucket_size)  # 2t syndromes of 2 bytes ≤ half the bucket's symbols
            if t >= 1 and (not out or 2 * t > out[-1]):
                out.append(2 * t)
        return tuple(out)

    def dqsg_senders(self, ranks: int) -> int:
        """⌈rP⌉ ranks (at least one: the first decoded sender must not need side information)."""
        return max(1, math.ceil(self.dqsg_fraction * ranks - 1e-9))

    def candidate_ratios(self) -> tuple[int, ...]:
        """The ratios adaptive nesting chooses from (:func:`~hvdquant.codecs.nesting.candidate_ratios`)."""
        return candidate_ratios(*self.levels)

    # ------------------------------------------------------------- adaptive nesting's decisions
    def policy(self, ctx: TensorContext) -> NestingPolicy | None:
        """The nesting decisions in ``ctx.state`` under adaptive nesting (required), None otherwise."""
        if not self.adaptive:
            return None
        return require_state(ctx.state, "NDQSG(adaptive=True)", "its nesting decisions").nesting

    def nests(self, name: str | None, policy: NestingPolicy | None) -> bool:
        """Whether tensor ``name``'s nested senders send cosets: always under fixed nesting, as
        ``policy`` decided under adaptive nesting."""
        return not self.adaptive or _required(policy).is_on(name)

    def ratio(self, name: str | None, policy: NestingPolicy | None = None) -> int:
        """The nesting ratio ρ of tensor ``name``: chosen per tensor under adaptive nesting (held by
        ``policy``), s₁/s₂ otherwise."""
        return _required(policy).ratio(name, self.nesting_ratio) if self.adaptive else self.nesting_ratio

    def is_nested(self, sender: int, ranks: int, nesting: bool = True) -> bool:
        """Whether ``sender`` sends coset symbols, given whether its tensor nests (:meth:`nests`)."""
        return sender >= self.dqsg_senders(ranks) and nesting

    def _nested_sender(self, ctx: TensorContext) -> bool:
        """:meth:`is_nested` for ``ctx``'s sender (the DQSG senders never look up the decisions)."""
        return ctx.key.sender >= self.dqsg_senders(ctx.ranks) and self.nests(ctx.name, self.policy(ctx))

    # ------------------------------------------------------------- payloads
    def layout(self, n: int, ctx: TensorContext) -> Layout:
        if not self._nested_sender(ctx):
            return self.fine.layout(n)
        nb = sizes.num_buckets(n, self.bucket_size)
        return [("delta", torch.float32, nb), ("checksum", torch.int32, nb),
                ("cosets", torch.uint8, sizes.coset_bytes(n, self.ratio(ctx.name, self.policy(ctx))))]

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        if not n:
            return 0.0
        return 8.0 * sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.layout(n, ctx)) / n

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        """DQSG(s₁), or for a nested sender: Δ_b, the checksum Σ_j w_j·k_j mod 2^32 and the cosets
        (k + ⌊ρ/2⌋) mod ρ per bucket, keeping the source for a recovery reply."""
        if not self._nested_sender(ctx):
            return self.fine.encode(g, ctx)
        flat = flat32(g)
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(flat))
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        rho = self.ratio(ctx.name, self.policy(ctx))
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
        rho = self.ratio(ctx.name, self.policy(ctx))
        kout, _ = self.resolver.resolve(self._residues(enc, rho), enc.fields["delta"], side, key, 1,
                                        enc.fields["checksum"], rho)
        return self.fine.decode_sum(kout, enc.fields["delta"], key)

    def reconstruction(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """Every receiver decodes a nested payload to DQSG(s₁)'s reconstruction Δ(k − u) of its
        source, exactly (failed buckets are recovered), so that is what this sender's payload is."""
        if "cosets" not in enc.fields:
            return self.fine.decode(enc, ctx)
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload has a reconstruction")
        key = self.fine.keyed(ctx.key, ctx.ranks)
        delta = enc.fields["delta"]
        return self.fine.decode_sum(self.fine.quantize(enc.source, delta, key), delta, key)

    def recovery_payload(self, enc: Encoded, ctx: TensorContext, requests: list) -> torch.Tensor:
        """This sender's reply to its recovery ``requests`` (:meth:`RecoveryProtocol.reply`)."""
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload can be recovered")
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(enc.source))
        return self.recovery.reply(fine.quantize(enc.source, delta, fine.keyed(ctx.key, ctx.ranks), symbols=True),
                                   requests)

    def _residues(self, enc: Encoded, rho: int) -> torch.Tensor:
        return ops.unpack_cosets(enc.fields["cosets"], rho, enc.n)

    # ------------------------------------------------------------- the paper's decoder
    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Decode in rank order with the running mean as side information; detect failed buckets by
        checksum; correct those their syndromes explain (``locate``); recover the others through
        ``recover`` (a collective the transport runs: the next syndromes of a bucket, or the bucket
        whole), then decode again with the corrected values until no bucket fails. Under adaptive
        nesting, then decide the tensor's next step (:meth:`_decide`)."""
        ranks, n = len(payloads), payloads[0].n
        device = next(iter(payloads[0].fields.values())).device
        fine, resolver, protocol = self.fine, self.resolver, self.recovery
        policy = self.policy(ctx)
        known: dict[int, list[tuple[list[int], torch.Tensor]]] = {}  # sender -> recovered (buckets, indices)
        syndromes: dict[int, dict[int, torch.Tensor]] = {}  # sender -> bucket -> syndromes received so far
        replied = [0] * ranks  # recovery bytes each sender handed over
        stats = DecodeStats()
        rho = self.ratio(ctx.name, policy)
        # adaptive: per nested-role sender, its exact indices and what decoding them met (the last
        # pass, once nothing fails, holds the exact values), for pricing every candidate ratio
        met: dict[int, Met] = {}
        while True:
            total = torch.zeros(n, dtype=torch.float32, device=device)
            failed: dict[int, list] = {}
            resolved: dict[int, torch.Tensor] = {}
            for p, enc in enumerate(payloads):
                pctx = ctx.sender(p)
                key = fine.keyed(pctx.key, pctx.ranks)
                if "cosets" not in enc.fields:
                    if self.adaptive and p >= self.dqsg_senders(ranks):
                        k = ops.unpack_symbols(enc.fields["symbols"], fine.symbols, n).to(torch.int32) - fine.levels
                        met[p] = (k, enc.fields["delta"], key, total * (1.0 / p))
                    total += fine.decode(enc, pctx)
                    continue
                # the mean so far, as a product by fl(1/p): a framework's division by a scalar may be a
                # reciprocal multiply on a GPU and a true division on a CPU (other side bits, other K̂)
                side = total * (1.0 / p)
                kout, bad = resolver.resolve(self._residues(enc, rho), enc.fields["delta"], side, key, 1,
                                             enc.fields["checksum"], rho)
                done: set[int] = set()
                for buckets, truth in known.get(p, ()):  # keep recovered buckets exact
                    resolver.patch(kout, buckets, truth, DecodeStats())
                    done.update(buckets)
                bad = [b for b in bad if b not in done]
                if bad and syndromes.get(p):
                    fixed, truth = resolver.correct(kout, bad, syndromes[p], enc.fields["checksum"], rho)
                    if fixed:
                        resolver.patch(kout, fixed, truth, stats)
                        known.setdefault(p, []).append((fixed, truth))
                        bad = [b for b in bad if b not in set(fixed)]
                if bad:
                    failed[p], resolved[p] = protocol.next_requests(bad, syndromes.get(p, {})), kout
                met[p] = (kout, enc.fields["delta"], key, side)
                total += fine.decode_sum(kout, enc.fields["delta"], key)
            if not failed:
                if policy is not None:
                    self._decide(ctx.name, policy, ranks, n, met, replied)
                return total / ranks, stats
            if recover is None:
                raise RuntimeError(f"NDQSG decoding failed in {sum(map(len, failed.values()))} bucket(s) of "
                                   f"'{ctx.name}' and no recovery round is available")
            stats.recovery_rounds += 1
            replies = recover(failed)
            for p, requests in failed.items():
                replied[p] += replies[p].numel()
                reply = protocol.parse(replies[p], n, requests)
                mine = syndromes.setdefault(p, {})
                for b, s in reply.syndromes:
                    mine[b] = s if b not in mine else torch.cat([mine[b], s])
                if reply.whole:
                    resolver.patch(resolved[p], reply.whole, reply.truth, stats)
                    known.setdefault(p, []).append((reply.whole, reply.truth))

    # ------------------------------------------------------------- pricing adaptive nesting
    def nested_bytes(self, n: int, recovered: int, syndromes: int = 0, rho: int | None = None) -> int:
        """Bytes a nested sender hands over for n coordinates with ratio ``rho`` (default s₁/s₂),
        ``recovered`` of them resent as DQSG(s₁), ``syndromes`` syndrome words (2 bytes each) sent to
        locate wrong coordinates."""
        nb = sizes.num_buckets(n, self.bucket_size)
        return 8 * nb + sizes.coset_bytes(n, rho or self.nesting_ratio) + 2 * syndromes + (
            sizes.symbol_bytes(recovered, self.fine.symbols) if recovered else 0)

    def probe_bytes(self, k: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                    rho: int) -> int:
        """B_probe(ρ): bytes one sender's exact indices ``k`` cost sent nested with ratio ``rho``
        against side information ``side``. The probe holds the true indices, so it counts the wrong
        coordinates w of each failed bucket; a locating stage of 2t syndromes corrects exactly the
        buckets with w ≤ t (Reed–Solomon decoding, :mod:`~hvdquant.codecs.syndromes`), so each
        bucket is priced at the syndromes it would be sent and, past the last stage, resent whole."""
        kout, bad = self.resolver.probe_resolve(k, delta, side, key, 1, rho)
        n, d = k.numel(), self.bucket_size
        stages = self.locate_stages()
        if not bad or not stages:
            return self.nested_bytes(n, bucket_coordinates(bad, d, n).numel(), 0, rho)
        nb = sizes.num_buckets(n, d)
        wrong = torch.zeros(nb * d, dtype=torch.int32, device=k.device)
        wrong[:n] = (kout != k).to(torch.int32)
        w = wrong.view(nb, d).sum(1)[torch.tensor(bad, dtype=torch.int64, device=k.device)]
        words, sent = 0, 0
        for total in stages:  # cumulative syndrome counts 2t
            words += (total - sent) * int((w > sent // 2).sum())  # buckets still failing get this stage
            sent = total
        whole = [b for b, left in zip(bad, (w > sent // 2).tolist()) if left]
        return self.nested_bytes(n, bucket_coordinates(whole, d, n).numel(), words, rho)

    def _decide(self, name: str, policy: NestingPolicy, ranks: int, n: int, met: dict[int, Met],
                replied: list[int]) -> None:
        """Nesting and ratio of tensor ``name`` at its next step (:meth:`NestingPolicy.choose`).
        Every candidate ratio is priced on this step's nested-role senders: their exact indices
        resolved against the side information their payloads met (the ratio in use, while nesting
        is on: the bytes really handed over, recovery replies included), against those senders'
        DQSG(s₁) bytes. Every rank decodes every payload alike, so every rank decides alike,
        without a collective."""
        senders = ranks - self.dqsg_senders(ranks)
        if not senders:
            return
        current = self.ratio(name, policy)
        plain = senders * sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.fine.layout(n))
        cost = {}
        for rho in self.candidate_ratios():
            if rho == current and policy.is_on(name):
                cost[rho] = sum(self.nested_bytes(n, 0, 0, rho) + replied[p] for p in met)
                continue
            cost[rho] = sum(self.probe_bytes(k, delta, side, key, rho) for k, delta, key, side in met.values())
        policy.choose(name, cost, plain, buckets=senders * sizes.num_buckets(n, self.bucket_size))


def _required(policy: NestingPolicy | None) -> NestingPolicy:
    if policy is None:
        raise ValueError("adaptive NDQSG needs the NestingPolicy holding its decisions (the exchange's "
                         "CodecState.nesting)")
    return policy
