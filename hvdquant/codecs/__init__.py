"""Codecs: pure maths. Each encodes a tensor to a payload and decodes it back; none communicates."""

from .base import AggregateStats, Codec, Encoded, TensorContext, empirical_entropy
from .dqsg import DQSG
from .feedback import ErrorFeedback, OneBitSGD
from .ndqsg import NDQSG
from .qsgd import QSGD
from .topk import TopK

__all__ = ["DQSG", "NDQSG", "QSGD", "AggregateStats", "Codec", "Encoded", "ErrorFeedback", "OneBitSGD",
           "TensorContext", "TopK", "empirical_entropy"]
