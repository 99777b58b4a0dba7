"""Tests' shorthand for the exchange contract on single tensors: a fused buffer of one segment,
keyed like an adapter would key it, and its finisher handing the tensor back in its shape."""

from collections.abc import Callable

import torch

from hvdquant.transports.fused import FusedBuffer
from hvdquant.transports.session import dither_key


def start(ex, name: str, g: torch.Tensor, seed: int, step: int) -> Callable[[], torch.Tensor]:
    """Start ``g``'s exchange as a compressed tensor keyed (seed, step, name, this rank)."""
    buf = FusedBuffer.of([(name, g, dither_key(seed, step, name, ex.coll.rank))])
    finish = ex.start(buf)
    return lambda: buf.unflatten(finish())[name]


def start_raw(ex, name: str, g: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start ``g``'s exchange uncompressed (summed in rank order)."""
    buf = FusedBuffer.of([(name, g, None)])
    finish = ex.start(buf)
    return lambda: buf.unflatten(finish())[name]
