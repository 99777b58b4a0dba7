"""Fault injection: train a small model under horovodrun/mpirun; rank 1 SIGKILLs itself at step 3.
The surviving ranks must not hang: the launcher must end the job with a non-zero exit."""

import os
import signal
import sys

import horovod.torch as hvd
import torch
from torch import nn

import hvdquant

hvd.init()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
if sys.argv[1] == "payload":
    opt = hvdquant.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), codec=hvdquant.DQSG(1, 256),
                                        min_numel=16)
else:
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvdquant.Compression.dqsg(levels=1, bucket_size=256))
for step in range(1000):
    if step == 3 and hvd.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    opt.zero_grad()
    model(torch.randn(32, 64)).sum().backward()
    opt.step()
print("unreachable: survived the peer's death", flush=True)
