"""The unit every exchange moves: a fused buffer, one flat gradient plus a segment table.

The tensors that travel together (a DDP bucket, a Horovod fusion group, the tensors of one stock
step) are laid end to end in one flat float32 buffer; each :class:`Segment` names one of them, says
where it lies (offset, length), what it looks like to the framework (shape, dtype) and carries this
rank's dither key for it, or no key where the tensor travels uncompressed (small or 1-D tensors:
:func:`compressible`). An exchange returns one flat float32 result of the same layout;
:meth:`FusedBuffer.unflatten` hands each tensor back in its shape and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hvdquant.codecs.base import flat32
from hvdquant.kernels import DitherKey


def compressible(tensor: torch.Tensor, min_numel: int | None) -> bool:
    """The one rule for which tensors a codec encodes (PowerSGD's rule): at least 2 dimensions and
    ``min_numel`` elements; ``min_numel=None`` compresses every tensor (the stock Horovod path,
    where the framework allreduces whatever the codec hands it)."""
    return min_numel is None or (tensor.dim() >= 2 and tensor.numel() >= min_numel)


@dataclass(frozen=True)
class Segment:
    """One tensor of a fused buffer: ``flat[offset:offset + length]``; ``key`` is this rank's dither
    key (seed, step, tensor, sender) or None for a tensor sent uncompressed."""

    name: str
    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: DitherKey | None

    @property
    def compressed(self) -> bool:
        return self.key is not None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class FusedBuffer:
    """A flat float32 gradient buffer (on the gradients' device) and its segment table."""

    flat: torch.Tensor
    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, items: Sequence[tuple[str, torch.Tensor, DitherKey | None]],
           flat: torch.Tensor | None = None) -> FusedBuffer:
        """Lay ``(name, tensor, key)`` items end to end (key None: uncompressed). Names must be unique.
        ``flat``: a float32 buffer that already holds the tensors end to end (a DDP bucket), used as
        it is instead of a copy."""
        if not items:
            raise ValueError("a fused buffer needs at least one tensor")
        names = [name for name, _, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names in a fused buffer must be unique, got {names}")
        if flat is None:
            flats = [flat32(t, f"gradient '{name}'") for name, t, _ in items]
            devices = {f.device for f in flats}
            if len(devices) > 1:
                raise ValueError(f"tensors of one fused buffer must share a device, got {sorted(map(str, devices))}")
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
        elif flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != sum(t.numel() for _, t, _ in items):
            raise ValueError(f"flat must be a 1-D float32 buffer of the items' {sum(t.numel() for _, t, _ in items)} "
                             f"values, got {flat.dtype} of shape {tuple(flat.shape)}")
        segments, offset = [], 0
        for name, t, key in items:
            segments.append(Segment(name, offset, t.numel(), tuple(t.shape), t.dtype, key))
            offset += t.numel()
        return cls(flat, tuple(segments))

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def part(self, seg: Segment) -> torch.Tensor:
        """The flat float32 values of ``seg``."""
        return self.flat[seg.offset:seg.end]

    def compressed(self) -> list[Segment]:
        return [s for s in self.segments if s.compressed]

    def uncompressed(self) -> list[Segment]:
        return [s for s in self.segments if not s.compressed]

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """An exchange's flat result from its per-segment results (flat float32, in segment order),
        on this buffer's device; a one-segment buffer's result is its part as it is (no copy)."""
        if [p.numel() for p in parts] != [s.length for s in self.segments]:
            raise ValueError(f"results of {[p.numel() for p in parts]} values for segments of "
                             f"{[s.length for s in self.segments]}")
        return (parts[0] if len(parts) == 1 else torch.cat(list(parts))).to(self.device)

    def unflatten(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """An exchange's flat result as one tensor per segment, in the segment's shape and dtype."""
        if out.numel() != self.numel:
            raise ValueError(f"result has {out.numel()} values, the buffer {self.numel}")
        return {s.name: out[s.offset:s.end].reshape(s.shape).to(s.dtype) for s in self.segments}
