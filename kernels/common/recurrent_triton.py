"""Fused recurrent Triton kernel (forward only) for decoding with the gated delta rule or
(gated) linear attention: one program per (sequence, head, V block) walks the tokens and keeps
the state h = S^T [K, BV] in registers, so a decoding step is a single launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, new_buffer, next_power_of_2


@triton.jit
def _recurrent_kernel(q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, H,
                      K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_G: tl.constexpr, USE_H0: tl.constexpr, DELTA: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(0, seqlen):
        row = bos + tl.cast(i_t, tl.int64)
        b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (row * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_G:
            b_h = b_h * tl.exp(tl.load(g + row * H + i_h).to(tl.float32))
        if DELTA:
            b_beta = tl.load(beta + row * H + i_h).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + (row * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + p_kv, b_h, mask=m_kv)


def recurrent_fwd(q, k, v, g, beta, h0, cu_seqlens: torch.Tensor, scale: float, delta: bool):
    """q, k [total, H, K]; v [total, H, V]; g, beta [total, H] or None; h0 [N, H, K, V] or None.

    Returns o [total, H, V] and final states [N, H, K, V] float32.
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    n = cu_seqlens.numel() - 1
    BK = max(16, next_power_of_2(K))
    BV = max(16, min(32, next_power_of_2(V)))
    o = new_buffer(v.shape, v.dtype, q.device)
    ht = new_buffer((n, H, K, V), torch.float32, q.device)
    _recurrent_kernel[(cdiv(V, BV), n * H)](
        q, k, v, g if g is not None else q, beta if beta is not None else q, o,
        h0 if h0 is not None else q, ht, cu_seqlens, scale, H, K=K, V=V, BK=BK, BV=BV,
        USE_G=g is not None, USE_H0=h0 is not None, DELTA=delta)
    return o, ht
