"""Helpers shared by the Horovod tests."""

import horovod.torch as hvd
import torch


def same_on_all_ranks(t: torch.Tensor, name: str) -> bool:
    """Every rank's bits of ``t`` equal rank 0's (a collective: call it on every rank)."""
    gathered = hvd.allgather_object(t.detach().numpy().tobytes(), name=name)
    return all(g == gathered[0] for g in gathered)
