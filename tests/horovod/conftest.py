"""Shared setup of the Horovod tests (run under horovodrun, every rank runs every test in order)."""

import horovod.torch as hvd
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    torch.set_num_threads(1)
    if hvd.size() < 2:
        pytest.skip("needs horovodrun -np >= 2")

