"""Codecs: pure maths. Each encodes a tensor to a payload and decodes it back; none communicates."""

from .base import Codec, Encoded, TensorContext, empirical_entropy
from .dqsg import DQSG
from .ecdq import ECDQ
from .feedback import ErrorFeedback
from .lgc import LGC
from .ndqsg import NDQSG
from .onebit import OneBitSGD
from .qsgd import QSGD
from .state import CodecState
from .topk import TopK

__all__ = ["DQSG", "ECDQ", "LGC", "NDQSG", "QSGD", "Codec", "CodecState", "Encoded", "ErrorFeedback", "OneBitSGD",
           "TensorContext", "TopK", "empirical_entropy"]
