"""A small decoder-only transformer (GPT-style) over bytes: the language-model main job's model.

Token and learned position embeddings, ``layers`` pre-norm blocks (causal multi-head self-attention,
then a 4x-wide GELU MLP, each added to the residual stream), a final layer norm and an output layer
tied to the token embedding. No dropout: the job trains far less than one pass over its data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCABULARY = 256  # bytes


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """Next-byte logits (batch, context, 256) for byte sequences (batch, context); ``vocabulary``
    other than 256 gives the same architecture over other tokens (GPT-2 small's shape: 12 layers,
    width 768, 12 heads, 50257 tokens, 124M parameters)."""

    def __init__(self, layers: int = 4, width: int = 128, heads: int = 4, context: int = 128,
                 vocabulary: int = VOCABULARY) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.context = context
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.apply(self._init)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(block.proj.weight, std=0.02 / (2 * layers) ** 0.5)
            nn.init.normal_(block.mlp[2].weight, std=0.02 / (2 * layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context:
            raise ValueError(f"sequence of {tokens.shape[1]} bytes is longer than the context {self.context}")
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()
