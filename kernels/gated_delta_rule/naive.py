"""Executable spec of the gated delta rule: a plain token-by-token loop.

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,    o_t = S_t (scale * q_t)

with a_t = exp(g_t) and the state S_t of shape [V, K] per head (Gated DeltaNet,
https://arxiv.org/abs/2412.06464). Computes in float32, or float64 when the inputs are float64,
so it doubles as the reference for every fast path and for gradcheck.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.utils import check_inputs, split_seqs


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay, <= 0), beta: [B, T, H].

    scale multiplies q (default K ** -0.5). With cu_seqlens ([N+1]) the inputs are packed as
    [1, total, H, D] and every sequence starts from its own state. initial_state: [N, H, V, K].
    Returns o [B, T, H, V] in v's dtype and the final state [N, H, V, K] (float32/float64) or None.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale=scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    outs, finals = [], []
    for n, (b, s, e) in enumerate(split_seqs(cu_seqlens, B, T)):
        if initial_state is not None:
            S = initial_state[n].to(dt)
        else:
            S = q.new_zeros(H, V, K, dtype=dt)
        o_seq = []
        for t in range(s, e):
            q_t, k_t, v_t = q[b, t].to(dt) * scale, k[b, t].to(dt), v[b, t].to(dt)
            if g is not None:
                S = S * g[b, t].to(dt).exp()[:, None, None]
            b_t = beta[b, t].to(dt)[:, None] if beta is not None else 1.0
            # S (I - b k k^T) + b v k^T  ==  S + (b (v - S k)) k^T
            err = b_t * (v_t - torch.einsum("hvk,hk->hv", S, k_t))
            S = S + err[:, :, None] * k_t[:, None, :]
            o_seq.append(torch.einsum("hvk,hk->hv", S, q_t))
        outs.append(torch.stack(o_seq, 0) if o_seq else q.new_zeros(0, H, V, dtype=dt))
        finals.append(S)
    o = torch.cat(outs, 0)[None] if cu_seqlens is not None else torch.stack(outs, 0)
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), final
