"""Softmax attention with rotary positions: the ``transformer`` token mixer, the reference
without a fixed-size state (https://arxiv.org/abs/1706.03762)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.common.utils import check_hidden_states


def rotary(x: torch.Tensor, offset: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (https://arxiv.org/abs/2104.09864) of x [B, H, T, K],
    positions offset .. offset + T - 1 (half-split pairing)."""
    K, T = x.shape[-1], x.shape[-2]
    acc = torch.promote_types(x.dtype, torch.float32)
    freq = base ** (-torch.arange(0, K // 2, device=x.device, dtype=acc) / (K // 2))
    ang = torch.arange(offset, offset + T, device=x.device, dtype=acc)[:, None] * freq
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :K // 2], x[..., K // 2:2 * (K // 2)]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., 2 * (K // 2):]], -1)


class Attention(nn.Module):
    """Multi-head softmax attention with rotary positions (mixer ``transformer``).

    Same call as MoMLayer: (x [B, T, D], memory_mask, cache, use_cache) -> (y, aux = 0, cache);
    the cache holds keys and values [B, H, T, K] of every position seen.
    """

    def __init__(self, hidden_size: int, num_heads: int, causal: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of "
                             f"num_heads={num_heads}")
        self.num_heads, self.head_dim, self.causal = num_heads, hidden_size // num_heads, causal
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                cache: Optional[Dict[str, torch.Tensor]] = None, use_cache: bool = False):
        check_hidden_states(x, self.num_heads * self.head_dim, self.qkv.weight.device,
                            self.qkv.weight.dtype)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = cache["k"].shape[2] if cache is not None else 0
        q, k = rotary(q, past), rotary(k, past)
        if cache is not None:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        mask, is_causal = None, self.causal and T > 1
        if is_causal and past:  # queries at past .. past+T-1 see keys up to their own position
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            is_causal = False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, D))
        return y, x.new_zeros(()), ({"k": k, "v": v} if use_cache else None)
