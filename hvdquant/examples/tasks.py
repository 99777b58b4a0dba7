"""The main jobs' tasks: what a rank trains on, its model and optimizer, and how it is evaluated.

``cnn`` (the quick default): a small CNN on Fashion-MNIST, SGD with momentum, test accuracy per epoch.
Each rank trains on its own shard of the 60k training images (stride = world size); every rank
evaluates on the 10k test images.

``lm``: a byte-level GPT (:class:`hvdquant.examples.gpt.ByteGPT`) on the Python standard library's
own source files (:func:`hvdquant.data.load_stdlib_text`: split into training and validation by
file), AdamW with a linear warm-up and a cosine decay, validation loss and bits per byte every
``--eval-every`` steps. Each rank samples random windows from its own shard of the training files
(file ``i`` goes to rank ``i mod world size``); every rank evaluates on the same validation windows,
spread evenly over the validation files.

A task yields ``rounds``: an epoch (``cnn``) or ``--eval-every`` steps (``lm``), each followed by an
evaluation.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hvdquant.data import load_fashion_mnist, load_stdlib_text
from hvdquant.examples.gpt import VOCABULARY, ByteGPT
from hvdquant.examples.models import SmallCNN

Batch = tuple[torch.Tensor, torch.Tensor]


class Task(Protocol):
    rounds: int
    round_name: str  # "epoch" or "step": what a round's number counts
    steps_per_round: int

    def model(self) -> nn.Module: ...
    def optimizer(self, model: nn.Module, args: argparse.Namespace, size: int) -> torch.optim.Optimizer: ...
    def lr_factor(self, step: int) -> float: ...
    def batches(self, round_index: int) -> Iterator[Batch]: ...
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def describe(self, metrics: dict[str, float]) -> str: ...
    def data(self) -> dict: ...


class FashionMNISTTask:
    """The CNN job: :class:`SmallCNN` on Fashion-MNIST, SGD with momentum, constant learning rate."""

    round_name = "epoch"

    def __init__(self, args: argparse.Namespace, rank: int, size: int) -> None:
        train_x, train_y, self.test_x, self.test_y = load_fashion_mnist()
        self.train_x, self.train_y = train_x[rank::size], train_y[rank::size]
        self.batch_size, self.rounds = args.batch_size, args.epochs
        self.steps_per_round = len(self.train_x) // args.batch_size
        if args.max_steps:
            self.steps_per_round = min(self.steps_per_round, args.max_steps)
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    def model(self) -> nn.Module:
        return SmallCNN()

    def optimizer(self, model: nn.Module, args: argparse.Namespace, size: int) -> torch.optim.Optimizer:
        # With op=Sum Horovod returns the sum of gradients, so the step size is divided by the world
        # size to train the same model; the compression must then return the sum (hvdquant does).
        lr = args.lr / size if args.op == "sum" else args.lr
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)

    def lr_factor(self, step: int) -> float:
        return 1.0

    def batches(self, round_index: int) -> Iterator[Batch]:
        order = torch.randperm(len(self.train_x), generator=self.gen)
        for step in range(self.steps_per_round):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.train_x[idx], self.train_y[idx]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: int = 1000) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum())
                      for x, y in zip(self.test_x.split(batch), self.test_y.split(batch)))
        model.train()
        return {"test_accuracy": correct / len(self.test_x)}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"test accuracy {metrics['test_accuracy']:.4f}"

    def data(self) -> dict:
        return {"train_images_per_rank": len(self.train_x), "test_images": len(self.test_x)}


class StdlibLMTask:
    """The language-model job: :class:`ByteGPT` on the standard library's source files."""

    round_name = "step"

    def __init__(self, args: argparse.Namespace, rank: int, size: int) -> None:
        corpus = load_stdlib_text()
        self.root, self.files = corpus.root, len(corpus.train)
        self.shard = torch.frombuffer(bytearray(b"\0".join(corpus.train[rank::size])), dtype=torch.uint8)
        validation = torch.frombuffer(bytearray(corpus.validation), dtype=torch.uint8)
        self.context, self.batch_size = args.context, args.batch_size
        self.layers, self.width, self.heads = args.layers, args.width, args.heads
        if len(self.shard) <= self.context + 1:
            raise ValueError(f"rank {rank}'s training shard ({len(self.shard)} bytes) is shorter than a window")
        starts = torch.linspace(0, len(validation) - self.context - 1, args.eval_windows).long()
        self.validation = validation[starts[:, None] + torch.arange(self.context + 1)].long()
        self.steps_per_round = args.eval_every
        self.rounds = max(1, args.steps // args.eval_every)
        self.total_steps = self.rounds * self.steps_per_round
        self.warmup = max(1, self.total_steps // 20)
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    def model(self) -> nn.Module:
        return ByteGPT(self.layers, self.width, self.heads, self.context)

    def optimizer(self, model: nn.Module, args: argparse.Namespace, size: int) -> torch.optim.Optimizer:
        # Adam's step does not depend on the gradient's scale (up to eps): op=Sum keeps the learning rate
        return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over the first 5% of the steps, then a cosine decay to 10%."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def batches(self, round_index: int) -> Iterator[Batch]:
        window = torch.arange(self.context + 1)
        for _ in range(self.steps_per_round):
            starts = torch.randint(0, len(self.shard) - self.context - 1, (self.batch_size,), generator=self.gen)
            seq = self.shard[starts[:, None] + window].long()
            yield seq[:, :-1], seq[:, 1:]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.reshape(-1, VOCABULARY), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: int = 32) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        total = 0.0
        for i in range(0, len(self.validation), batch):
            seq = self.validation[i:i + batch].to(device)
            total += float(self.loss(model(seq[:, :-1]), seq[:, 1:])) * len(seq)
        model.train()
        loss = total / len(self.validation)
        return {"validation_loss": loss, "bits_per_byte": loss / math.log(2)}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"validation loss {metrics['validation_loss']:.4f} ({metrics['bits_per_byte']:.3f} bits/byte)"

    def data(self) -> dict:
        return {"corpus": self.root, "train_files": self.files, "train_bytes_this_rank": len(self.shard),
                "validation_windows": len(self.validation)}


TASKS: dict[str, type] = {"cnn": FashionMNISTTask, "lm": StdlibLMTask}
