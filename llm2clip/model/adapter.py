"""The LLM2CLIP text adapter: frozen-LLM caption embedding -> CLIP embedding space.

    x -> L2-normalise -> k x [ x + Linear(2d->d)(Dropout(GELU(Linear(d->2d)(LayerNorm(x))))) ]
      -> LayerNorm -> Linear(d -> embed_dim)

Parameter count for d=2048, embed_dim=1280, 4 blocks (all Linear layers with bias, LayerNorm affine):
the 4 residual blocks hold 67,149,824 parameters (the paper's "67.1M"); the final LayerNorm (4,096)
and Linear(2048->1280) (2,622,720) bring the whole adapter to 69,776,640. Counting weights only
(no biases, no LayerNorm) gives 67,108,864 for the blocks, also "67.1M": either way the paper's
figure covers the residual blocks, not the output projection. tests/test_adapter_tower.py pins this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdapterBlock(nn.Module):
    """Pre-norm residual MLP: x + fc2(dropout(gelu(fc1(norm(x))))); [.., d] -> [.., d]."""

    def __init__(self, dim: int, expansion: int = 2, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class LLMAdapter(nn.Module):
    """Maps LLM caption embeddings [B, in_dim] to text features [B, embed_dim] (not normalised).

    `source` is a human-readable description of where embeddings should come from (e.g. the LLM
    path/fingerprint); it appears in the width-mismatch error.
    """

    def __init__(self, in_dim: int, embed_dim: int = 1280, num_blocks: int = 4, expansion: int = 2,
                 dropout: float = 0.0, source: str = "the stage-1 text encoder"):
        super().__init__()
        if in_dim <= 0 or embed_dim <= 0 or num_blocks < 0 or expansion <= 0:
            raise ValueError(f"invalid adapter shape: in_dim={in_dim}, embed_dim={embed_dim}, "
                             f"num_blocks={num_blocks}, expansion={expansion}")
        self.in_dim, self.embed_dim, self.num_blocks, self.expansion = in_dim, embed_dim, num_blocks, expansion
        self.source = source
        self.blocks = nn.ModuleList([AdapterBlock(in_dim, expansion, dropout) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim] (any float dtype) -> [B, embed_dim] in the adapter's dtype."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"adapter expects LLM embeddings of width {self.in_dim} but got {x.shape[-1]} "
                             f"(embeddings from {self.source}); set model.adapter_in_dim or re-embed the captions "
                             "with the text encoder this model was built for")
        x = F.normalize(x.to(self.proj.weight.dtype), dim=-1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x))
