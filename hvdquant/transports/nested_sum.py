"""NDQSG over a summable allreduce: nested coset indices and checksums summed, resolved with side
information, failed buckets recovered, adaptive nesting's probes (docs/ALGORITHMS.md §3); the
scheme :func:`~hvdquant.transports.sum_schemes.scheme_for` picks for an NDQSG codec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hvdquant.codecs.base import counts_entropy
from hvdquant.codecs.coset_resolver import covered
from hvdquant.codecs.ndqsg import NDQSG
from hvdquant.codecs.nesting import NestingPolicy
from hvdquant.kernels import ops
from hvdquant.kernels.segments import Segments, by_segment
from hvdquant.transports.collectives import Started
from hvdquant.transports.sum_batch import Batch, SumHost
from hvdquant.transports.summable import SumFieldLayout, SumMessage


class NestedSum:
    """Allreduce-friendly nested DQSG (docs/ALGORITHMS.md §3).

    With a common Δ_b (s₁ levels), every rank sends its coset symbols (k + ⌊ρ/2⌋) mod ρ as summable
    digits of base P(ρ−1) + 1, plus its per-bucket checksums Σ_j w_j·k_j mod 2^32 (w_j: odd
    hashed weights of the position j; linear, so they sum too). One message per group: every
    tensor's fields end to end (a nested tensor's cosets, another's DQSG(s₁) symbols k + s₁ in
    digits of base 2s₁P + 1), then the nested tensors' checksums; each phase (quantizing, checksums,
    packing, unpacking, resolving, probing at each candidate ratio, decoding) is one kernel launch
    for the whole group. The receiver resolves Σ_p k_p from the field sums (taken mod ρ by the
    resolver) with side information P·ḡ_prev, the previous step's decoded mean of the same tensor,
    which is bit-identical on every rank (:meth:`CosetResolver.resolve`, here for every tensor of
    the group in one launch). Buckets
    whose resolved index sums miss the summed checksum are detected on every rank alike and
    **recovered** by one more allreduce of their DQSG(s₁) index sums (all failed buckets of the
    batch together); counts are in the exchange's ``decode_stats``. A tensor's first step (no side
    information yet) is sent as plain DQSG(s₁).

    Decoding succeeds where |Σ_p g_p − P·ḡ_prev| < (ρ − P)Δ/2 (sufficient): the scheme pays off only
    when ρ is well above P and gradients change slowly; otherwise recovery traffic dominates.

    ``adaptive=True`` (``NDQSG``'s switch): a tensor is nested only while it pays, with the cheapest
    nesting ratio. While off, it is sent as DQSG(s₁); after every step its exact index sums are
    *probed* for every candidate ratio (:meth:`NDQSG.candidate_ratios`): their residues mod ρ
    resolved against the same side information, the failed buckets counted (the ratio in use,
    while on: the step's own failures). The next step nests, at the cheapest ratio, iff cosets,
    checksums and recovery would take at most ``NestingPolicy.ADAPTIVE_MARGIN`` × the DQSG(s₁)
    fields' words (:meth:`NestingPolicy.choose`). Every rank sees the same sums, so every rank
    decides alike; the decisions are this scheme's ``policy``, checkpointed with it.
    """

    def __init__(self, levels: tuple[int, int] = (3, 1), bucket_size: int = 512, adaptive: bool = True) -> None:
        self.nested = NDQSG(levels, bucket_size, adaptive=adaptive)
        self.fine = self.nested.fine
        self.policy = NestingPolicy()  # adaptive nesting's decisions, per name
        self._side: dict[str, torch.Tensor] = {}  # per name: P × the last decoded mean

    def config(self) -> dict[str, Any]:
        return {"scheme": "ndqsg-sum", "levels": self.nested.levels, "bucket_size": self.nested.bucket_size,
                "adaptive": self.nested.adaptive}

    def state_dict(self) -> dict[str, Any]:
        """The side information (per name, P × the last decoded mean, copies) and the nesting decisions."""
        return {"side": {name: side.clone() for name, side in self._side.items()},
                "nesting": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy = NestingPolicy()
        policy.load_state_dict(state.get("nesting", {}))  # refuses a malformed one before anything changes
        self._side = {str(name): side.clone() for name, side in state["side"].items()}
        self.policy = policy

    def _words(self, n: int, nb: int, failed: list[int], ranks: int, rho: int) -> int:
        """Summable words of one tensor nested with ratio ``rho``: cosets + checksums + the
        recovered buckets' DQSG(s₁) index sums."""
        recovered = covered(failed, self.nested.bucket_size, n)
        words = SumFieldLayout(0, rho - 1, ranks).field_words(n) + nb
        return words + SumFieldLayout.for_levels(self.nested.levels[0], ranks).field_words(recovered)

    def _sides(self, batch: Batch, device: torch.device) -> list[torch.Tensor | None]:
        """Each tensor's side information P·ḡ_prev (moved to ``device`` where a checkpoint left it
        elsewhere), or None where there is none of its length (its first step)."""
        sides: list[torch.Tensor | None] = []
        for q, n in zip(batch.rounds, batch.segments.lengths):
            side = self._side.get(q.item.name)
            if side is not None and side.device != device:
                side = self._side[q.item.name] = side.to(device)
            sides.append(side if side is not None and side.numel() == n else None)
        return sides

    def send(self, ex: SumHost, batch: Batch, tag: str) -> Callable[[], dict[str, torch.Tensor]]:
        """Quantize every tensor of the batch (one launch), send the nested ones' cosets and checksums
        and the others' DQSG(s₁) symbols in summable fields (one launch packs them all) through one SUM
        allreduce; the returned function waits for it and decodes (:meth:`_decode`)."""
        nested, segs = self.nested, batch.segments
        ranks, s1, device = ex.coll.size, nested.levels[0], batch.source.device
        sides = self._sides(batch, device)
        ratios = tuple(nested.ratio(q.item.name, self.policy)
                       if side is not None and nested.nests(q.item.name, self.policy) else 0
                       for q, side in zip(batch.rounds, sides))
        chosen = tuple(bool(r) for r in ratios)
        symbols = ops.dqsg_encode_segments(batch.source, batch.delta, segs, s1)  # k + s₁
        k = symbols.to(torch.int32).sub_(s1)
        codes = symbols
        if any(chosen):  # the nested tensors' cosets (k + ⌊ρ/2⌋) mod ρ in their parts
            codes = ops.nested_encode_segments(batch.source, batch.delta, segs, s1, ratios, symbols.clone())
        checksums = ops.bucket_checksum_segments(k, segs, chosen)
        fields = tuple(SumFieldLayout(0, r - 1 if r else 2 * s1, ranks) for r in ratios)
        radices = tuple((f.radix, f.per_word) for f in fields)
        message = SumMessage(ranks, tuple(zip(fields, segs.lengths)) + (((None, checksums.numel()),) if any(chosen)
                                                                        else ()))
        field_words = sum(f.field_words(n) for f, n in zip(fields, segs.lengths))

        def write(words: torch.Tensor) -> None:
            ops.pack_sum_fields_segments(codes, segs, radices, out=words[:field_words])
            words[field_words:].copy_(checksums)

        counts = ops.segment_histograms(codes, segs, 2 * s1 + 1).tolist()
        for n, nb, c, r in zip(segs.lengths, segs.buckets, counts, ratios):
            ex.entropy_bits += n * counts_entropy(c[:r or 2 * s1 + 1]) + (64.0 if r else 32.0) * nb
        started = ex.start_sum(message, write, device, segs.elements, f"hvdquant.sum.{tag}")
        return lambda: self._decode(ex, batch, _Sent(message, radices, field_words, ratios, k, sides), started, tag)

    def _decode(self, path: SumHost, batch: Batch, sent: _Sent, started: Started[torch.Tensor],
                tag: str) -> dict[str, torch.Tensor]:
        """Σ_p ĝ_p of every tensor of ``batch`` from the reduced words: the index sums of the
        DQSG(s₁) tensors split off, the nested ones' cosets resolved with the side information (one
        launch for all, one more for their checksums), failed buckets recovered in one more SUM
        round, adaptive nesting's probes (two launches per candidate ratio), and one decoding launch."""
        nested, segs = self.nested, batch.segments
        ranks, s1, device = path.coll.size, nested.levels[0], batch.source.device
        first = batch.summed
        reduced = started.wait()
        parts, factor = sent.message.split(reduced)
        sums = ops.unpack_sum_fields_segments(reduced[:sent.field_words], segs, sent.radices, factor)
        side = None
        if any(sent.ratios) or (nested.adaptive and any(s is not None for s in sent.sides)):
            side = _end_to_end(sent.sides, segs, device)
        failed: list[list[int]] = [[] for _ in segs.lengths]
        ksum = sums - ranks * s1  # Σ_p k_p of the DQSG(s₁) tensors (Σ_p (k_p + s₁) in their fields)
        if any(sent.ratios):  # the nested ones': Σ_p cosets ≡ Σ_p k_p + P⌊ρ/2⌋ (mod ρ), resolved
            chosen = tuple(bool(r) for r in sent.ratios)
            ops.nested_decode_segments(sums, batch.delta, first, sent.ratios, side, ranks, kout=ksum)
            checks = torch.round(parts[-1]).to(torch.int64) & 0xFFFFFFFF
            wrong = torch.nonzero(ops.bucket_checksum_segments(ksum, first, chosen) != checks).flatten().tolist()
            failed = by_segment(wrong, [nb if r else 0 for nb, r in zip(segs.buckets, sent.ratios)])
        if any(failed):  # the same buckets on every rank: one allreduce of their DQSG(s1) index sums
            self._recover(path, ksum, sent.indices, segs, failed, tag)
        if nested.adaptive:
            self._decide(batch, first, ksum, side, sent, failed, ranks)
        total = ops.dqsg_decode_segments(ksum, batch.delta, first, 0, senders=ranks)
        sums_by_name = dict(zip((q.item.name for q in batch.rounds), total.split(list(segs.lengths))))
        self._side.update(sums_by_name)  # side information for the next step: P × the decoded mean
        return sums_by_name

    def _recover(self, path: SumHost, ksum: torch.Tensor, indices: torch.Tensor, segments: Segments,
                 failed: list[list[int]], tag: str) -> None:
        """Patch the true DQSG(s₁) index sums of the ``failed`` buckets (per tensor) into the resolved
        sums ``ksum`` of all tensors end to end, from one SUM allreduce of this rank's ``indices`` there
        (one field segment for all tensors: one launch packs it, one unpacks it)."""
        d, ranks = self.nested.bucket_size, path.coll.size
        starts = segments.offsets(list(segments.lengths))
        coords = [np.arange(start + b * d, start + min((b + 1) * d, n), dtype=np.int64)
                  for start, n, bad in zip(starts, segments.lengths, failed) for b in bad]
        idx = torch.from_numpy(np.concatenate(coords)).to(ksum.device)
        fine = SumFieldLayout.for_levels(self.nested.levels[0], ranks)
        stats = path.decode_stats
        stats.recovery_rounds += 1
        before = path.stats.bytes_handed
        (truth,) = path.sum_fields(SumMessage(ranks, ((fine, idx.numel()),)), [indices[idx].to(torch.int8)],
                                   ksum.device, 0, f"hvdquant.sum.{tag}.recovery")
        stats.recovery_bytes += path.stats.bytes_handed - before
        stats.failed_buckets += len(coords)
        stats.failed_coordinates += int((ksum[idx] != truth).sum())
        ksum[idx] = truth

    def _decide(self, batch: Batch, first: Segments, ksum: torch.Tensor, side: torch.Tensor | None, sent: _Sent,
                failed: list[list[int]], ranks: int) -> None:
        """Nesting and ratio of every tensor with side information at its next step, from the exact
        index sums ``ksum``: each candidate ratio priced in words (:meth:`_words`) against DQSG(s₁)'s
        fields — the buckets that failed for the ratio in use where the tensor nested, and for the
        others the buckets a probe finds: the residues of ``ksum`` resolved against the same side
        information, all tensors in one launch per candidate ratio."""
        nested, segs = self.nested, batch.segments
        probed = tuple(s is not None for s in sent.sides)
        if not any(probed):
            return
        truth = ops.bucket_checksum_segments(ksum, first)
        candidates = nested.candidate_ratios()
        wrong = [nested.resolver.probe_group(ksum, batch.delta, side, first, ranks, rho,
                                             [p and rho != r for p, r in zip(probed, sent.ratios)], truth)[1]
                 for rho in candidates]
        flat = torch.nonzero(torch.stack(wrong)).tolist()  # one host copy for every ratio
        fails = {rho: by_segment([b for c, b in flat if c == i], segs.buckets) for i, rho in enumerate(candidates)}
        for i, (q, n, nb) in enumerate(zip(batch.rounds, segs.lengths, segs.buckets)):
            if not probed[i]:
                continue
            cost = {rho: self._words(n, nb, failed[i] if rho == sent.ratios[i] else fails[rho][i], ranks, rho)
                    for rho in candidates}
            plain = SumFieldLayout.for_levels(nested.levels[0], ranks).field_words(n)
            self.policy.choose(q.item.name, cost, plain, buckets=nb)


@dataclass(frozen=True)
class _Sent:
    """What :meth:`NestedSum.send` sent, for decoding: the message, each tensor's field (R, F), the
    words of the fields, each tensor's nesting ratio (0: sent as DQSG(s₁)), this rank's DQSG(s₁)
    indices (int32, for recovery) and each tensor's side information (None: none)."""

    message: SumMessage
    radices: tuple[tuple[int, int], ...]
    field_words: int
    ratios: tuple[int, ...]
    indices: torch.Tensor
    sides: list[torch.Tensor | None]


def _end_to_end(sides: list[torch.Tensor | None], segments: Segments, device: torch.device) -> torch.Tensor:
    """The side information of every segment end to end (zeros where there is none): the previous
    step's decoded sums themselves when they lie end to end in one buffer (the same group as then),
    else a copy."""
    first = sides[0]
    if first is not None and all(s is not None and s.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                                 and s.storage_offset() == first.storage_offset() + start
                                 for s, start in zip(sides, segments.offsets(list(segments.lengths)))):
        return first.as_strided((segments.elements,), (1,))
    return torch.cat([s if s is not None else torch.zeros(n, device=device) for s, n in zip(sides, segments.lengths)])
