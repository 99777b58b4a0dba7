"""``hvdquant.ddp``: hvdquant codecs as a PyTorch DDP communication hook.

    state = hvdquant.ddp.State(codec=hvdquant.DQSG(levels=1, bucket_size=512), reducer="allreduce")
    ddp_model.register_comm_hook(state, hvdquant.ddp.hook)

The adapter lives in :mod:`hvdquant.adapters.ddp` (how a bucket is exchanged, the guarantees);
this module is its public name, importable as ``import hvdquant.ddp``.
"""

from hvdquant.adapters.ddp import State, hook, init_from_env

__all__ = ["State", "hook", "init_from_env"]
