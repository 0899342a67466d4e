"""Chunkwise (gated) linear attention: public entry point (Triton on CUDA, torch on CPU).

Linear attention https://arxiv.org/abs/2006.16236 with an optional scalar per-head decay
(the "simple GLA" / RetNet form, https://arxiv.org/abs/2312.06635).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.dispatch import run_chunk


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """o_t = S_t (scale q_t), S_t = exp(g_t) S_{t-1} + v_t k_t^T (g=None: plain).

    Shapes and keywords as :func:`chunk_gated_delta_rule`: q, k [B, T, H, K], v [B, T, H, V],
    g [B, T, H], initial_state [N, H, V, K]; returns (o [B, T, H, V], final [N, H, V, K] | None).
    """
    return run_chunk(q, k, v, g, None, delta=False, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                     chunk_size=chunk_size, backend=backend)
