"""Chunkwise-parallel gated delta rule / gated linear attention in plain torch (CPU fast path).

The algorithm of DESIGN.md section 7, written with batched matmuls so autograd provides the
backward. Within a chunk, with G the inclusive cumulative log-gate and D_ti = exp(G_t - G_i):
    A = strictly_lower(diag(b) (K K^T * D)),  (I + A) [U | W] = diag(b) [V | exp(G) K],
    V' = U - W h,  O = (Q exp(G)) h + lower(Q K^T * D) V',  h <- exp(G_C) h + (K exp(G_C - G))^T V'.
Linear attention is the same with V' = V. States here are h = S^T, [K, V].

Sequences (equal length or packed by cu_seqlens) run in groups that share a padded length, so
one batched pass serves a group and only the loop over its chunks is sequential. A sequence
longer than the chunk size joins the group padded to whole chunks; a shorter one is padded to
the next multiple of ``SHORT_STEP`` and is one chunk of that size, so it costs its own length
squared rather than the chunk size squared (a MoM layer's (memory, sample) segments are
mostly short); an empty one is skipped and returns its initial state. Padding has zero
k/v/beta and zero log-gate, which leaves the state untouched.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

SHORT_STEP = 16  # padding granularity of sequences up to one chunk (measured: 8 is no faster)


class _MoveRows(torch.autograd.Function):
    """y = [x; 0].index_select(0, src): rows of x moved (each at most once), zero rows where
    src == len(x). Its backward is the same kind of gather with the inverse map ``back``
    (len(y) where a row of x was dropped), not index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x, src, back):
        ctx.save_for_backward(back)
        return _gather(x, src)

    @staticmethod
    def backward(ctx, grad):
        back, = ctx.saved_tensors
        return _gather(grad, back), None, None


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))]).index_select(0, idx)


def _groups(lens: List[int], C: int) -> List[Tuple[int, List[int]]]:
    """(padded length, sequence ids) per group; empty sequences belong to none."""
    by_len = {}
    longest = max([n for n in lens if n > C], default=0)
    for s, n in enumerate(lens):
        if n > C:
            p = -(-longest // C) * C
        elif n > 0:
            p = min(-(-n // SHORT_STEP) * SHORT_STEP, C)
        else:
            continue
        by_len.setdefault(p, []).append(s)
    return sorted(by_len.items())


def _run_group(x: torch.Tensor, h0: Optional[torch.Tensor], C: int, K: int, V: int,
               delta: bool, gated: bool, has_beta: bool, need_final: bool
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x: [n, p, H, F] padded features (scaled q | k | v | g | beta) -> o [n, p, H, V] and
    the final state [n, H, K, V] (None unless need_final)."""
    n, p, H, F = x.shape
    nc = p // C
    x = x.transpose(1, 2).contiguous().view(n, H, nc, C, F)  # row slices stay BLAS-friendly
    # split, not slices: one backward node (each slice would zero-fill a full-size gradient)
    q, k, v, *gb = x.split([K, K, V] + [1] * (F - 2 * K - V), -1)
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    if gated:
        G = gb[0][..., 0].cumsum(-1)
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    else:
        G, decay = None, causal.to(x.dtype)
    intra = (q @ k.transpose(-1, -2)) * decay
    use_h = h0 is not None or nc > 1
    if delta:
        b = gb[-1] if has_beta else torch.ones_like(v[..., :1])
        rhs = v * b
        if use_h:
            rhs = torch.cat([rhs, k * (b * G[..., None].exp() if gated else b)], -1)
        # Only A's strict lower triangle is read (unitriangular): no mask, no identity.
        A = ((k * b) @ k.transpose(-1, -2)) * decay
        UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        U, W = (UW[..., :V], UW[..., V:]) if use_h else (UW, None)
    else:
        U, W = v, None
    if not use_h:
        o = intra.squeeze(2) @ U.squeeze(2)
        final = None
        if need_final:
            k_dec = k.squeeze(2) * (G[..., -1:] - G).exp().squeeze(2)[..., None] if gated \
                else k.squeeze(2)
            final = k_dec.transpose(-1, -2) @ U.squeeze(2)
        return o.transpose(1, 2), final
    # Per-chunk views from unbind, whose backward is one stack (indexing x[:, :, c] instead
    # would make autograd zero-fill a full-size gradient per chunk: quadratic in T).
    if gated:
        g_last = G[..., -1:]
        q_dec, k_dec = q * G.exp()[..., None], k * (g_last - G).exp()[..., None]
        state_decay = g_last.exp()[..., None]
    else:
        q_dec, k_dec, state_decay = q, k, None
    per_chunk = [t.unbind(2) for t in (q_dec, intra, k_dec, U)]
    if delta:
        per_chunk.append(W.unbind(2))
    if gated:
        per_chunk.append(state_decay.unbind(2))
    h, outs = h0, []
    for c in range(nc):
        q_c, intra_c, k_c, u_c, *rest = (t[c] for t in per_chunk)
        w_c = rest.pop(0) if delta else None
        e = u_c - w_c @ h if delta and h is not None else u_c
        o_c = intra_c @ e
        outs.append(o_c if h is None else o_c + q_c @ h)
        if c < nc - 1 or need_final:
            upd = k_c.transpose(-1, -2) @ e
            h = upd if h is None else (h * rest[0] if gated else h) + upd
    o = torch.stack(outs, 2).view(n, H, p, V)
    return o.transpose(1, 2), h if need_final else None


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
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    cu = [b * T for b in range(B + 1)] if cu_seqlens is None else cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    n, total = len(lens), cu[-1]
    gated, has_beta = g is not None, delta and beta is not None
    feats = [q.to(dt) * scale, k.to(dt), v.to(dt)]
    feats += [g.to(dt)[..., None]] if gated else []
    feats += [beta.to(dt)[..., None]] if has_beta else []
    x = torch.cat(feats, -1)
    x = x.reshape(total, H, x.shape[-1])

    groups = _groups(lens, chunk_size)
    starts = torch.tensor(cu[:-1], device=dev)
    seq_len = torch.tensor(lens, device=dev)
    src = []
    for p, ids in groups:  # padded row -> packed row (total: a zero row)
        ids_t = torch.tensor(ids, device=dev)
        pos = torch.arange(p, device=dev)
        rows = starts[ids_t, None] + pos
        src.append(rows.masked_fill(pos >= seq_len[ids_t, None], total).reshape(-1))
    src = torch.cat(src) if src else torch.zeros(0, dtype=torch.long, device=dev)
    real = src < total
    back = torch.empty(total, dtype=torch.long, device=dev).scatter_(
        0, src[real], torch.arange(src.numel(), device=dev)[real])
    padded = _MoveRows.apply(x, src, back)

    h0 = initial_state.to(dt).transpose(-1, -2) if initial_state is not None else None
    outs, finals = [], []
    pieces = padded.split([len(ids) * p for p, ids in groups])  # split: one backward node
    for (p, ids), rows in zip(groups, pieces):
        rows = rows.view(len(ids), p, H, -1)
        h0_g = h0.index_select(0, torch.tensor(ids, device=dev)) if h0 is not None else None
        o_g, f_g = _run_group(rows, h0_g, min(p, chunk_size), K, V, delta, gated, has_beta,
                              output_final_state)
        outs.append(o_g.reshape(-1, H, V))
        finals.append(f_g)
    o = torch.cat(outs) if outs else x.new_zeros(0, H, V)
    o = _MoveRows.apply(o, back, src).view(B, T, H, V) if cu_seqlens is None else \
        _MoveRows.apply(o, back, src)[None]
    final = None
    if output_final_state:
        # Computed states in group order, then every sequence's initial state (or zeros).
        where = [0] * n
        for i, s in enumerate(s for _, ids in groups for s in ids):
            where[s] = i + 1
        done = sum(len(ids) for _, ids in groups)
        rest = h0 if h0 is not None else x.new_zeros(1, H, K, V)
        pool = torch.cat(finals + [rest]) if finals else rest
        idx = [w - 1 if w else done + (s if h0 is not None else 0) for s, w in enumerate(where)]
        final = pool.index_select(0, torch.tensor(idx, device=dev)).transpose(-1, -2)
    return o.to(v.dtype), final
