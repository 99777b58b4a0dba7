"""Transports: how payloads travel between ranks (field-packed sums, allgather, rings)."""

from .summable import SumFieldLayout

__all__ = ["SumFieldLayout"]
