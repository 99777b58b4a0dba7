"""Codecs: pure maths. Each encodes a tensor to a payload and decodes it back; none communicates."""

from .base import AggregateStats, Codec, Encoded, TensorContext, empirical_entropy
from .dqsg import DQSG
from .feedback import ErrorFeedback, OneBitSGD
from .lgc import LGC
from .ndqsg import NDQSG
from .qsgd import QSGD
from .topk import TopK

__all__ = ["DQSG", "LGC", "NDQSG", "QSGD", "AggregateStats", "Codec", "Encoded", "ErrorFeedback", "OneBitSGD",
           "TensorContext", "TopK", "empirical_entropy"]
