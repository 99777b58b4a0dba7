"""hvdquant: dithered and nested-dithered gradient quantization for data-parallel PyTorch.

Layers (kept apart on purpose):
- codecs (:mod:`hvdquant.codecs`): pure maths, tensor -> payload -> tensor, no communication;
- transports (:mod:`hvdquant.transports`): how payloads travel (summable field packing, ...);
- framework adapters (:mod:`hvdquant.adapters`): Horovod compression objects, a DDP communication hook;
- kernels (:mod:`hvdquant.kernels`, from ``kernels/`` in the checkout): the arithmetic.

``hvdquant.Compression``, ``hvdquant.DistributedOptimizer`` and ``hvdquant.ddp`` (the DDP communication
hook: ``hvdquant.ddp.State``, ``hvdquant.ddp.hook``; ``import hvdquant.ddp`` works too) are imported
lazily, so the codecs work without Horovod loaded or torch.distributed initialised.
"""

from hvdquant.codecs import DQSG, ECDQ, LGC, NDQSG, QSGD, CodecState, ErrorFeedback, OneBitSGD, TopK
from hvdquant.kernels import DitherKey
from hvdquant.stats import CommStats
from hvdquant.transports.ring import CosetRing, GroupDQSG, PreviousMean, RingStats, coset_ring, ring_allreduce
from hvdquant.version import __version__

__all__ = ["DQSG", "ECDQ", "LGC", "NDQSG", "QSGD", "CodecState", "CommStats", "Compression", "CosetRing",
           "DistributedOptimizer", "DitherKey", "ErrorFeedback", "GroupDQSG", "OneBitSGD", "PreviousMean", "RingStats",
           "TopK", "__version__", "coset_ring", "ddp", "ring_allreduce"]


def __getattr__(name: str):
    if name == "Compression":
        from hvdquant.adapters.horovod import Compression

        return Compression
    if name == "DistributedOptimizer":
        from hvdquant.adapters.optimizer import DistributedOptimizer

        return DistributedOptimizer
    if name == "ddp":
        import hvdquant.ddp as ddp

        return ddp
    raise AttributeError(f"module 'hvdquant' has no attribute {name!r}")
