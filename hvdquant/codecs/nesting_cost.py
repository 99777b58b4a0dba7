"""Adaptive nesting's prices on the payload path (docs/ALGORITHMS.md §2, "Adaptive nesting").

After a step of tensor ``name`` every receiver holds, per nested-role sender p (ranks ⌈rP⌉ … P−1),
what decoding p met: its exact DQSG(s₁) indices k_p (n coordinates in buckets of d), its steps Δ_p,
its dither key and the side information y_p its payload was decoded against. Each candidate ratio
ρ is priced on those senders,

    B(ρ) = Σ_p B_p(ρ),   B_p(ρ) = 8·⌈n/d⌉ + C(n, ρ) + 2·W_p(ρ) + S(R_p(ρ))

(8 bytes per bucket: Δ_b and the checksum; C(n, ρ): the packed cosets, :func:`sizes.coset_bytes`;
W_p: syndrome words of 2 bytes; S(R): the DQSG(s₁) symbol bytes of the R coordinates resent
whole), against B_DQSG, the DQSG(s₁) bytes of the same senders. For the ratio in use while
nesting is on, B_p is what p really handed over (its payload and its recovery replies); for every
other ρ it is a probe: k_p's residues mod ρ resolved against y_p
(:meth:`CosetResolver.probe_resolve`). The probe holds the true indices, so it counts the wrong
coordinates w of each failed bucket; a locating stage of 2t syndromes corrects exactly the buckets
with w ≤ t, so a bucket is priced at the syndromes it would be sent and, past the last stage,
resent whole. :meth:`NestingPolicy.choose` then keeps the cheapest ρ and applies the rule. Every
rank decodes every payload alike, so every rank prices and decides alike, without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvdquant.codecs.base import Codec, layout_bytes
from hvdquant.codecs.coset_resolver import bucket_coordinates
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import DitherKey, sizes

#: what decoding met per nested-role sender, for pricing: its exact indices k_p, Δ_p, its key, and
#: the side information y_p its payload met
Met = tuple[torch.Tensor, torch.Tensor, DitherKey, torch.Tensor]


@dataclass(frozen=True)
class NestingCost:
    """The prices B_p(ρ) and the decision of adaptive nesting for the frozen ``codec`` (an NDQSG)."""

    codec: Codec

    def nested_bytes(self, n: int, recovered: int, syndromes: int = 0, rho: int | None = None) -> int:
        """B_p: bytes a nested sender hands over for n coordinates with ratio ``rho`` (default
        s₁/s₂), ``recovered`` of them resent as DQSG(s₁), ``syndromes`` syndrome words (2 bytes
        each) sent to locate wrong coordinates."""
        codec = self.codec
        nb = sizes.num_buckets(n, codec.bucket_size)
        return 8 * nb + sizes.coset_bytes(n, rho or codec.nesting_ratio) + 2 * syndromes + (
            sizes.symbol_bytes(recovered, codec.fine.symbols) if recovered else 0)

    def probe_bytes(self, k: torch.Tensor, delta: torch.Tensor, side: torch.Tensor, key: DitherKey,
                    rho: int) -> int:
        """B_probe(ρ): bytes one sender's exact indices ``k`` cost sent nested with ratio ``rho``
        against side information ``side``: each failed bucket's wrong coordinates w decide the
        locating stages it gets (those before the first 2t with w ≤ t) and whether it is then
        resent whole (Reed–Solomon decoding, :mod:`~hvdquant.codecs.syndromes`)."""
        codec = self.codec
        kout, bad = codec.resolver.probe_resolve(k, delta, side, key, 1, rho)
        n, d = k.numel(), codec.bucket_size
        stages = codec.locate_stages()
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

    def decide(self, name: str, policy: NestingPolicy, ranks: int, n: int, met: dict[int, Met],
               replied: list[int]) -> None:
        """Nesting and ratio of tensor ``name`` at its next step: B(ρ) for every candidate ratio
        from this step's nested-role senders ``met`` (``replied[p]``: the recovery bytes sender p
        handed over) against B_DQSG (:meth:`NestingPolicy.choose`)."""
        codec = self.codec
        senders = ranks - codec.dqsg_senders(ranks)
        if not senders:
            return
        current = codec.ratio(name, policy)
        plain = senders * layout_bytes(codec.fine.layout(n))
        cost = {}
        for rho in codec.candidate_ratios():
            if rho == current and policy.is_on(name):
                cost[rho] = sum(self.nested_bytes(n, 0, 0, rho) + replied[p] for p in met)
                continue
            cost[rho] = sum(self.probe_bytes(k, delta, side, key, rho) for k, delta, key, side in met.values())
        policy.choose(name, cost, plain, buckets=senders * sizes.num_buckets(n, codec.bucket_size))
