"""Codecs: pure maths. Each encodes a tensor to a payload and decodes it back; none communicates."""

from .dqsg import DQSG

__all__ = ["DQSG"]
