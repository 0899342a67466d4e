"""The pre-norm residual block of every sequence model, and the token mixers it can hold.

Only the mixer changes between the four sequence models, so the memory is the only variable:

- ``mom``: Mixture-of-Memories, a router sends each token to ``topk`` of ``num_memories``
  gated memories plus an optional shared one (https://arxiv.org/abs/2502.13685);
- ``gdn``: one gated-delta-rule memory, no router (https://arxiv.org/abs/2412.06464);
- ``gla``: one gated linear-attention memory, no router (https://arxiv.org/abs/2312.06635);
- ``transformer``: softmax attention with rotary positions, causal or bidirectional.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention
from .mom import MoMLayer, SingleMemory
from .norm import RMSNorm

MIXERS = ("mom", "gdn", "gla", "transformer")
Cache = Dict[str, torch.Tensor]


def make_mixer(mixer: str, hidden_size: int, num_heads: int, causal: bool, mom: dict,
               memory: dict) -> nn.Module:
    """The token mixer of one block; ``mom`` holds the router keys, ``memory`` the keys every
    gated memory takes (short convolution, chunk size, backend)."""
    if mixer == "mom":
        return MoMLayer(hidden_size, num_heads=num_heads, **mom, **memory)
    if mixer in ("gdn", "gla"):
        return SingleMemory(hidden_size, num_heads,
                            "gated_delta" if mixer == "gdn" else "gla", **memory)
    if mixer == "transformer":
        return Attention(hidden_size, num_heads, causal)
    raise ValueError(f"mixer={mixer!r} is not one of {MIXERS}")


class SequenceBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x)) (SwiGLU).

    forward(x [B, T, D], memory_mask, cache, use_cache) -> (x [B, T, D], aux loss, cache)."""

    def __init__(self, hidden_size: int, mixer: nn.Module, mlp_ratio: float = 2.0):
        super().__init__()
        self.mix_norm = RMSNorm(hidden_size)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(hidden_size)
        inner = int(hidden_size * mlp_ratio)
        self.up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x, memory_mask=None, cache=None, use_cache=False):
        y, aux, cache = self.mixer(self.mix_norm(x), memory_mask, cache, use_cache)
        x = x + y
        a, b = self.up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(a) * b), aux, cache
