"""Chunkwise-parallel gated delta rule / gated linear attention in plain torch (CPU fast path).

The algorithm of DESIGN.md section 7, written with batched matmuls so autograd provides the
backward. Within a chunk, with G the inclusive cumulative log-gate and D_ti = exp(G_t - G_i):
    A = strictly_lower(diag(b) (K K^T * D)),  (I + A) [U | W] = diag(b) [V | exp(G) K],
    V' = U - W h,  O = (Q exp(G)) h + lower(Q K^T * D) V',  h <- exp(G_C) h + (K exp(G_C - G))^T V'.
Linear attention is the same with V' = V. States here are h = S^T, [K, V].

Sequences (equal length or packed by cu_seqlens) run in groups that share a padded length, so
one batched pass serves a group and only the loop over its chunks is sequential. Sequences
longer than the chunk size form one group padded to whole chunks. Shorter ones are one chunk
of their group's length, so they cost their own length squared rather than the chunk size
squared (a MoM layer's (memory, sample) segments are mostly short): lengths join a group while
padding its members up to the next length costs less than a group's own fixed cost. Empty
sequences are skipped and return their initial state. Padding has zero k/v/beta and zero
log-gate, which leaves the state untouched.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

# The fixed CPU cost of one group (about 90 autograd ops) in units of padded work, heads x
# rows x (rows + K) per sequence: measured on the dev machine (RESULTS.md, issue 16).
GROUP_COST = 16384


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


class _UnitLowerSolve(torch.autograd.Function):
    """X = (I + strictly_lower(A))^-1 R for batches of A [.., C, C] and R [.., C, V]; A's
    diagonal and upper triangle are never read. Both directions are solved from the right
    (X^T (I + L)^T = R^T), which LAPACK's batched path runs about twice as fast on the CPU as
    the left solve that torch's own backward uses."""

    @staticmethod
    def forward(ctx, A, R):
        X = torch.linalg.solve_triangular(A.mT, R.mT, upper=True, unitriangular=True,
                                          left=False).mT
        ctx.save_for_backward(A, X)
        return X

    @staticmethod
    def backward(ctx, dX):
        A, X = ctx.saved_tensors
        dR = torch.linalg.solve_triangular(A, dX.mT, upper=False, unitriangular=True,
                                           left=False).mT  # (I + L)^-T dX
        return -(dR @ X.mT).tril_(-1), dR


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))]).index_select(0, idx)


def _groups(lens: List[int], C: int, H: int, K: int) -> List[Tuple[int, List[int]]]:
    """(padded length, sequence ids) per group, shortest first; empty sequences in none."""
    by_len: Dict[int, List[int]] = {}
    for s, n in enumerate(lens):
        if n:
            by_len.setdefault(n, []).append(s)
    work = lambda n: H * n * (n + K)  # noqa: E731 (a sequence's padded work at length n)
    groups, ids, p, long_ids = [], [], 0, []
    for n in sorted(by_len):
        if n > C:
            long_ids += by_len[n]
            continue
        if ids and len(ids) * (work(n) - work(p)) > GROUP_COST:
            groups.append((p, ids))
            ids = []
        ids, p = ids + by_len[n], n
    if ids:
        groups.append((p, ids))
    if long_ids:
        groups.append((-(-max(lens) // C) * C, long_ids))
    return groups


def _run_group(x: torch.Tensor, h0: Optional[torch.Tensor], C: int, K: int, V: int,
               delta: bool, gated: bool, has_beta: bool, need_final: bool
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x: [n, H, p, F] padded features (scaled q | k | v | g | beta) -> o [n, H, p, V] and
    the final state [n, H, K, V] (None unless need_final)."""
    n, H, p, F = x.shape
    nc = p // C
    x = x.view(n, H, nc, C, F)
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
        UW = _UnitLowerSolve.apply(A, rhs)
        U, W = UW.split([V, K], -1) if use_h else (UW, None)
    else:
        U, W = v, None
    if not use_h:
        o = intra.squeeze(2) @ U.squeeze(2)
        final = None
        if need_final:
            k_dec = k.squeeze(2) * (G[..., -1:] - G).exp().squeeze(2)[..., None] if gated \
                else k.squeeze(2)
            final = k_dec.transpose(-1, -2) @ U.squeeze(2)
        return o, final
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
    return torch.stack(outs, 2).view(n, H, p, V), h if need_final else None


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
    x = x.reshape(total * H, x.shape[-1])  # rows (token, head)

    groups = _groups(lens, chunk_size, H, K)
    starts = torch.tensor(cu[:-1], device=dev)
    seq_len = torch.tensor(lens, device=dev)
    heads = torch.arange(H, device=dev)[:, None]
    src = []
    for p, ids in groups:  # padded (sequence, head, position) -> (token, head) row
        ids_t = torch.tensor(ids, device=dev)
        pos = torch.arange(p, device=dev)
        rows = (starts[ids_t, None] + pos)[:, None] * H + heads
        src.append(rows.masked_fill((pos >= seq_len[ids_t, None])[:, None], total * H))
    src = torch.cat([r.reshape(-1) for r in src]) if src else starts.new_zeros(0)
    real = src < total * H
    back = torch.empty(total * H, dtype=torch.long, device=dev).scatter_(
        0, src[real], torch.arange(src.numel(), device=dev)[real])
    padded = _MoveRows.apply(x, src, back)

    h0 = initial_state.to(dt).transpose(-1, -2) if initial_state is not None else None
    outs, finals = [], []
    pieces = padded.split([len(ids) * H * p for p, ids in groups])  # split: one backward node
    for (p, ids), rows in zip(groups, pieces):
        h0_g = h0.index_select(0, torch.tensor(ids, device=dev)) if h0 is not None else None
        o_g, f_g = _run_group(rows.view(len(ids), H, p, -1), h0_g, min(p, chunk_size), K, V,
                              delta, gated, has_beta, output_final_state)
        outs.append(o_g.reshape(-1, V))
        finals.append(f_g)
    o = torch.cat(outs) if outs else x.new_zeros(0, V)
    o = _MoveRows.apply(o, back, src)
    o = o.view(B, T, H, V) if cu_seqlens is None else o.view(1, total, H, V)
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
