"""Horovod adapter: hvdquant codecs as Horovod compression objects.

Horovod's contract (``horovod/torch/compression.py``) is two functions, ``compress(tensor) ->
(payload, ctx)`` and ``decompress(reduced_payload, ctx) -> tensor``, with the payload reduced by a
stock allreduce in between. Use::

    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvdquant.Compression.dqsg(levels=1, bucket_size=512))

How DQSG fits that contract (ALGORITHMS.md §3): ``compress`` agrees one step Δ_b per bucket with
the other ranks (a small synchronous MAX allreduce of per-bucket max|g|), encodes with this rank's
dither stream, and packs the indices into summable float64 fields with a sentinel
(:class:`~hvdquant.transports.SumFieldLayout`). Horovod sums (or averages) the words;
``decompress`` recovers the reduction's factor from the sentinel, the exact index sums from the
fields, regenerates all P senders' dithers and returns factor · Σ_p ĝ_p: the mean under
``op=hvd.Average`` (any ``gradient_predivide_factor``) and the sum under ``op=hvd.Sum``.

Horovod passes no tensor name, step or rank to ``compress``. The dither key needs a name that is
equal on every rank, so it is read from the calling Horovod frame (``DistributedOptimizer``'s
``_allreduce_grad_async`` or ``hvd.allreduce(..., name=...)``); pass ``name=`` when calling
``compress`` directly. Call sites whose reduction would scramble the fields (Adasum, grouped
allreduce, reducescatter, Min/Max/Product, non-global process sets) are refused with an error.

The scale agreement is a blocking collective inside Horovod's gradient hook: like PyTorch DDP,
it relies on every rank firing the hooks in the same order (true for the same model and graph).
Horovod's stall check reports a violation after 60 s instead of a silent hang.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import torch

from hvdquant.adapters.agreement import agree, check_seed
from hvdquant.codecs.base import all_finite, empirical_entropy, flat32
from hvdquant.codecs.dqsg import DQSG
from hvdquant.codecs.ndqsg import NDQSG, bucket_coordinates
from hvdquant.kernels import DitherKey, ops, tensor_id
from hvdquant.stats import CommStats
from hvdquant.transports.horovod_payload import check_finite_output
from hvdquant.transports.summable import SumFieldLayout


def _hvd():
    import horovod.torch as hvd

    return hvd


def _call_site() -> str:
    """The Horovod tensor name of the current compress() call; refuses unsupported call sites."""
    hvd = _hvd()
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        fn = frame.f_code.co_name
        if module == "horovod.torch.optimizer":
            opt = frame.f_locals.get("self")
            if fn == "_allreduce_grad_async" and not hasattr(opt, "_starting_models"):
                if opt.op not in (hvd.Average, hvd.Sum):
                    raise ValueError("hvdquant compression supports op=hvd.Average or hvd.Sum only")
                if opt.process_set is not hvd.global_process_set:
                    raise NotImplementedError("hvdquant compression supports the global process set only")
                return frame.f_locals["name"]
            raise NotImplementedError(
                f"hvdquant compression cannot run inside Horovod's {fn} "
                "(Adasum and groups=/num_groups= are not supported: use the default ungrouped Average/Sum)")
        if module == "horovod.torch.mpi_ops":
            if fn != "allreduce":
                raise NotImplementedError(f"hvdquant compression is for allreduce, not hvd.{fn}")
            op = frame.f_locals.get("op")
            if op not in (None, hvd.Average, hvd.Sum):
                raise ValueError("hvdquant compression supports op=hvd.Average or hvd.Sum only")
            if frame.f_locals.get("process_set") is not hvd.global_process_set:
                raise NotImplementedError("hvdquant compression supports the global process set only")
            name = frame.f_locals.get("name")
            if name is None:
                raise ValueError("hvd.allreduce(..., compression=hvdquant...) needs name=: the dither "
                                 "key is derived from the tensor name, which must match on every rank")
            return name
        frame = frame.f_back
    raise ValueError("compress() was not called by Horovod: pass name= (equal on every rank)")


class Metered:
    """Wraps any Horovod compressor and measures the bytes it hands to the allreduce."""

    def __init__(self, compressor: Any) -> None:
        self.compressor = compressor
        self.stats = CommStats()

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        payload, ctx = self.compressor.compress(tensor)
        self.stats.record("tensor", tensor.numel(), payload)
        return payload, ctx

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.compressor.decompress(tensor, ctx)


class DQSGCompression:
    """DQSG as a Horovod compression object (stock ``hvd.DistributedOptimizer`` path).

    Parameters: ``levels`` (s), ``bucket_size`` (d) as in :class:`~hvdquant.codecs.DQSG`;
    ``seed``: the dither seed; ``None`` takes rank 0's ``torch.initial_seed()``. At the first call
    all ranks exchange their configuration and fail with an error naming the first rank whose
    levels, bucket size or seed differ from rank 0's. Dithers are keyed by (seed, step, tensor
    name, sender): the step counts the calls per tensor name, so they never depend on hook order.
    """

    def __init__(self, levels: int = 1, bucket_size: int = 512, seed: int | None = None) -> None:
        self.codec = DQSG(levels=levels, bucket_size=bucket_size)
        check_seed(seed)
        self.seed = seed
        self.stats = CommStats()
        self.entropy_bits = 0.0  # Σ n·(empirical entropy of the indices) + 32 bits per scale
        self._agreed_seed: int | None = None
        self._steps: dict[str, int] = {}

    @property
    def entropy_bits_per_coordinate(self) -> float:
        """Zeroth-order entropy of the indices sent (plus 32/d for the scales), beside the measured bits."""
        return self.entropy_bits / self.stats.coordinates if self.stats.coordinates else float("nan")

    def config(self) -> dict[str, Any]:
        return {"scheme": "dqsg", **asdict(self.codec), "seed": self.seed}

    def _agree(self) -> int:
        """Exchange configurations once; return the seed every rank uses (rank 0's)."""
        if self._agreed_seed is None:
            self._agreed_seed = agree(self.config(), self.seed, "hvdquant.config")
        return self._agreed_seed

    def _common_step(self, tensor: torch.Tensor, name: str | None) -> tuple[str, int, torch.Tensor, DitherKey]:
        """Name, step, common Δ_b (MAX-allreduced max|g| / s) and this rank's dither key."""
        hvd = _hvd()
        name = _call_site() if name is None else name
        seed = self._agree()
        step = self._steps.get(name, 0)
        self._steps[name] = step + 1
        absmax = self.codec.bucket_absmax(tensor)
        common = hvd.allreduce(absmax, op=hvd.Max, name=f"hvdquant.scale.{name}")
        self.stats.record(name, 0, absmax)
        if not all_finite(common):
            # Every rank sees the same reduced maxima, so every rank raises: no hang, no NaN spread.
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in '{name}' on at least one rank "
                                     f"at step {step}; hvdquant refuses to quantize it")
        key = DitherKey(seed, step % (1 << 32), tensor_id(name), hvd.rank())
        return name, step, self.codec.step_size(common), key

    def compress(self, tensor: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, tuple]:
        name, _, delta, key = self._common_step(tensor, name)
        return self._dqsg_payload(tensor, name, delta, key)

    def _dqsg_payload(self, tensor: torch.Tensor, name: str, delta: torch.Tensor, key: DitherKey
                      ) -> tuple[torch.Tensor, tuple]:
        layout = SumFieldLayout.for_levels(self.codec.levels, _hvd().size())
        codes = self.codec.quantize(tensor, delta, key)
        words = layout.pack(codes)
        self.stats.record(name, tensor.numel(), words)
        self.entropy_bits += codes.numel() * empirical_entropy((codes + self.codec.levels).view(torch.uint8),
                                                               self.codec.symbols) + 32.0 * delta.numel()
        return words, ("dqsg", name, tensor.shape, tensor.dtype, delta, key.for_sender(0), layout)

    def decompress(self, reduced: torch.Tensor, ctx: tuple) -> torch.Tensor:
        _, _, shape, dtype, delta, key, layout = ctx
        ksum, factor = layout.unpack(reduced, shape.numel())
        out = self.codec.decode_sum(ksum, delta, key, senders=layout.ranks, factor=factor)
        check_finite_output(out)
        return out.reshape(shape).to(dtype)


class NestedSumCompression(DQSGCompression):
    """Allreduce-friendly nested DQSG (ALGORITHMS.md §3) for the stock Horovod path.

    With a common Δ_b (s₁ levels), every rank sends its coset symbols (k + ⌊ρ/2⌋) mod ρ in summable
    fields of ⌈log2(P(ρ−1)+1)⌉ bits, plus its per-bucket checksums Σ_j (2j+1)k_j mod 2^32 (linear,
    so they sum too). The receiver reduces the field sums mod ρ and resolves Σ_p k_p with side
    information P·ḡ_prev, the previous step's decoded mean of the same tensor, which is
    bit-identical on every rank. Buckets whose resolved index sums miss the summed checksum are
    detected on every rank alike and **recovered** by a second, synchronous allreduce of their
    DQSG(s₁) index sums; counts are in ``failed_buckets``/``recovery_rounds``. The first step of
    each tensor (no side information yet) is sent as plain DQSG(s₁).

    Decoding succeeds where |Σ_p g_p − P·ḡ_prev| < (ρ − P)Δ/2 (sufficient): the scheme pays off only
    when ρ is well above P and gradients change slowly; otherwise recovery traffic dominates.
    """

    def __init__(self, levels: tuple[int, int] = (3, 1), bucket_size: int = 512, seed: int | None = None) -> None:
        self.nested = NDQSG(levels, bucket_size)
        super().__init__(levels[0], bucket_size, seed)
        self._side: dict[str, torch.Tensor] = {}
        self.failed_buckets = 0
        self.recovery_rounds = 0

    def config(self) -> dict[str, Any]:
        return {"scheme": "ndqsg-sum", "levels": self.nested.levels, "bucket_size": self.nested.bucket_size,
                "seed": self.seed}

    def compress(self, tensor: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, tuple]:
        name, _, delta, key = self._common_step(tensor, name)
        side = self._side.get(name)
        if side is None or side.numel() != tensor.numel():
            return self._dqsg_payload(tensor, name, delta, key)
        rho, d = self.nested.nesting_ratio, self.nested.bucket_size
        k = self.codec.quantize(tensor, delta, key)
        cosets = ops.nested_encode(flat32(tensor), delta, d, self.codec.levels, rho, key)
        layout = SumFieldLayout(0, rho - 1, _hvd().size())
        fields = layout.pack(cosets.view(torch.int8))
        checks = ops.bucket_checksum(k, d).double()
        words = torch.cat([fields[:-1], checks, fields[-1:]])
        self.stats.record(name, tensor.numel(), words)
        self.entropy_bits += cosets.numel() * empirical_entropy(cosets, rho) + 64.0 * delta.numel()
        return words, ("nested", name, tensor.shape, tensor.dtype, delta, key, layout, k, side)

    def decompress(self, reduced: torch.Tensor, ctx: tuple) -> torch.Tensor:
        mode, name, shape, dtype = ctx[:4]
        if mode == "dqsg":
            out = super().decompress(reduced, ctx)
            self._remember(name, out, reduced[-1])
            return out
        _, _, _, _, delta, key, layout, k, side = ctx
        n, ranks, rho, d = shape.numel(), layout.ranks, self.nested.nesting_ratio, self.nested.bucket_size
        nb = delta.numel()
        sums, factor = layout.unpack(torch.cat([reduced[:-1 - nb], reduced[-1:]]), n)
        checks = torch.round(reduced[-1 - nb:-1] / factor).to(torch.int64) & 0xFFFFFFFF
        kout = torch.empty(n, dtype=torch.int32)
        key0 = key.for_sender(0)
        ops.nested_decode((sums % rho).to(torch.uint8), delta, d, self.codec.levels, rho, side * ranks, key0,
                          senders=ranks, kout=kout)
        bad = torch.nonzero(ops.bucket_checksum(kout, d) != checks).flatten().tolist()
        if bad:  # the same buckets on every rank: recover their index sums with one more allreduce
            self.failed_buckets += len(bad)
            self.recovery_rounds += 1
            idx = bucket_coordinates(bad, d, n)
            dlayout = SumFieldLayout.for_levels(self.codec.levels, ranks)
            words = dlayout.pack(k[idx].contiguous())
            self.stats.record(name, 0, words)
            summed = _hvd().allreduce(words, op=_hvd().Sum, name=f"hvdquant.recover.{name}")
            kout[idx] = dlayout.unpack(summed, idx.numel())[0]
        out = self.codec.decode_sum(kout, delta, key0, senders=ranks, factor=factor)
        check_finite_output(out)
        self._remember(name, out, reduced[-1])
        return out.reshape(shape).to(dtype)

    def _remember(self, name: str, out: torch.Tensor, sentinel: torch.Tensor) -> None:
        """Side information for the next step: the decoded mean. out = factor·Σĝ and the reduced
        sentinel is factor·P, so the mean is out / sentinel."""
        self._side[name] = (out.reshape(-1) / float(sentinel)).contiguous()


def _not_summable(scheme: str, example: str):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{scheme} payloads cannot be summed by Horovod's allreduce, so there is no "
                        f"hvdquant.Compression.{scheme.lower()}: use hvdquant.DistributedOptimizer(opt, "
                        f"named_parameters=..., codec={example}, reducer='allgather' or 'scatter_reduce')")

    return staticmethod(refuse)


class Compression:
    """Factory in the style of ``hvd.Compression``: ``hvdquant.Compression.dqsg(levels=1, bucket_size=512)``.

    Only schemes whose payloads Horovod can sum live here; the others refuse with a pointer to
    :func:`hvdquant.DistributedOptimizer`.
    """

    dqsg = DQSGCompression
    ndqsg = NestedSumCompression
    metered = Metered
    qsgd = _not_summable("QSGD", "hvdquant.QSGD(...)")
    onebit = _not_summable("OneBitSGD", "hvdquant.OneBitSGD()")

    @staticmethod
    def for_codec(codec: Any, seed: int | None = None) -> DQSGCompression:
        """The stock-path object for a summable codec (DQSG, NDQSG); others refuse, naming the payload path."""
        from hvdquant.codecs.base import Codec

        if isinstance(codec, NDQSG):
            return NestedSumCompression(codec.levels, codec.bucket_size, seed)
        if isinstance(codec, DQSG):
            return DQSGCompression(codec.levels, codec.bucket_size, seed)
        if isinstance(codec, Codec):
            name = type(codec).__name__
            _not_summable(name, f"hvdquant.{name}(...)").__func__()
        raise TypeError(f"expected an hvdquant codec, got {type(codec).__name__}")
