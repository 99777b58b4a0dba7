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

Under ``adaptive`` nesting (the default; ``adaptive=False`` is the paper's fixed nesting) a
tensor starts with nesting off, and after each step every receiver decides, per tensor name,
whether its nested senders nest at the next step and with which ratio ρ: every candidate ratio
(:func:`~hvdquant.codecs.nesting.candidate_ratios`) is priced in bytes on this step's nested-role
senders — what they really handed over (recovery included) for the ratio in use, a probe of their
exact indices against the same side information for the others
(:mod:`~hvdquant.codecs.nesting_cost`) — and the cheapest ρ is kept, nesting only where it sends at
most ``NestingPolicy.ADAPTIVE_MARGIN`` × the DQSG(s₁) bytes (:meth:`NestingPolicy.observe`). The
decisions are identical on every rank without a collective and are state, not configuration: they
live in ``ctx.state.nesting`` (the exchange's :class:`~hvdquant.codecs.state.CodecState`), and cost
one nested decode per nested sender and candidate ratio. The stock path
(:class:`~hvdquant.transports.nested_sum.NestedSum`) and the coset ring (:func:`hvdquant.ring_allreduce`)
take the same switch and ratio choice (docs/RESULTS.md, "When nesting pays").

This module is the codec: configuration, payload layout, encoding and decoding of one sender. Its
parts live apart: the rank-order decoder of all senders' payloads with its recovery rounds
(:mod:`~hvdquant.codecs.nested_aggregate`), resolving and repairing index sums
(:mod:`~hvdquant.codecs.coset_resolver`), the recovery requests and replies
(:mod:`~hvdquant.codecs.recovery`), adaptive nesting's prices (:mod:`~hvdquant.codecs.nesting_cost`)
and its rule and decisions (:mod:`~hvdquant.codecs.nesting`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    layout_bytes,
    shared_keys,
)
from hvdquant.codecs.coset_resolver import CosetResolver
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.nested_aggregate import RankOrderDecoder
from hvdquant.codecs.nesting import NestingPolicy, candidate_ratios
from hvdquant.codecs.recovery import RecoveryProtocol, locate_stages
from hvdquant.codecs.rotation import ROTATIONS, Rotation
from hvdquant.codecs.state import require_state
from hvdquant.kernels import ops, sizes
from hvdquant.stats import DecodeStats


@dataclass(frozen=True)
class NDQSG(Codec):
    """Nested DQSG with ``levels`` = (s₁, s₂), ρ = s₁/s₂, buckets of ``bucket_size``, a fraction
    ``dqsg_fraction`` (r) of ranks sending plain DQSG(s₁), ``dither`` as in :class:`DQSG` (each
    nested rank's u_p stays its own function of the key); the paper's setting: (3, 1), r = 0.5,
    ``adaptive=False``. ``adaptive``: nesting and ρ decided per tensor from what every rank decoded,
    kept in ``ctx.state.nesting`` (required); ``locate`` (``None``: as ``adaptive``): failed buckets
    first asked for syndromes locating t = 4, then 16 wrong coordinates (module docstring)."""

    levels: tuple[int, int] = (3, 1)
    bucket_size: int = 512
    dqsg_fraction: float = 0.5
    dither: str = "independent"
    adaptive: bool = True
    locate: bool | None = None  # locate failed buckets' wrong coordinates first; None: iff adaptive
    rotation: str = "none"  # "hadamard": every sender quantizes the shared rotation of g (payload paths)

    scheme = "ndqsg"
    summable = True  # coset indices sum (transports.nested_sum.NestedSum)
    #: locating: the numbers of wrong coordinates t a failed bucket's syndromes can correct, stage by
    #: stage (each one more request round; capped by :func:`~hvdquant.codecs.recovery.locate_stages`)
    LOCATE_ERRORS = (4, 16)

    def __post_init__(self) -> None:
        _validate(self)

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
        """Cumulative syndrome counts 2t of the locating stages (empty: failed buckets resent whole)."""
        return locate_stages(self.fine, self.LOCATE_ERRORS) if self.locating else ()

    def dqsg_senders(self, ranks: int) -> int:
        """⌈rP⌉ ranks (at least one: the first decoded sender must not need side information)."""
        return max(1, math.ceil(self.dqsg_fraction * ranks - 1e-9))

    def candidate_ratios(self) -> tuple[int, ...]:
        """The ratios adaptive nesting chooses from (:func:`~hvdquant.codecs.nesting.candidate_ratios`)."""
        return candidate_ratios(*self.levels)

    def policy(self, ctx: TensorContext) -> NestingPolicy | None:
        """The nesting decisions in ``ctx.state`` under adaptive nesting (required), None otherwise."""
        if not self.adaptive:
            return None
        return require_state(ctx.state, "NDQSG(adaptive=True)", "its nesting decisions").nesting

    def nests(self, name: str | None, policy: NestingPolicy | None) -> bool:
        """Whether tensor ``name``'s nested senders send cosets: always, or as adaptive ``policy`` decided."""
        return not self.adaptive or _required(policy).is_on(name)

    def ratio(self, name: str | None, policy: NestingPolicy | None = None) -> int:
        """Tensor ``name``'s nesting ratio ρ: as adaptive nesting's ``policy`` chose it, else s₁/s₂."""
        return _required(policy).ratio(name, self.nesting_ratio) if self.adaptive else self.nesting_ratio

    def is_nested(self, sender: int, ranks: int, nesting: bool = True) -> bool:
        """Whether ``sender`` sends coset symbols, given whether its tensor nests (:meth:`nests`)."""
        return sender >= self.dqsg_senders(ranks) and nesting

    def _nested_sender(self, ctx: TensorContext) -> bool:
        """:meth:`is_nested` for ``ctx``'s sender (the DQSG senders never look up the decisions)."""
        return ctx.key.sender >= self.dqsg_senders(ctx.ranks) and self.nests(ctx.name, self.policy(ctx))

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        if not self._nested_sender(ctx):
            return self.fine.layout(n)
        nb = sizes.num_buckets(n, self.bucket_size)
        return [("delta", torch.float32, nb), ("checksum", torch.int32, nb),
                ("cosets", torch.uint8, sizes.coset_bytes(n, self.ratio(ctx.name, self.policy(ctx))))]

    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        return 8.0 * layout_bytes(self.layout(n, ctx)) / n if n else 0.0

    @property
    def _rotating(self) -> DQSG:
        """DQSG(s₁) with this codec's rotation: its group rotation and inverse rotation."""
        return DQSG(self.levels[0], self.bucket_size, self.dither, self.rotation)

    @property
    def rotator(self) -> Rotation:
        """The shared rotation (docs/ALGORITHMS.md §10): with ``rotation="hadamard"`` every sender
        encodes R g, side information and the decoded mean live in rotated coordinates, and the mean
        (or one sender's reconstruction) is rotated back once."""
        return Rotation(self.rotation, self.bucket_size)

    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded:
        """DQSG(s₁), or for a nested sender: Δ_b, the checksum Σ_j w_j·k_j mod 2^32 and the cosets
        (k + ⌊ρ/2⌋) mod ρ per bucket, keeping the source for a recovery reply (of R g, with a rotation)."""
        flat = self.rotator.rotate(flat32(g), ctx.key)
        if not self._nested_sender(ctx):
            return self.fine.encode(flat, ctx)
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(flat))
        if not all_finite(delta):
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{ctx.name}'")
        rho = self.ratio(ctx.name, self.policy(ctx))
        key = fine.keyed(ctx.key, ctx.ranks)
        checksum = ops.bucket_checksum(fine.quantize(flat, delta, key), self.bucket_size).to(torch.int32)
        cosets = ops.nested_encode(flat, delta, self.bucket_size, self.levels[0], rho, key)
        return Encoded(flat.numel(), {"delta": delta, "checksum": checksum, "cosets": ops.pack_cosets(cosets, rho)},
                       symbols=cosets, alphabet=rho, side_bits=64.0 * delta.numel(), source=flat)

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """:meth:`encode` of every part with the same bits, in a number of launches that does not grow
        with the group: the rotation (one launch), the DQSG(s₁) payloads by DQSG's group encoder, and
        the nested payloads' scales, indices, checksums and cosets one launch each, their cosets
        packed one launch per nesting ratio. A group holding a non-finite tensor is encoded tensor by
        tensor, which refuses that one alone."""
        if len(ctxs) < 2 or not shared_keys(ctxs):
            return super().encode_group(parts, ctxs)
        lengths = [flat32(g).numel() for g in parts]
        sources = self._rotating.rotate_group(torch.cat([flat32(g) for g in parts]), ctxs, lengths).split(lengths)
        roles = [self._nested_sender(c) for c in ctxs]
        out: list[Encoded | None] = [None] * len(ctxs)
        for nests, encode in ((False, self.fine.encode_group), (True, self._encode_nested)):
            members = [i for i, r in enumerate(roles) if r == nests]
            if members:
                encoded = encode([sources[i] for i in members], [ctxs[i] for i in members])
                if any(e is None for e in encoded):
                    return super().encode_group(parts, ctxs)
                for i, e in zip(members, encoded):
                    out[i] = e
        return out

    def _encode_nested(self, sources: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """The nested payloads of ``sources`` (rotated already), end to end through segmented launches;
        None for every tensor if one is not finite."""
        fine, lengths = self.fine, [f.numel() for f in sources]
        source = torch.cat(list(sources))
        segs = fine.segments(ctxs, lengths)
        delta = fine.step_size(ops.bucket_absmax_segments(source, segs))
        if not all_finite(delta):
            return [None] * len(ctxs)
        ratios = tuple(self.ratio(c.name, self.policy(c)) for c in ctxs)
        k = ops.dqsg_encode_segments(source, delta, segs, fine.levels).to(torch.int32).sub_(fine.levels)
        checksums = ops.bucket_checksum_segments(k, segs).to(torch.int32)
        cosets = ops.nested_encode_segments(source, delta, segs, fine.levels, ratios,
                                            torch.empty(source.numel(), dtype=torch.uint8, device=source.device))
        symbols = cosets.split(lengths)
        packed: list[torch.Tensor | None] = [None] * len(ctxs)
        for rho in sorted(set(ratios)):  # one packing launch per ratio in use
            members = [i for i, r in enumerate(ratios) if r == rho]
            group = segs.subset(members)
            together = ops.pack_cosets_segments(torch.cat([symbols[i] for i in members]), group, rho)
            for i, p in zip(members, together.split([sizes.coset_bytes(lengths[i], rho) for i in members])):
                packed[i] = p
        return [Encoded(n, {"delta": d, "checksum": c, "cosets": p}, symbols=y, alphabet=rho,
                        side_bits=64.0 * d.numel(), source=src)
                for n, d, c, p, y, rho, src in zip(lengths, delta.split(segs.buckets), checksums.split(segs.buckets),
                                                    packed, symbols, ratios, sources)]

    def decode(self, enc: Encoded, ctx: TensorContext, side: torch.Tensor | None = None) -> torch.Tensor:
        """One sender alone. A nested payload needs side information ``side`` (an estimate of g)."""
        if "cosets" not in enc.fields:
            return self.rotator.unrotate(self.fine.decode(enc, ctx), ctx.key)
        if side is None:
            raise ValueError("a nested (coset) payload cannot be decoded without side information")
        key = self.fine.keyed(ctx.key, ctx.ranks)
        rho = self.ratio(ctx.name, self.policy(ctx))
        side = self.rotator.rotate(flat32(side, "side information"), ctx.key)
        kout, _ = self.resolver.resolve(self.residues(enc, rho), enc.fields["delta"], side, key, 1,
                                        enc.fields["checksum"], rho)
        return self.rotator.unrotate(self.fine.decode_sum(kout, enc.fields["delta"], key), ctx.key)

    def reconstruction(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """Every receiver decodes a nested payload to DQSG(s₁)'s reconstruction Δ(k − u) of its
        source, exactly (failed buckets are recovered), so that is what this sender's payload is."""
        if "cosets" not in enc.fields:
            return self.rotator.unrotate(self.fine.decode(enc, ctx), ctx.key)
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload has a reconstruction")
        key, delta = self.fine.keyed(ctx.key, ctx.ranks), enc.fields["delta"]
        return self.rotator.unrotate(self.fine.decode_sum(self.fine.quantize(enc.source, delta, key), delta, key),
                                     ctx.key)

    def recovery_payload(self, enc: Encoded, ctx: TensorContext, requests: list) -> torch.Tensor:
        """This sender's reply to its recovery ``requests`` (:meth:`RecoveryProtocol.reply`)."""
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload can be recovered")
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(enc.source))
        return self.recovery.reply(fine.quantize(enc.source, delta, fine.keyed(ctx.key, ctx.ranks), symbols=True),
                                   requests)

    def residues(self, enc: Encoded, rho: int) -> torch.Tensor:
        """A nested payload's cosets (k + ⌊ρ/2⌋) mod ρ, one uint8 per coordinate."""
        return ops.unpack_cosets(enc.fields["cosets"], rho, enc.n)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """All senders' mean, decoded in rank order (:class:`~hvdquant.codecs.nested_aggregate.RankOrderDecoder`;
        with a rotation, in rotated coordinates, then rotated back once): a group of one."""
        return self.aggregate_group([payloads], [ctx], [recover])[0]

    def aggregate_group(self, payloads: Sequence[list[Encoded]], ctxs: Sequence[TensorContext],
                        recovers: Sequence[Recover | None]) -> list[tuple[torch.Tensor, DecodeStats]]:
        """Every tensor's mean, decoded in rank order by one decoder for the group, in a number of
        launches per pass that does not grow with the group (recovery rounds: one collective per
        failing tensor); rotated back in one launch."""
        if not shared_keys(ctxs):
            return super().aggregate_group(payloads, ctxs, recovers)
        mean, stats = RankOrderDecoder(self, payloads, ctxs).run(recovers)
        means = self._rotating.unrotate_group(mean, ctxs, [p[0].n for p in payloads])
        return [(m.reshape(-1), st) for m, st in zip(means, stats)]


def _required(policy: NestingPolicy | None) -> NestingPolicy:
    if policy is None:
        raise ValueError("adaptive NDQSG needs the NestingPolicy holding its decisions (the exchange's "
                         "CodecState.nesting)")
    return policy


def _validate(codec: NDQSG) -> None:
    """NDQSG's parameters: s₁ ∈ [2, 127], s₂ ∈ [1, 126], ρ = s₁/s₂ an integer ≥ 2, d ≥ 1,
    r ∈ [0, 1]; TypeError or ValueError naming the parameter otherwise."""
    if not (isinstance(codec.levels, tuple) and len(codec.levels) == 2):
        raise TypeError(f"NDQSG levels must be a tuple (s1, s2), got {codec.levels!r}")
    s1, s2 = codec.levels
    check_int("NDQSG", "levels[0] (s1)", s1, 2, 127)
    check_int("NDQSG", "levels[1] (s2)", s2, 1, 126)
    if s1 % s2 or s1 // s2 < 2:
        raise ValueError(f"NDQSG levels {codec.levels}: s1 must be a multiple of s2 with s1/s2 >= 2 "
                         "(the nesting ratio)")
    check_int("NDQSG", "bucket_size", codec.bucket_size, 1, 1 << 30)
    if not isinstance(codec.adaptive, bool):
        raise TypeError(f"NDQSG adaptive must be a bool, got {type(codec.adaptive).__name__}")
    if codec.rotation not in ROTATIONS:
        raise ValueError(f"NDQSG rotation must be one of {ROTATIONS}, got {codec.rotation!r}")
    if codec.locate is not None and not isinstance(codec.locate, bool):
        raise TypeError(f"NDQSG locate must be a bool or None, got {type(codec.locate).__name__}")
    if isinstance(codec.dqsg_fraction, bool) or not isinstance(codec.dqsg_fraction, (int, float)) \
            or not 0.0 <= codec.dqsg_fraction <= 1.0:
        raise ValueError(f"NDQSG dqsg_fraction={codec.dqsg_fraction!r} must be a number in [0, 1]")
