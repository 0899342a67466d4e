"""Token loop of the gated delta rule / gated linear attention in plain torch, vectorised over
sequences: the CPU decoding path.

The naive references walk one sequence at a time, which costs a Python loop over every
(memory, sample) state of a MoM layer at every decoded token. Here the packed sequences are
laid out as ``[N, T_max]`` and each time step updates all N states in one batched operation.
Padding has zero k / v / beta and zero log-gate, which leaves a state exactly as it was, so a
sequence shorter than ``T_max`` (an empty MoM segment included) ends with its own final state.
The recurrence is the naive one (kernels/gated_delta_rule/naive.py), in float32 (float64 for
float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def recurrent_forward_torch(q, k, v, g, beta, *, delta: bool, scale: float,
                            initial_state: Optional[torch.Tensor], output_final_state: bool,
                            cu_seqlens: Optional[torch.Tensor], cu_host: Optional[list] = None
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as the naive references (shapes, ``cu_seqlens`` packing, state
    [N, H, V, K]); ``cu_host`` is ``cu_seqlens`` as a host list when the caller has it."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if delta and beta is None:
        beta = q.new_ones(B, T, H)  # a unit step on every token (padding zeroes it below)
    if cu_seqlens is None:
        N, steps, valid = B, T, None

        def pad(x):
            return x.to(dt)  # already [N = B, T, ...]
    else:
        cu = cu_host if cu_host is not None else cu_seqlens.tolist()
        N = len(cu) - 1
        lens = torch.tensor(cu, device=q.device).diff()
        steps = int(lens.max()) if N else 0
        offsets = torch.arange(steps, device=q.device)
        valid = offsets < lens[:, None]                                         # [N, steps]
        src = (torch.tensor(cu[:-1], device=q.device)[:, None] + offsets).clamp(max=max(T - 1, 0))

        def pad(x):
            rows = x[0].to(dt)[src]                                             # [N, steps, ...]
            return rows * valid.view(N, steps, *([1] * (rows.dim() - 2)))

    qs, ks, vs = pad(q) * scale, pad(k), pad(v)
    gs = pad(g) if g is not None else None
    bs = pad(beta) if delta else None
    S = (initial_state.to(dt).clone() if initial_state is not None
         else q.new_zeros(N, H, V, K, dtype=dt))
    outs = []
    for t in range(steps):
        k_t = ks[:, t]
        if gs is not None:
            S = S * gs[:, t].exp()[..., None, None]
        if delta:
            err = bs[:, t, :, None] * (vs[:, t] - torch.einsum("nhvk,nhk->nhv", S, k_t))
            S = S + err[..., None] * k_t[:, :, None, :]
        else:
            S = S + vs[:, t, :, :, None] * k_t[:, :, None, :]
        outs.append(torch.einsum("nhvk,nhk->nhv", S, qs[:, t]))
    o = torch.stack(outs, 1) if outs else q.new_zeros(N, 0, H, V, dtype=dt)
    o = o[valid][None] if valid is not None else o                             # packed again
    return o.to(v.dtype), (S if output_final_state else None)
