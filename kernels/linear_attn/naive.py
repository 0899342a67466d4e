"""Executable spec of (gated) linear attention: a plain token-by-token loop.

    S_t = a_t S_{t-1} + v_t k_t^T,    o_t = S_t (scale * q_t)

with a_t = exp(g_t) a scalar decay per head and token (g = None: plain linear attention,
https://arxiv.org/abs/2006.16236; with g: the scalar-gated form used by RetNet/Mamba-2-style
"simple GLA", https://arxiv.org/abs/2312.06635). State [V, K] per head, as for the delta rule.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.utils import check_inputs, split_seqs


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay, <= 0): [B, T, H] or None.

    Same conventions as :func:`naive_gated_delta_rule` (scale, cu_seqlens, state [N, H, V, K]).
    """
    check_inputs(q, k, v, g, None, initial_state, cu_seqlens, scale=scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    outs, finals = [], []
    for n, (b, s, e) in enumerate(split_seqs(cu_seqlens, B, T)):
        S = initial_state[n].to(dt) if initial_state is not None else q.new_zeros(H, V, K, dtype=dt)
        o_seq = []
        for t in range(s, e):
            if g is not None:
                S = S * g[b, t].to(dt).exp()[:, None, None]
            S = S + v[b, t].to(dt)[:, :, None] * k[b, t].to(dt)[:, None, :]
            o_seq.append(torch.einsum("hvk,hk->hv", S, q[b, t].to(dt) * scale))
        outs.append(torch.stack(o_seq, 0) if o_seq else q.new_zeros(0, H, V, dtype=dt))
        finals.append(S)
    o = torch.cat(outs, 0)[None] if cu_seqlens is not None else torch.stack(outs, 0)
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), final
