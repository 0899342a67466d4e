"""Chunkwise-parallel gated delta rule / gated linear attention in plain torch (CPU fast path).

The algorithm of DESIGN.md section 7, written with batched matmuls so autograd provides the
backward. Sequences (equal length or packed by cu_seqlens) are padded to whole chunks with
zero k/v/beta and zero log-gate, which leaves the state untouched, so every sequence runs in
one batched pass and only the loop over chunks is sequential.

Within a chunk, with G the inclusive cumulative log-gate and D_ti = exp(G_t - G_i):
    A = strictly_lower(diag(b) (K K^T * D)),  T = (I + A)^-1,
    W = T diag(b exp(G)) K,  U = T diag(b) V,  V' = U - W h,
    O = (Q exp(G)) h + lower(Q K^T * D) V',  h <- exp(G_C) h + (K exp(G_C - G))^T V'.
Linear attention is the same with V' = V. States here are h = S^T, [K, V].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _pack(x: torch.Tensor, dst: Optional[torch.Tensor], n: int, tp: int) -> torch.Tensor:
    """[B, T, H, D] (or packed [1, total, H, D]) -> padded [N, Tp, H, D]."""
    if dst is None:
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, tp - x.shape[1]))
    flat = x[0]
    out = flat.new_zeros((n * tp,) + tuple(flat.shape[1:])).index_copy(0, dst, flat)
    return out.view((n, tp) + tuple(flat.shape[1:]))


def chunk_forward_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    delta: bool,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Shapes as in the naive references: q, k [B, T, H, K], v [B, T, H, V], g/beta [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        n, lens, dst = B, None, None
        tp = -(-T // C) * C
    else:
        cu = cu_seqlens.to(torch.long)
        lens = cu[1:] - cu[:-1]
        n = lens.numel()
        tp = -(-int(lens.max()) // C) * C if n else 0
        seq_id = torch.repeat_interleave(torch.arange(n, device=q.device), lens)
        pos = torch.arange(T, device=q.device) - torch.repeat_interleave(cu[:-1], lens)
        dst = seq_id * tp + pos
    nc = tp // C

    def chunked(x):  # -> [N, H, NC, C, ...]
        x = _pack(x.to(dt), dst, n, tp)
        x = x.view((n, nc, C) + tuple(x.shape[2:]))
        return x.movedim(3, 1)

    qc, kc, vc = chunked(q) * scale, chunked(k), chunked(v)
    G = chunked(g).cumsum(-1) if g is not None else qc.new_zeros(n, H, nc, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    if delta:
        bc = chunked(beta) if beta is not None else qc.new_ones(n, H, nc, C)
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
        eye = torch.eye(C, dtype=dt, device=q.device)
        Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False,
                                             unitriangular=True)
        W = Tinv @ (kc * (bc * G.exp())[..., None])
        U = Tinv @ (vc * bc[..., None])
    if initial_state is not None:
        h = initial_state.to(dt).transpose(-1, -2)
    else:
        h = qc.new_zeros(n, H, K, V)
    # Everything but the state recurrence is batched over chunks; the loop reads per-chunk
    # views from unbind, whose backward is one stack (indexing x[:, :, c] instead would make
    # autograd zero-fill a full-size gradient per chunk: quadratic in T).
    g_last = G[..., -1:]
    q_dec = qc * G.exp()[..., None]
    intra = (qc @ kc.transpose(-1, -2)) * decay
    k_dec = kc * (g_last - G).exp()[..., None]
    state_decay = g_last.exp()[..., None]
    per_chunk = [x.unbind(2) for x in (q_dec, intra, k_dec, state_decay)]
    per_chunk += [U.unbind(2), W.unbind(2)] if delta else [vc.unbind(2)]
    outs = []
    for c in range(nc):
        q_c, intra_c, k_c, decay_c, *ev = (x[c] for x in per_chunk)
        e = ev[0] - ev[1] @ h if delta else ev[0]
        outs.append(q_c @ h + intra_c @ e)
        h = h * decay_c + k_c.transpose(-1, -2) @ e
    if nc:
        o = torch.stack(outs, 2).movedim(1, 3).reshape(n, tp, H, V)
    else:
        o = qc.new_zeros(n, 0, H, V)
    if dst is None:
        o = o[:, :T]
    else:
        o = o.reshape(n * tp, H, V)[dst][None]
    final = h.transpose(-1, -2) if output_final_state else None
    return o.to(v.dtype), final
