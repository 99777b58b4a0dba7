"""ECDQ's coding model (docs/ALGORITHMS.md §12): the rANS tables P(k | u) of a Gaussian coordinate
quantized with a subtractive dither, for the two scopes of the step.

A coordinate x ~ N(0, σ²) quantized as k = round(x/Δ + u) has, given the dither u,

    P(k | u) = Φ(r·(k − u + ½)) − Φ(r·(k − u − ½)),       r = Δ/σ  (the relative step)

and the tables hold it for u at the centre of each of ``bins`` equal intervals of (−½, ½) and for
k ∈ [−K, K] (stored as the symbol k + K), every reachable symbol keeping a frequency of at least 1
out of M = 2^14, the unreachable ones 0. The tables are computed once per process from
``math.erfc`` in float64 and never travel.

- **Bucket scope** (Δ_b = step·σ_b): every bucket has r = step, so one set of ``BUCKET_BINS``
  tables, K = :func:`bucket_half_width`.
- **Tensor scope** (Δ = step·σ over the whole tensor): a bucket's relative step r_b = Δ_b/σ_b varies,
  so each bucket names its *class*, one of ``CLASSES`` relative steps ``class_step(c)`` 0.4 octave
  apart from 2^-7 to 2^5 plus a silent class (σ_b = 0 or r_b > 2^5.2: almost every symbol is 0),
  and its symbols are coded with that class's ``TENSOR_BINS`` tables. K = ``TENSOR_HALF_WIDTH``
  (one byte); class c's tables reach only the symbols |k| ≤ K_c its lower edge allows
  (:func:`class_half_width`).
"""

from __future__ import annotations

import functools
import math

import torch

from hvdquant.kernels import ops

BUCKET_BINS = 16  # dither intervals that select a symbol's table in the bucket scope (a power of 2)
TENSOR_BINS = 8  # the same in the tensor scope, where classes × bins ≤ 256 contexts (one byte)
CLASSES = 32  # the tensor scope's relative-step classes, the last one silent
TENSOR_HALF_WIDTH = 127  # K of the tensor scope: symbols k + K in [0, 254]
TENSOR_CAP = 125  # the tensor scope's encoder keeps |x_i| ≤ TENSOR_CAP·Δ_b, so |k_i| ≤ 126 < K
_LOWEST, _WIDTH = -7.0, 0.4  # class c < CLASSES − 1 is centred at r = 2^(−7 + 0.4c)
_SILENT_STEP = 2.0 ** 5.4  # the silent class's table: r beyond the last edge (2^5.2)
_SCALE = float(1 << 40)  # probabilities → integer counts before rans_table normalises them to M


def phi(t: float) -> float:
    """The standard normal distribution function, from erfc (accurate in both tails)."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def bucket_half_width(step: float, bucket_size: int) -> int:
    """K with |k_i| ≤ K for Δ_b = step·σ_b: |x_i| ≤ ‖x_b‖₂ = √d·σ_b, so |x_i/Δ_b| ≤ √d/step up to the
    rounding of σ_b to bfloat16 (2^-9) and float32 (1% covers both), and k adds at most 1."""
    return math.floor(math.sqrt(bucket_size) * 1.01 / float(torch.tensor(step, dtype=torch.float32))) + 1


def class_step(c: int) -> float:
    """The relative step r_c whose tables code class c's symbols."""
    return _SILENT_STEP if c == CLASSES - 1 else 2.0 ** (_LOWEST + _WIDTH * c)


@functools.lru_cache(maxsize=8)
def class_edges(device: torch.device | str = "cpu") -> torch.Tensor:
    """The CLASSES − 1 lower edges of classes 1 … CLASSES − 1 (float32; made once per device, read
    only): a bucket of relative step r is in class #{edges ≤ r} (``torch.bucketize(r, edges, right=True)``)."""
    return torch.tensor([2.0 ** (_LOWEST + _WIDTH * c - _WIDTH / 2) for c in range(1, CLASSES)],
                        dtype=torch.float32, device=device)


def class_half_width(c: int, bucket_size: int) -> int:
    """K_c: the largest |k| in class c. Its buckets have r ≥ its lower edge, so |x_i/Δ_b| ≤
    √d·σ_b/Δ_b ≤ √d/edge (1% for the roundings) and |k| ≤ that + 1; class 0 has no lower edge and
    relies on the encoder's cap |x_i| ≤ TENSOR_CAP·Δ_b."""
    if c == 0:
        return TENSOR_HALF_WIDTH
    edge = float(class_edges()[c - 1])
    return min(TENSOR_HALF_WIDTH, math.floor(math.sqrt(bucket_size) * 1.01 / edge) + 1)


def _row(r: float, u: float, half_width: int, reach: int) -> torch.Tensor:
    """One table: P(k | u) at relative step r for k ∈ [−reach, reach] (0 beyond), over the symbols
    k + half_width."""
    counts = [0] * (2 * half_width + 1)
    for k in range(-reach, reach + 1):
        counts[k + half_width] = max(1, round((phi(r * (k - u + 0.5)) - phi(r * (k - u - 0.5))) * _SCALE))
    return ops.rans_table(torch.tensor(counts, dtype=torch.int64))


def _centre(j: int, bins: int) -> float:
    return (j + 0.5) / bins - 0.5


@functools.lru_cache(maxsize=32)
def bucket_tables(step: float, half_width: int) -> torch.Tensor:
    """The bucket scope's tables (int16, BUCKET_BINS × (2K + 1), rows summing to 2^14): row j at
    relative step ``step`` and u at the centre of the j-th interval."""
    return torch.stack([_row(step, _centre(j, BUCKET_BINS), half_width, half_width) for j in range(BUCKET_BINS)])


@functools.lru_cache(maxsize=8)
def tensor_tables(bucket_size: int) -> torch.Tensor:
    """The tensor scope's tables (int16, (CLASSES·TENSOR_BINS) × 255): row c·TENSOR_BINS + j for class
    c's relative step and u at the centre of the j-th interval, reaching |k| ≤ K_c."""
    return torch.stack([_row(class_step(c), _centre(j, TENSOR_BINS), TENSOR_HALF_WIDTH,
                             class_half_width(c, bucket_size))
                        for c in range(CLASSES) for j in range(TENSOR_BINS)])


@functools.lru_cache(maxsize=40)
def rans_model(scope: str, step: float, bucket_size: int) -> ops.RansTables:
    """The scope's tables checked once, with the kernels' forms of them made once per device."""
    if scope == "bucket":
        return ops.RansTables(bucket_tables(step, bucket_half_width(step, bucket_size)))
    return ops.RansTables(tensor_tables(bucket_size))


def code_length(r: float, rows: torch.Tensor, half_width: int) -> float:
    """Expected bits per symbol of a Gaussian coordinate at relative step r coded with ``rows`` (one
    row per equal dither interval, u at its centre): Σ_j Σ_k P_r(k | u_j) log₂(M / f_j(k)) / bins."""
    bins, total = rows.shape[0], 0.0
    for j, row in enumerate(rows.tolist()):
        u = _centre(j, bins)
        for s, f in enumerate(row):
            if f:
                k = s - half_width
                total += (phi(r * (k - u + 0.5)) - phi(r * (k - u - 0.5))) * math.log2((1 << 14) / f)
    return total / bins
