"""The codec contract: pure maths, no collectives.

A codec turns one sender's flat float32 gradient into an :class:`Encoded` payload (named tensors:
exactly what a transport hands to the collective) and back. Transports move payloads as bytes
(:meth:`Encoded.to_bytes`, :meth:`Codec.from_bytes`) and call :meth:`Codec.aggregate` to combine
every sender's payload into the mean; a codec whose decoder needs side information or a second
round (NDQSG) overrides ``aggregate`` and uses the ``recover`` callback the transport supplies.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hvdquant.codecs.requests import Request
from hvdquant.kernels import DitherKey
from hvdquant.stats import DecodeStats

if TYPE_CHECKING:
    from hvdquant.codecs.state import CodecState


@dataclass(frozen=True)
class TensorContext:
    """What a codec may know about the tensor it encodes: its name and shape, the dither key of
    this sender (key.sender = rank), the number of ranks, and ``state``: the
    :class:`~hvdquant.codecs.state.CodecState` the exchange owns (error-feedback residuals, adaptive
    nesting's decisions). Transports always pass theirs; it may be left None only for stateless
    codecs, and a stateful codec called without one raises instead of silently starting afresh."""

    name: str
    shape: tuple[int, ...]
    key: DitherKey
    ranks: int = 1
    state: CodecState | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def sender(self, p: int) -> TensorContext:
        return TensorContext(self.name, self.shape, self.key.for_sender(p), self.ranks, self.state)


@dataclass
class Encoded:
    """One sender's payload. ``fields`` travel (in order); ``symbols``/``alphabet`` (or the symbols'
    histogram ``counts``, from encoders that never hold the symbols in memory) are kept locally for
    the empirical-entropy statistic and never sent."""

    n: int
    fields: dict[str, torch.Tensor]
    symbols: torch.Tensor | None = None
    alphabet: int = 0
    side_bits: float = 0.0  # bits of per-bucket side data (scales, checksums) counted in the entropy
    source: torch.Tensor | None = None  # the float32 input, kept where a recovery round may need it
    counts: torch.Tensor | None = None  # the symbols' histogram (a row per context for a context coder)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def device(self) -> torch.device:
        """Where the payload's fields live (the gradient's device)."""
        return next(iter(self.fields.values())).device

    def entropy(self) -> float | None:
        """Zeroth-order entropy of the symbols sent, bits per symbol (the conditional entropy given the
        coder's context where ``counts`` has a row per context); None if the codec kept none."""
        if self.counts is not None:
            return conditional_entropy(self.counts) if self.counts.dim() == 2 else counts_entropy(self.counts)
        if self.symbols is not None:
            return empirical_entropy(self.symbols, self.alphabet)
        return None

    def to_bytes(self) -> torch.Tensor:
        return as_bytes(*self.fields.values())

    def byte_views(self) -> list[torch.Tensor]:
        """The fields' bytes in order, as uint8 views (no copy): what :meth:`to_bytes` concatenates,
        for a caller that lays several payloads out in one buffer."""
        return byte_views(*self.fields.values())


def byte_views(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's bytes as a flat uint8 view (a copy only for a tensor that is not contiguous)."""
    return [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]


def as_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """The tensors' bytes, concatenated in order (one uint8 buffer for a byte collective)."""
    parts = byte_views(*tensors)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


Layout = list[tuple[str, torch.dtype, int | None]]  # (field, dtype, count); None = the rest (last only)


def layout_bytes(layout: Layout) -> int:
    """Bytes of a payload of a fixed ``layout`` (every count known): Σ count · width."""
    return sum(count * dtype.itemsize for _, dtype, count in layout)


FIELD_ALIGN = 8  # bytes: where each field a payload parser copies starts (any field dtype views there)


def split_bytes(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of :meth:`Encoded.to_bytes` for a known layout; refuses a buffer of the wrong size."""
    return split_bytes_group([buf], [layout])[0]


def split_bytes_group(bufs: Sequence[torch.Tensor], layouts: Sequence[Layout]) -> list[dict[str, torch.Tensor]]:
    """:func:`split_bytes` of several payloads (on one device) with one copy: every field's bytes go
    into one new buffer by one concatenation, each field starting at a multiple of FIELD_ALIGN bytes
    so that it views as its dtype, however many payloads and fields (a field's padding is the bytes
    that follow it in its storage, or zeros past the storage's end)."""
    flats = [buf.reshape(-1).contiguous() for buf in bufs]
    plans = [_field_ranges(buf, layout) for buf, layout in zip(flats, layouts, strict=True)]
    pieces: list[torch.Tensor] = []
    for buf, plan in zip(flats, plans):
        for _, _, start, nbytes in plan:
            length = -(-nbytes // FIELD_ALIGN) * FIELD_ALIGN
            pieces += [buf[start:start + length]] if start + length <= buf.numel() else _window(buf, start, length)
    arena = torch.cat(pieces) if pieces else None
    out, pos = [], 0
    for plan in plans:
        fields = {}
        for name, dtype, _, nbytes in plan:
            fields[name] = (arena[pos:pos + nbytes] if nbytes else torch.empty(0, dtype=torch.uint8,
                                                                               device=bufs[0].device)).view(dtype)
            pos += -(-nbytes // FIELD_ALIGN) * FIELD_ALIGN
        out.append(fields)
    return out


def _field_ranges(buf: torch.Tensor, layout: Layout) -> list[tuple[str, torch.dtype, int, int]]:
    """(field, dtype, first byte, bytes) of each field of ``layout`` in ``buf``; ValueError where the
    buffer's size does not fit the layout."""
    out = []
    pos = 0
    for i, (name, dtype, count) in enumerate(layout):
        width = dtype.itemsize
        if count is None:
            if i != len(layout) - 1:
                raise ValueError("only the last field of a layout may have a variable size")
            nbytes = buf.numel() - pos
            if nbytes < 0 or nbytes % width:
                raise ValueError(f"payload of {buf.numel()} bytes does not fit the layout")
        else:
            nbytes = count * width
        if pos + nbytes > buf.numel():
            raise ValueError(f"payload of {buf.numel()} bytes is too short for field '{name}'")
        out.append((name, dtype, pos, nbytes))
        pos += nbytes
    if pos != buf.numel():
        raise ValueError(f"payload has {buf.numel()} bytes, the layout takes {pos}")
    return out


def _window(buf: torch.Tensor, start: int, length: int) -> list[torch.Tensor]:
    """``length`` bytes of ``buf``'s storage from ``buf[start]`` on (past ``buf``'s own end), as
    pieces to concatenate: the bytes its storage holds there, then zeros."""
    first = buf.storage_offset() + start
    held = min(length, buf.untyped_storage().nbytes() - first)
    window = torch.as_strided(buf, (held,), (1,), first)
    if held == length:
        return [window]
    return [window, torch.zeros(length - held, dtype=torch.uint8, device=buf.device)]


def empirical_entropy(symbols: torch.Tensor, alphabet: int) -> float:
    """Zeroth-order entropy −Σ p log2 p of the symbols, bits per symbol (docs/ALGORITHMS.md §1).
    uint8 symbols are counted as they are (an int64 copy is much slower; docs/BENCHMARKS.md)."""
    if symbols.numel() == 0:
        return 0.0
    flat = symbols.reshape(-1)
    return counts_entropy(torch.bincount(flat if flat.dtype == torch.uint8 else flat.to(torch.int64),
                                         minlength=alphabet))


def counts_entropy(counts: torch.Tensor | list[int]) -> float:
    """−Σ p log2 p of a histogram (bits per symbol; 0 for an empty one). In Python floats: a
    histogram has a few to a few hundred bins, where torch's per-call overhead dominated (the
    stock path computes one per tensor per step)."""
    values = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    total = sum(values)
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in values if c)


def conditional_entropy(counts: torch.Tensor) -> float:
    """H(symbol | context) = Σ_c (n_c/n)·H(row c) of a histogram with one row per context, bits per
    symbol: what a coder that knows the context can reach, below the zeroth-order entropy of the
    rows' sum wherever the context tells something about the symbol."""
    rows = [(sum(r), r) for r in counts.tolist()]
    total = sum(n for n, _ in rows)
    if total == 0:
        return 0.0
    return sum(n / total * counts_entropy(r) for n, r in rows if n)


#: a transport's second round: per sender, the recovery requests it must answer -> its reply bytes
Recover = Callable[[dict[int, list[Request]]], dict[int, torch.Tensor]]


class Codec(ABC):
    """Base class. Subclasses are frozen dataclasses of their parameters."""

    scheme: str = "codec"
    #: payload sums are meaningful (the stock Horovod allreduce path can carry it)
    summable: bool = False

    @abstractmethod
    def encode(self, g: torch.Tensor, ctx: TensorContext) -> Encoded: ...

    @abstractmethod
    def decode(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor: ...

    @abstractmethod
    def layout(self, n: int, ctx: TensorContext) -> Layout:
        """Field layout of sender ``ctx.key.sender``'s payload for n coordinates."""

    @abstractmethod
    def formula_bits(self, n: int, ctx: TensorContext) -> float:
        """Bits per coordinate this sender's payload takes by formula (None-free for fixed codes)."""

    def config(self) -> dict:
        from dataclasses import asdict

        return {"scheme": self.scheme, **asdict(self)}  # type: ignore[call-overload]

    def from_bytes(self, buf: torch.Tensor, n: int, ctx: TensorContext) -> Encoded:
        return self.from_bytes_group([buf], [n], [ctx])[0]

    def from_bytes_group(self, bufs: Sequence[torch.Tensor], ns: Sequence[int], ctxs: Sequence[TensorContext]
                         ) -> list[Encoded]:
        """:meth:`from_bytes` of several payloads (``bufs[i]`` of ``ns[i]`` coordinates, sender and
        tensor of ``ctxs[i]``) with one copy of their bytes for all (:func:`split_bytes_group`)."""
        fields = split_bytes_group(bufs, [self.layout(n, c) for n, c in zip(ns, ctxs, strict=True)])
        return [Encoded(n, f) for n, f in zip(ns, fields)]

    def reconstruction(self, enc: Encoded, ctx: TensorContext) -> torch.Tensor:
        """What every receiver will take this sender's payload ``enc`` for (error feedback's ĝ):
        its decode, unless the codec decodes it only with more than the payload (NDQSG)."""
        return self.decode(enc, ctx)

    def aggregate(self, payloads: list[Encoded], ctx: TensorContext, recover: Recover | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
        """Mean of all senders' reconstructions, summed in sender order (bit-identical on every rank)."""
        total = torch.zeros(payloads[0].n, dtype=torch.float32, device=payloads[0].device)
        for p, enc in enumerate(payloads):
            total += self.decode(enc, ctx.sender(p))
        return total / len(payloads), DecodeStats()

    # A fused group's tensors at once. A codec with segmented kernels (kernels/ops_segments.py)
    # overrides these to cost a constant number of kernel launches per group, with the bits of the
    # single-tensor methods; these defaults call those methods tensor by tensor.

    def encode_group(self, parts: Sequence[torch.Tensor], ctxs: Sequence[TensorContext]) -> list[Encoded | None]:
        """Each part encoded with its context (:meth:`encode`); None where the part is not finite."""
        out: list[Encoded | None] = []
        for g, ctx in zip(parts, ctxs, strict=True):
            try:
                out.append(self.encode(g, ctx))
            except FloatingPointError:
                out.append(None)
        return out

    def decode_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        """Each payload decoded with its context (:meth:`decode`)."""
        return [self.decode(e, c) for e, c in zip(encs, ctxs, strict=True)]

    def reconstruction_group(self, encs: Sequence[Encoded], ctxs: Sequence[TensorContext]) -> list[torch.Tensor]:
        """Each payload's :meth:`reconstruction`."""
        return [self.reconstruction(e, c) for e, c in zip(encs, ctxs, strict=True)]

    def aggregate_group(self, payloads: Sequence[list[Encoded]], ctxs: Sequence[TensorContext],
                        recovers: Sequence[Recover | None]) -> list[tuple[torch.Tensor, DecodeStats]]:
        """Per tensor, the :meth:`aggregate` of its senders' payloads (``payloads[i][p]``: tensor i's
        payload from sender p)."""
        return [self.aggregate(list(p), c, r) for p, c, r in zip(payloads, ctxs, recovers, strict=True)]


def shared_keys(ctxs: Sequence[TensorContext]) -> bool:
    """Whether the contexts' dither keys share seed, sender and family, as a segmented launch's do
    (:class:`~hvdquant.kernels.segments.Segments`; one exchange's group always does)."""
    first = ctxs[0] if ctxs else None
    return all((c.key.seed, c.key.sender, c.ranks) == (first.key.seed, first.key.sender, first.ranks) for c in ctxs)


def mean_in_sender_order(payloads: Sequence[list[Encoded]],
                         decode: Callable[[list[Encoded], int], torch.Tensor]) -> torch.Tensor:
    """Σ_p decode(p) / P for a group decoded sender by sender (``decode(encs, p)``: sender p's
    payloads of every tensor, decoded end to end), added in sender order from zeros: each tensor's
    part has the bits of :meth:`Codec.aggregate`'s sum."""
    ranks = len(payloads[0])
    total = torch.zeros(sum(p[0].n for p in payloads), dtype=torch.float32, device=payloads[0][0].device)
    for p in range(ranks):
        total += decode([e[p] for e in payloads], p)
    return total / ranks


def each_finite(whole: torch.Tensor, parts: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each of ``parts`` (pieces of ``whole``) is finite: one check of ``whole``, then the
    parts only where it fails (a group's usual case costs one pass)."""
    return [True] * len(parts) if all_finite(whole) else [all_finite(p) for p in parts]


def every_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN and no ±Inf in any of ``tensors`` (float32, on one device): one fused check of the
    whole list, however many tensors (torch's multi-tensor non-finite check of mixed-precision
    training; its unscaling by 1.0 leaves every value as it is), and one read of its flag. It writes
    the tensors (that multiplication, in place): for hvdquant's own results, never a user's tensor."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    found = torch.zeros(1, dtype=torch.float32, device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones_like(found))
    return not bool(found)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no ±Inf in t. One min/max pass (NaN propagates into both): faster than
    ``torch.isfinite(t).all()`` on 2.5e7 floats, which builds a bool tensor first."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def flat32(g: torch.Tensor, what: str = "gradient") -> torch.Tensor:
    """A contiguous 1-D float32 view (or copy) of ``g``; float16/bfloat16/float64 are converted."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {g.dtype}")
    return g.detach().reshape(-1).to(torch.float32).contiguous()


def check_int(owner: str, name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner} {name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{owner} {name}={value} is out of range [{lo}, {hi}]")
