"""DQSG: subtractive dithered quantization of stochastic gradients (ALGORITHMS.md §1, §3).

Per bucket b of ``bucket_size`` (d) coordinates, with ``levels`` (s) levels:

    Δ_b = max_i |g_i| / s                        (step; common to all ranks in the summable form)
    k_i = round(g_i / Δ_b + u_i) ∈ {-s, …, s}    (u_i ~ U(-1/2, 1/2) from the keyed Philox stream)
    ĝ_i = Δ_b (k_i − u_i)                        (decoder regenerates u_i from the same key)

The error ĝ − g is uniform on (−Δ/2, Δ/2], independent of g, unbiased, of variance Δ²/12.
With one Δ_b shared by P ranks, Σ_p ĝ_p = Δ_b (Σ_p k_p − Σ_p u_p): integer indices can be summed
by any transport and decoded once (variance of the mean Δ²/(12P)).

The arithmetic lives in :mod:`hvdquant.kernels`; this class validates, shapes and documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvdquant.kernels import DitherKey, ops


def _as_flat_float32(g: torch.Tensor, what: str = "gradient") -> torch.Tensor:
    """A contiguous 1-D float32 view (or copy) of ``g``, on its device.

    float16, bfloat16 and float64 are converted to float32 (the codec's working precision);
    other dtypes are refused. Non-contiguous tensors are copied.
    """
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {g.dtype}")
    return g.detach().reshape(-1).to(torch.float32).contiguous()


@dataclass(frozen=True)
class DQSG:
    """Dithered quantizer with ``levels`` = s (2s+1 symbols) and buckets of ``bucket_size`` = d."""

    levels: int = 1
    bucket_size: int = 512

    def __post_init__(self) -> None:
        for field, hi in (("levels", 127), ("bucket_size", 1 << 30)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"DQSG {field} must be an int, got {type(v).__name__}")
            if not 1 <= v <= hi:
                raise ValueError(f"DQSG {field}={v} is out of range [1, {hi}]")

    @property
    def symbols(self) -> int:
        """Alphabet size 2s + 1."""
        return 2 * self.levels + 1

    def entropy_bound_bits(self) -> float:
        """log2(2s+1) + 32/d: the nominal bits per coordinate of one sender (ALGORITHMS.md §1)."""
        return math.log2(self.symbols) + 32.0 / self.bucket_size

    def num_buckets(self, n: int) -> int:
        return ops.num_buckets(n, self.bucket_size)

    def bucket_absmax(self, g: torch.Tensor) -> torch.Tensor:
        """max |g_i| per bucket (float32; NaN reported as +inf so a max-reduction keeps it)."""
        return ops.bucket_absmax(_as_flat_float32(g), self.bucket_size)

    def step_size(self, absmax: torch.Tensor) -> torch.Tensor:
        """Δ_b = absmax_b / s (float32). Callers check finiteness first."""
        return absmax.to(torch.float32) / float(self.levels)

    def encode(self, g: torch.Tensor, delta: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """Indices k ∈ [-s, s] (int8, flat) of ``g`` under steps ``delta`` and dither stream ``key``."""
        return ops.dqsg_encode(_as_flat_float32(g), delta.contiguous(), self.bucket_size, self.levels, key)

    def decode_sum(self, ksum: torch.Tensor, delta: torch.Tensor, key: DitherKey, senders: int = 1,
                   factor: float = 1.0) -> torch.Tensor:
        """factor · Σ_p ĝ_p for senders key.sender … key.sender+senders−1 from their summed indices."""
        return ops.dqsg_decode(ksum.to(torch.int32).contiguous(), delta.contiguous(), self.bucket_size, key,
                               senders=senders, factor=factor)

    def decode(self, codes: torch.Tensor, delta: torch.Tensor, key: DitherKey) -> torch.Tensor:
        """ĝ = Δ (k − u) for the single sender ``key.sender`` (flat float32)."""
        return self.decode_sum(codes, delta, key, senders=1)
