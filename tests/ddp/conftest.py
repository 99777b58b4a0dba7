"""Shared setup of the DDP tests (run under ``torchrun --nproc_per_node N``; every rank runs every
test in order): torch.distributed on Gloo, CPU, one torch thread per rank."""

import os

import pytest
import torch
import torch.distributed as dist

import hvdquant


@pytest.fixture(scope="module", autouse=True)
def distributed():
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        pytest.skip("needs torchrun --nproc_per_node >= 2 (or mpirun -n >= 2)")
    hvdquant.ddp.init_from_env("gloo")
    torch.set_num_threads(1)
    if dist.get_world_size() < 2:
        pytest.skip("needs torchrun --nproc_per_node >= 2")
