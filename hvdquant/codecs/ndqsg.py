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
from hvdquant.codecs.syndromes import (
    LOCATE_PRIME,
    bucket_blocks,
    bucket_checks,
    bucket_syndromes,
    locate_errors,
    syndrome_bytes,
    syndrome_words,
)
from hvdquant.kernels import DitherKey, ops, sizes
from hvdquant.stats import DecodeStats


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
    ``ADAPTIVE_MARGIN`` × the DQSG(s₁) bytes (rule: :meth:`observe`). A tensor starts with nesting
    off. The decisions are identical on every rank without a collective, live in
    :meth:`state_dict`, and cost one nested decode per nested sender and candidate ratio. The
    stock path (:class:`~hvdquant.transports.summed.NestedSum`) and the coset ring
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
    #: adaptive nesting: per tensor name, whether its nested senders send cosets at the next step
    nesting: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: per name while off: consecutive steps that would have paid; times nesting was switched off again
    streak: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    reversals: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: per name while off: nested buckets the current run of paying steps was measured on
    evidence: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: adaptive nesting: per tensor name, the nesting ratio its nested senders use (default: s₁/s₂)
    ratios: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    scheme = "ndqsg"
    #: adaptive nesting stays on (or turns on) only where it is expected to send at most this
    #: fraction of the nested senders' DQSG(s₁) bytes
    ADAPTIVE_MARGIN = 0.95
    #: paying steps in a row before nesting that is off switches on (doubled at each switch-off): one
    #: lucky step of a tensor near break-even otherwise switches on and the next step can cost up to
    #: twice its bytes
    CONFIRM_STEPS = 2
    #: nested buckets a run of paying steps must have been measured on before nesting switches on:
    #: a tensor of one or two buckets (a small first layer) otherwise switches on whenever a probe of
    #: those few buckets pays by chance, and a wrong switch-on costs up to twice a step's bytes
    MIN_EVIDENCE_BUCKETS = 16
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

    @property
    def nesting_ratio(self) -> int:
        return self.levels[0] // self.levels[1]

    @property
    def fine(self) -> DQSG:
        """DQSG(s₁): what the DQSG ranks send and what a successful nested decode reproduces."""
        return DQSG(self.levels[0], self.bucket_size, self.dither)

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

    def config(self) -> dict:
        return {"scheme": self.scheme, **{k: v for k, v in asdict(self).items()
                                          if k not in ("nesting", "streak", "reversals", "evidence", "ratios")}}

    def ratio(self, name: str | None) -> int:
        """The nesting ratio ρ of tensor ``name``: chosen per tensor under adaptive nesting
        (:meth:`candidate_ratios`), s₁/s₂ otherwise."""
        return self.ratios.get(name, self.nesting_ratio) if self.adaptive else self.nesting_ratio

    def candidate_ratios(self) -> tuple[int, ...]:
        """The ratios adaptive nesting chooses from: s₁/s₂ and the powers of 2 below 2s₁ + 1 (a
        coset index of 2s₁ + 1 or more values would be the DQSG(s₁) symbol itself). Smaller ρ sends
        fewer bits per coordinate, larger ρ fails less often."""
        rhos = {self.nesting_ratio} | {1 << b for b in range(1, 8) if (1 << b) <= 2 * self.levels[0]}
        return tuple(sorted(rhos))

    def is_nested(self, sender: int, ranks: int, name: str | None = None) -> bool:
        """Whether ``sender`` sends coset symbols (of tensor ``name``, under adaptive nesting)."""
        return sender >= self.dqsg_senders(ranks) and (not self.adaptive or self.nesting.get(name, False))

    def observe(self, name: str, pays: bool, buckets: int | None = None) -> None:
        """Adaptive nesting's rule, after a step of tensor ``name`` whose nesting would have paid
        (or paid) iff ``pays``, measured on ``buckets`` nested buckets (default: enough on its own):
        nesting that did not pay is switched off at once; nesting that is off is switched on after
        ``CONFIRM_STEPS``·2^r consecutive steps that would have paid, r being the number of times
        it was switched off before (a tensor whose outcome keeps changing stops oscillating), and
        once those steps were measured on at least ``MIN_EVIDENCE_BUCKETS`` buckets together. The
        same rule serves the payload path, the stock nested sum and the coset ring."""
        if self.nesting.get(name, False):
            if not pays:
                self.nesting[name] = False
                self.reversals[name] = self.reversals.get(name, 0) + 1
                self.streak[name] = self.evidence[name] = 0
            return
        seen = self.MIN_EVIDENCE_BUCKETS if buckets is None else buckets
        self.streak[name] = self.streak.get(name, 0) + 1 if pays else 0
        self.evidence[name] = self.evidence.get(name, 0) + seen if pays else 0
        if (self.streak[name] >= self.CONFIRM_STEPS * 2 ** self.reversals.get(name, 0)
                and self.evidence[name] >= self.MIN_EVIDENCE_BUCKETS):
            self.nesting[name] = True
            self.streak[name] = self.evidence[name] = 0

    def state_dict(self) -> dict[str, dict]:
        """The adaptive nesting state (a checkpoint resumes with it)."""
        return {"nesting": dict(self.nesting), "streak": dict(self.streak), "reversals": dict(self.reversals),
                "evidence": dict(self.evidence), "ratios": dict(self.ratios)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for mine, kind, key in ((self.nesting, bool, "nesting"), (self.streak, int, "streak"),
                                (self.reversals, int, "reversals"), (self.evidence, int, "evidence"),
                                (self.ratios, int, "ratios")):
            mine.clear()
            mine.update({str(k): kind(v) for k, v in state.get(key, {}).items()})

    def layout(self, n: int, ctx: TensorContext) -> Layout:
        if not self.is_nested(ctx.key.sender, ctx.ranks, ctx.name):
            return self.fine.layout(n)
        nb = sizes.num_buckets(n, self.bucket_size)
        return [("delta", torch.float32, nb), ("checksum", torch.int32, nb),
                ("cosets", torch.uint8, sizes.coset_bytes(n, self.ratio(ctx.name)))]

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
        rho = self.ratio(ctx.name)
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
        rho = self.ratio(ctx.name)
        kout, _ = self.resolve(self._residues(enc, rho), enc.fields["delta"], side, key, 1, enc.fields["checksum"],
                               rho)
        return self.fine.decode_sum(kout, enc.fields["delta"], key)

    # ------------------------------------------------------------- the coset-sum resolver
    def resolve(self, residues: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                senders: int, checksums: torch.Tensor, rho: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Resolve an index sum from its residues mod ρ (§2, §3; ``rho``: default s₁/s₂).

        ``residues``: (Σ_p k_p + senders·⌊ρ/2⌋) mod ρ for the ``senders`` senders key.sender, … ;
        ``side``: an estimate of Σ_p g_p, bit-identical on every rank. Each coordinate takes the
        member of its coset nearest side/Δ + Σ_p u_p. Returns the resolved sums K̂ (int32) and the
        buckets whose checksum Σ_j w_j·K̂_j mod 2^32 differs from ``checksums`` (the senders'
        checksums summed mod 2^32): exactly the buckets where some coordinate resolved wrongly,
        up to checksum collisions."""
        kout = torch.empty(residues.numel(), dtype=torch.int32, device=residues.device)
        ops.nested_decode(residues, delta, self.bucket_size, rho or self.nesting_ratio, side.contiguous(), key,
                          senders=senders, kout=kout)
        sent = checksums.to(torch.int64) & 0xFFFFFFFF
        bad = torch.nonzero(ops.bucket_checksum(kout, self.bucket_size) != sent).flatten().tolist()
        return kout, bad

    def probe(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
              senders: int, rho: int | None = None) -> list[int]:
        """The buckets that would fail if the exact index sums ``ksum`` (int32) of ``senders`` senders
        had been sent as their residues mod ρ (``rho``, default s₁/s₂) and resolved against ``side``
        (adaptive nesting's probe: what nesting would have cost, from data the receiver already holds)."""
        return self._probe_resolve(ksum, delta, side, key, senders, rho)[1]

    def _probe_resolve(self, ksum: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                       senders: int, rho: int | None = None) -> tuple[torch.Tensor, list[int]]:
        rho = rho or self.nesting_ratio
        residues = ((ksum + senders * (rho // 2)) % rho).to(torch.uint8)
        return self.resolve(residues, delta, side, key, senders, ops.bucket_checksum(ksum, self.bucket_size), rho)

    def patch(self, kout: torch.Tensor, buckets: list[int], truth: torch.Tensor, stats: DecodeStats) -> None:
        """Write the recovered true index sums ``truth`` of failed ``buckets`` (their coordinates in
        the order given) into ``kout``, counting the buckets and the coordinates that had been wrong."""
        idx = bucket_coordinates(buckets, self.bucket_size, kout.numel(), kout.device)
        if truth.numel() != idx.numel():
            raise ValueError(f"recovery gave {truth.numel()} values; {len(buckets)} failed bucket(s) hold "
                             f"{idx.numel()} coordinates")
        truth = truth.to(device=kout.device, dtype=torch.int32)
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
        n, device = residues.numel(), residues.device
        if side is None:
            kout = torch.empty(n, dtype=torch.int32, device=device)
            bad = list(range(sizes.num_buckets(n, self.bucket_size)))
        else:
            kout, bad = self.resolve(residues, delta, side, key, senders, checksums)
        if bad:
            stats.recovery_rounds += 1
            truth = recover(bucket_coordinates(bad, self.bucket_size, n, device))
            self.patch(kout, bad, truth, DecodeStats() if side is None else stats)
        return kout

    # ------------------------------------------------------------- locating wrong coordinates
    def correct(self, kout: torch.Tensor, buckets: list[int], syndromes: dict[int, torch.Tensor],
                checksums: torch.Tensor, senders: int = 1, rho: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Failed ``buckets`` of the resolved indices ``kout`` that their ``syndromes`` (per bucket:
        the first 2t power sums mod LOCATE_PRIME of the true indices) explain by at most t wrong
        coordinates. Returns those buckets and their corrected indices (coordinates in the order of
        :func:`bucket_coordinates`). A correction is accepted only if the corrected bucket reproduces
        all its syndromes and its checksum, each change is a nonzero multiple of ρ and every index
        lies in [−s₁·senders, s₁·senders]; any other bucket stays failed."""
        fixed: list[int] = []
        truths: list[torch.Tensor] = []
        by_len: dict[int, list[int]] = {}
        for b in buckets:
            if b in syndromes:
                by_len.setdefault(syndromes[b].numel(), []).append(b)
        d, n = self.bucket_size, kout.numel()
        sent = checksums.to(torch.int64) & 0xFFFFFFFF
        for _, group in sorted(by_len.items()):
            blocks, mask = bucket_blocks(kout, group, d)
            s = torch.stack([syndromes[b] for b in group]).to(blocks.device)
            corrected, ok = locate_errors(blocks, mask, s, rho or self.nesting_ratio, self.levels[0] * senders)
            rows = torch.tensor(group, dtype=torch.int64, device=blocks.device)
            ok &= bucket_checks(corrected) == sent[rows.to(sent.device)].to(blocks.device)
            keep = torch.nonzero(ok).flatten()
            if keep.numel():
                fixed += rows[keep].tolist()
                truths.append(corrected[keep][mask[keep]])
        truth = torch.cat(truths) if truths else torch.empty(0, dtype=torch.int64, device=kout.device)
        assert truth.numel() == bucket_coordinates(fixed, d, n).numel()
        return fixed, truth.to(torch.int32)

    def _requests(self, bad: list[int], have: dict[int, torch.Tensor], nb: int) -> list[int]:
        """What to ask a sender for its still-failed buckets ``bad``: the next stage of syndromes of
        each (request −1 − (stage·nb + b)), or the bucket whole (request b) when the stages are spent;
        syndrome requests first, by stage, then whole buckets."""
        stages = self.locate_stages()
        syn: list[tuple[int, int]] = []
        whole: list[int] = []
        for b in bad:
            got = have[b].numel() if b in have else 0
            stage = sum(1 for c in stages if c <= got)
            if stage < len(stages):
                syn.append((stage, b))
            else:
                whole.append(b)
        return [-1 - (st * nb + b) for st, b in sorted(syn)] + whole

    def _split_requests(self, requests: list[int], nb: int) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """Syndrome requests as (bucket, stage, first, end) syndrome ranges, and the whole buckets."""
        stages = self.locate_stages()
        syn, whole = [], []
        for r in requests:
            if r >= 0:
                whole.append(r)
                continue
            stage, b = divmod(-1 - r, nb)
            if stage >= len(stages) or b >= nb:
                raise ValueError(f"recovery request {r} names no syndrome stage of this codec")
            syn.append((b, stage, stages[stage - 1] if stage else 0, stages[stage]))
        return syn, whole

    # ------------------------------------------------------------- payload path (paper's NDQSG)
    def recovery_payload(self, enc: Encoded, ctx: TensorContext, buckets: list[int]) -> torch.Tensor:
        """This sender's reply to a recovery request: for each syndrome request (negative, in the
        order given) its syndromes as 2-byte little-endian words, then the DQSG(s₁) symbols of the
        requested whole buckets, concatenated in the order given and packed as one stream."""
        if enc.source is None:
            raise ValueError("this payload kept no source: only a nested sender's own payload can be recovered")
        flat = enc.source
        fine = self.fine
        delta = fine.step_size(fine.bucket_absmax(flat))
        sym = fine.quantize(flat, delta, fine.keyed(ctx.key, ctx.ranks), symbols=True)
        nb = sizes.num_buckets(flat.numel(), self.bucket_size)
        syn, whole = self._split_requests(list(buckets), nb)
        parts = []
        if syn:
            k = sym.to(torch.int64) - fine.levels
            rows: list[torch.Tensor | None] = [None] * len(syn)
            for lo, hi in sorted({(lo, hi) for _, _, lo, hi in syn}):  # one pass per stage
                sel = [i for i, r in enumerate(syn) if r[2:] == (lo, hi)]
                got = bucket_syndromes(k, [syn[i][0] for i in sel], self.bucket_size, lo, hi)
                for i, row in zip(sel, got):
                    rows[i] = row
            parts.append(syndrome_bytes(torch.cat(rows)))
        if whole or not syn:
            idx = bucket_coordinates(whole, self.bucket_size, flat.numel(), flat.device)
            parts.append(ops.pack_symbols(sym[idx].contiguous(), fine.symbols))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _residues(self, enc: Encoded, rho: int) -> torch.Tensor:
        return ops.unpack_cosets(enc.fields["cosets"], rho, enc.n)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Decode in rank order with the running mean as side information; detect failed buckets by
        checksum; correct those their syndromes explain (``locate``); recover the others through
        ``recover`` (a collective the transport runs: the next syndromes of a bucket, or the bucket
        whole), then decode again with the corrected values until no bucket fails."""
        ranks, n = len(payloads), payloads[0].n
        device = next(iter(payloads[0].fields.values())).device
        fine = self.fine
        nb = sizes.num_buckets(n, self.bucket_size)
        known: dict[int, list[tuple[list[int], torch.Tensor]]] = {}  # sender -> recovered (buckets, indices)
        syndromes: dict[int, dict[int, torch.Tensor]] = {}  # sender -> bucket -> syndromes received so far
        replied = [0] * ranks  # recovery bytes each sender handed over
        stats = DecodeStats()
        rho = self.ratio(ctx.name)
        # adaptive: per nested-role sender, its exact indices and what decoding them met (the last
        # pass, once nothing fails, holds the exact values), for pricing every candidate ratio
        met: dict[int, tuple[torch.Tensor, torch.Tensor, DitherKey, torch.Tensor]] = {}
        while True:
            total = torch.zeros(n, dtype=torch.float32, device=device)
            failed: dict[int, list[int]] = {}
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
                kout, bad = self.resolve(self._residues(enc, rho), enc.fields["delta"], side, key, 1,
                                         enc.fields["checksum"], rho)
                done: set[int] = set()
                for buckets, truth in known.get(p, ()):  # keep recovered buckets exact
                    self.patch(kout, buckets, truth, DecodeStats())
                    done.update(buckets)
                bad = [b for b in bad if b not in done]
                if bad and syndromes.get(p):
                    fixed, truth = self.correct(kout, bad, syndromes[p], enc.fields["checksum"], rho=rho)
                    if fixed:
                        self.patch(kout, fixed, truth, stats)
                        known.setdefault(p, []).append((fixed, truth))
                        bad = [b for b in bad if b not in set(fixed)]
                if bad:
                    failed[p], resolved[p] = self._requests(bad, syndromes.get(p, {}), nb), kout
                met[p] = (kout, enc.fields["delta"], key, side)
                total += fine.decode_sum(kout, enc.fields["delta"], key)
            if not failed:
                if self.adaptive:
                    self._decide(ctx, ranks, n, met, replied)
                return total / ranks, stats
            if recover is None:
                raise RuntimeError(f"NDQSG decoding failed in {sum(map(len, failed.values()))} bucket(s) of "
                                   f"'{ctx.name}' and no recovery round is available")
            stats.recovery_rounds += 1
            replies = recover(failed)
            for p, requests in failed.items():
                replied[p] += replies[p].numel()
                got, buckets, truth = self._parse_reply(replies[p], n, requests)
                mine = syndromes.setdefault(p, {})
                for b, s in got:
                    mine[b] = s if b not in mine else torch.cat([mine[b], s])
                if buckets:
                    self.patch(resolved[p], buckets, truth, stats)
                    known.setdefault(p, []).append((buckets, truth))

    # ------------------------------------------------------------- adaptive nesting
    def nested_bytes(self, n: int, recovered: int, syndromes: int = 0, rho: int | None = None) -> int:
        """Bytes a nested sender hands over for n coordinates with ratio ``rho`` (default s₁/s₂),
        ``recovered`` of them resent as DQSG(s₁), ``syndromes`` syndrome words (2 bytes each) sent to
        locate wrong coordinates."""
        nb = sizes.num_buckets(n, self.bucket_size)
        return 8 * nb + sizes.coset_bytes(n, rho or self.nesting_ratio) + 2 * syndromes + (
            sizes.symbol_bytes(recovered, self.fine.symbols) if recovered else 0)

    def _probe(self, k: torch.Tensor, kout: torch.Tensor, bad: list[int], rho: int) -> int:
        """Bytes one sender's exact indices ``k`` cost sent nested with ratio ``rho``, given how its
        residues resolved against the side information its payload met (``kout``, failed buckets
        ``bad``: :meth:`_probe_resolve`). The probe holds the true indices, so it counts the wrong
        coordinates w of each failed bucket; a locating stage of 2t syndromes corrects exactly the
        buckets with w ≤ t (Reed–Solomon decoding, :mod:`~hvdquant.codecs.syndromes`), so each
        bucket is priced at the syndromes it would be sent and, past the last stage, resent whole."""
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

    def _decide(self, ctx: TensorContext, ranks: int, n: int,
                met: dict[int, tuple[torch.Tensor, torch.Tensor, DitherKey, torch.Tensor]], replied: list[int]) -> None:
        """Nesting and ratio of ``ctx.name`` at its next step (:meth:`observe`). Every candidate ratio
        (:meth:`candidate_ratios`) is priced on this step's nested-role senders: their exact indices
        resolved against the side information their payloads met (the ratio in use, while nesting
        is on: the bytes really handed over, recovery replies included). The cheapest ratio is kept
        for the next step, and nesting is on iff it cost at most ADAPTIVE_MARGIN × those senders'
        DQSG(s₁) bytes. Every rank decodes every payload alike, so every rank decides alike,
        without a collective."""
        senders = ranks - self.dqsg_senders(ranks)
        if not senders:
            return
        name, current = ctx.name, self.ratio(ctx.name)
        plain = senders * sum(c * torch.empty(0, dtype=d).element_size() for _, d, c in self.fine.layout(n))
        cost = {}
        for rho in self.candidate_ratios():
            if rho == current and self.nesting.get(name, False):
                cost[rho] = sum(self.nested_bytes(n, 0, 0, rho) + replied[p] for p in met)
                continue
            cost[rho] = sum(self._probe(k, *self._probe_resolve(k, delta, side, key, 1, rho), rho)
                            for k, delta, key, side in met.values())
        self.choose(name, cost, plain, buckets=senders * sizes.num_buckets(n, self.bucket_size))

    def choose(self, name: str, cost: dict[int, int], plain: int, buckets: int | None = None) -> None:
        """Adaptive nesting's decision for tensor ``name`` from this step's price ``cost[ρ]`` of every
        candidate ratio against ``plain``, the DQSG(s₁) bytes of the same senders: the cheapest ρ
        (equal bytes: the larger, which fails less) is kept for the next step, and the step pays iff
        it cost at most ADAPTIVE_MARGIN × plain (:meth:`observe` with ``buckets``)."""
        best = min(cost, key=lambda r: (cost[r], -r))
        pays = cost[best] <= self.ADAPTIVE_MARGIN * plain
        if pays:
            self.ratios[name] = best
        self.observe(name, pays, buckets)

    def _parse_reply(self, buf: torch.Tensor, n: int, requests: list[int]
                     ) -> tuple[list[tuple[int, torch.Tensor]], list[int], torch.Tensor]:
        """A recovery reply as (bucket, syndromes) pairs, the whole buckets and their int32 indices."""
        fine = self.fine
        syn, whole = self._split_requests(requests, sizes.num_buckets(n, self.bucket_size))
        words = sum(hi - lo for _, _, lo, hi in syn)
        count = bucket_coordinates(whole, self.bucket_size, n).numel()
        need = 2 * words + (sizes.symbol_bytes(count, fine.symbols) if whole or not syn else 0)
        if need != buf.numel():
            raise ValueError(f"recovery payload has {buf.numel()} bytes; the request ({len(syn)} syndrome "
                             f"stage(s), {len(whole)} whole bucket(s)) needs {need}")
        values = syndrome_words(buf[:2 * words])
        got, at = [], 0
        for b, _, lo, hi in syn:
            got.append((b, values[at:at + hi - lo]))
            at += hi - lo
        truth = ops.unpack_symbols(buf[2 * words:], fine.symbols, count).to(torch.int32) - fine.levels
        return got, whole, truth

    def _recovered_codes(self, buf: torch.Tensor, n: int, buckets: list[int]) -> torch.Tensor:
        """A recovery reply of whole buckets (packed DQSG(s₁) symbols) as int32 indices."""
        return self._parse_reply(buf, n, buckets)[2]


def bucket_coordinates(buckets: list[int], bucket_size: int, n: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Coordinates of the given buckets, bucket by bucket in the order given (the last may be short)."""
    if not buckets:
        return torch.empty(0, dtype=torch.int64, device=device)
    idx = (torch.tensor(buckets, dtype=torch.int64, device=device)[:, None] * bucket_size
           + torch.arange(min(bucket_size, n), dtype=torch.int64, device=device)[None, :]).reshape(-1)
    return idx[idx < n]
