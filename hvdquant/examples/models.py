"""The models of the examples and experiments (Fashion-MNIST, 1×28×28 inputs, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fc() -> nn.Module:
    """FC 784-300-100-10 with ReLU, the authors' fully connected network (Alistarh et al., QSGD): 266k parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


class SmallCNN(nn.Module):
    """conv(1→16, 5) · pool · conv(16→32, 5) · pool · fc(512→10): 18k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))
