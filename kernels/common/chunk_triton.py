"""Triton kernels of the chunkwise gated delta rule and (gated) linear attention.

Both ops share one state recurrence over chunks, so they share the kernels here; ``DELTA``
switches the delta-rule parts (WY transform, V' = U - W h) on. The math is DESIGN.md section 7
and ``chunk_torch.py``; states are stored as h = S^T, [K, V]. All tensors are flattened to
[total, H, D] with the sequence layout in ``SeqLayout`` (chunks never cross sequences).

Forward:  prep (gate cumsum, T = (I + A)^-1, W, U)  ->  state scan over chunks (h per chunk,
V')  ->  output (parallel over chunks).
Backward: recompute prep and the state scan (per-chunk states are not kept from the forward),
reverse scan for dh and dV', then two parallel passes per chunk: dq, dk, dg through the output
and the state, then through the WY transform (dv, dbeta, the rest of dk and dg).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import SeqLayout, autotune_configs, cdiv, new_buffer, next_power_of_2, sm_count


def _configs(warps=(4,), stages=(2,)):
    """Few configs on purpose: every config is one more compile of a large kernel."""
    return autotune_configs([triton.Config({}, num_warps=w, num_stages=s)
                             for w in warps for s in stages])


@triton.jit
def _gate_rows(bos, o_t, seqlen):
    """Rows to read the cumulative log-gate G from: past the sequence end, its last row.

    Padding rows so carry the last valid G, like tokens that do not decay (the prep kernel's
    cumsum over zero-padded g gives them the same). Read as 0 instead, exp(G_t - G_i) of a
    padding row t overflowed against a valid row i decayed past -88, and 0 * inf = NaN
    reached the valid rows through the dots. With g <= 0 every G_t - G_i, t >= i, is <= 0.
    """
    return bos + tl.minimum(o_t, seqlen - 1)


@triton.jit
def _decay(b_d, mask):
    """exp(b_d) where mask, else 0: masked before the exp, so the exponents outside the mask
    (G_t - G_i > 0 above the diagonal) form no inf."""
    return tl.exp(tl.where(mask, b_d, float("-inf")))


@triton.jit
def _chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """Global token rows of chunk i_c, their validity mask, the chunk's last valid row and the
    rows that its cumulative gate is read from (:func:`_gate_rows`)."""
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < eos - bos
    last = tl.minimum(i_t * BT + BT, eos - bos) - 1 - i_t * BT
    return bos + o_t, m_t, last, _gate_rows(bos, o_t, eos - bos)


@triton.jit
def _l2normed(b_x):
    """Rows scaled to unit L2 norm (fp32 math, eps 1e-6 as ``utils.l2norm``) and 1/norm."""
    b_xf = b_x.to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_xf * b_xf, 1) + 1e-6)
    return (b_xf * b_r[:, None]).to(b_x.dtype), b_r


@triton.jit
def _chunk_qk(q, k, rows, m_t, i_h, H, K: tl.constexpr, BK: tl.constexpr, L2: tl.constexpr):
    """One chunk's q and k tiles of head i_h, [BT, BK] (zeros past K and past the sequence),
    L2-normalised with L2. (The scans keep their own loads: sharing the offsets between k and
    w there keeps fewer registers live.)"""
    o_k = tl.arange(0, BK)
    p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    if L2:
        b_q, _ = _l2normed(b_q)
        b_k, _ = _l2normed(b_k)
    return b_q, b_k


@triton.jit
def _diag_blocks(b_X, NB: tl.constexpr):
    """The NB diagonal 16 x 16 blocks of b_X [NB * 16, NB * 16], as [NB, 16, 16]."""
    o_b = tl.arange(0, NB)
    same = o_b[:, None, None, None] == o_b[None, None, :, None]
    return tl.sum(tl.where(same, tl.reshape(b_X, [NB, 16, NB, 16]), 0.0), 2)


@triton.jit
def _inverse_unit_lower(b_A, BT: tl.constexpr):
    """(I + A)^-1 for strictly lower A [BT, BT] (BT in 16, 32, 64, 128), on the tensor cores.

    A strictly lower n x n matrix L is nilpotent, so (I + L)^-1 = (I - L)(I + L^2)(I + L^4)...
    exactly, with log2(n) squarings instead of n substitution steps.
    1. The BT / 16 diagonal 16 x 16 blocks as one batch of small products:
       D = (I + A_bd)^-1 = (I - A_bd)(I + A_bd^2)(I + A_bd^4)(I + A_bd^8).
    2. (I + A) = (I + A_bd)(I + M) with M = D A_off strictly block-lower, M^(BT/16) = 0:
       (I + A)^-1 = (I - M)(I + M^2)(I + M^4) D. The products with the block-diagonal D
       (forming M, applying D last) are batched per block row / column too, so only the
       squarings of M are full BT x BT products.
    Small blocks first keep the powers small: in a 16 x 16 block the entries of A_bd^8 grow at
    most like C(15, 8) |A|^8, against C(63, 32) |A|^32 for one 64 x 64 product chain.
    Products of fp32 matrices use three-pass tf32 (about fp32 accuracy), also for bf16 inputs:
    one-pass tf32 is amplified along the chain to errors of order 1 with correlated keys and
    beta up to 2 (perf/wy_inverse_precision.py).
    """
    NB: tl.constexpr = BT // 16
    o = tl.arange(0, 16)
    b_L = _diag_blocks(b_A, NB)
    b_D = tl.where(o[:, None] == o[None, :], 1.0, 0.0)[None, :, :] - b_L
    for _ in tl.static_range(3):  # X (I + Y) as X + X Y: no identity matrix is kept around
        b_L = tl.dot(b_L, b_L, input_precision="tf32x3")
        b_D = tl.dot(b_D, b_L, b_D, input_precision="tf32x3")
    if NB == 1:
        return tl.reshape(b_D, [BT, BT])
    o_t = tl.arange(0, BT)
    b_off = tl.where((o_t[:, None] // 16) == (o_t[None, :] // 16), 0.0, b_A)
    # M = D A_off, block row by block row.
    b_M = tl.reshape(tl.dot(b_D, tl.reshape(b_off, [NB, 16, BT]), input_precision="tf32x3"),
                     [BT, BT])
    b_P = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0) - b_M
    if NB > 2:
        b_M = tl.dot(b_M, b_M, input_precision="tf32x3")
        b_P = tl.dot(b_P, b_M, b_P, input_precision="tf32x3")
        if NB > 4:
            b_M = tl.dot(b_M, b_M, input_precision="tf32x3")
            b_P = tl.dot(b_P, b_M, b_P, input_precision="tf32x3")
    # P D, block column by block column.
    b_P = tl.permute(tl.reshape(b_P, [BT, NB, 16]), (1, 0, 2))
    b_T = tl.dot(b_P, b_D, input_precision="tf32x3")
    return tl.reshape(tl.permute(b_T, (1, 0, 2)), [BT, BT])


@triton.jit
def _wy_inverse(b_k, b_beta, b_G, BT: tl.constexpr, PREC: tl.constexpr):
    """T = (I + strictly_lower(diag(beta) (K K^T * exp(G_t - G_i))))^-1 in fp32."""
    o = tl.arange(0, BT)
    strict = o[:, None] > o[None, :]
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    b_A = b_beta[:, None] * b_kk * _decay(b_G[:, None] - b_G[None, :], strict)
    return _inverse_unit_lower(b_A, BT)


@triton.autotune(configs=_configs((4, 8)),
                 key=["BT", "BK", "BV", "USE_G", "DELTA", "STORE_T", "LOAD_T"])
@triton.jit
def _prep_kernel(k, v, g, beta, gcum, w, u, tmat, A_log, dt_bias, cu_seqlens, chunk_indices,
                 H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr,
                 STORE_T: tl.constexpr, LOAD_T: tl.constexpr, GATE: tl.constexpr,
                 L2: tl.constexpr, PREC: tl.constexpr):
    """Gate cumsum and, for the delta rule, T = (I + A)^-1, W and U of one chunk.

    STORE_T keeps T, [total, H, BT] fp32 row by row, for the gradient kernels; LOAD_T reads
    the T that the forward kept instead of inverting again (the backward's recompute).
    GATE: g holds the gate logits a and the log-decay -exp(A_log) softplus(a + dt_bias) is
    formed here. L2: k is L2-normalised on load.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, last, g_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    if USE_G:
        b_g = tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        if GATE:
            b_x = b_g + tl.load(dt_bias + i_h).to(tl.float32)
            b_sp = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
            b_g = tl.where(m_t, -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_sp, 0.0)
        b_G = tl.cumsum(b_g, 0)
        tl.store(gcum + rows * H + i_h, b_G, mask=m_t)
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
    if DELTA:
        o_k = tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        if L2:
            b_k, _ = _l2normed(b_k)
        dt = b_k.dtype
        b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        p_T = tmat + (rows[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :]
        if LOAD_T:
            b_Tf = tl.load(p_T, mask=m_t[:, None], other=0.0)
        else:
            b_Tf = _wy_inverse(b_k, b_beta, b_G, BT, PREC)
        if STORE_T:
            tl.store(p_T, b_Tf, mask=m_t[:, None])
        b_T = b_Tf.to(dt)
        b_kb = (b_k * (b_beta * tl.exp(b_G))[:, None]).to(dt)
        b_w = tl.dot(b_T, b_kb, input_precision=PREC)
        tl.store(w + p_k, b_w.to(w.dtype.element_ty), mask=m_tk)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
            b_v = tl.load(v + p_v, mask=m_tv, other=0.0)
            b_u = tl.dot(b_T, (b_v * b_beta[:, None]).to(dt), input_precision=PREC)
            tl.store(u + p_v, b_u.to(u.dtype.element_ty), mask=m_tv)


@triton.autotune(configs=_configs((4, 8), (2, 3, 4)), key=["BT", "BK", "BV", "USE_G", "DELTA"])
@triton.jit
def _fwd_h_kernel(k, u, w, gcum, h_all, v_new, h0, ht, cu_seqlens, chunk_offsets, H,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr,
                  DELTA: tl.constexpr, L2: tl.constexpr, PREC: tl.constexpr):
    """Sequential scan over one sequence's chunks for one head and one block of V."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_s in range(0, tl.cdiv(seqlen, BT)):
        i_t = tl.cast(i_s, tl.int64)
        tl.store(h_all + ((boh + i_t) * H + i_h) * K * V + p_kv,
                 b_h.to(h_all.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seqlen
        rows = bos + o_t
        g_rows = _gate_rows(bos, o_t, seqlen)
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        if L2:
            b_k, _ = _l2normed(b_k)
        b_e = tl.load(u + p_v, mask=m_tv, other=0.0).to(tl.float32)
        if DELTA:
            b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
            b_e -= tl.dot(b_w, b_h.to(b_w.dtype), input_precision=PREC)
            tl.store(v_new + p_v, b_e.to(v_new.dtype.element_ty), mask=m_tv)
        if USE_G:
            b_G = tl.load(gcum + g_rows * H + i_h)
            g_last = tl.load(gcum + (bos + tl.minimum(i_t * BT + BT, seqlen) - 1) * H + i_h)
            b_e = b_e * tl.exp(g_last - b_G)[:, None]
            b_h = b_h * tl.exp(g_last)
        b_h += tl.dot(tl.trans(b_k), b_e.to(b_k.dtype), input_precision=PREC)
    tl.store(ht + i_nh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)


@triton.autotune(configs=_configs((4, 8), (2, 3)), key=["BT", "BK", "BV", "USE_G", "L2"])
@triton.jit
def _fwd_o_kernel(q, k, e, gcum, h_all, o, cu_seqlens, chunk_indices, scale, H,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr, PREC: tl.constexpr):
    """O = scale ((Q exp(G)) h + causal(Q K^T * exp(G_t - G_i)) V') for one chunk."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, last, g_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_q, b_k = _chunk_qk(q, k, rows, m_t, i_h, H, K, BK, L2)
    b_h = tl.load(h_all + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
    b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    if USE_G:
        b_G = tl.load(gcum + g_rows * H + i_h)
        b_o = b_o * tl.exp(b_G)[:, None]
        b_s = b_s * _decay(b_G[:, None] - b_G[None, :], causal)
    else:
        b_s = tl.where(causal, b_s, 0.0)
    b_e = tl.load(e + p_v, mask=m_tv, other=0.0)
    b_o = (b_o + tl.dot(b_s.to(b_e.dtype), b_e, input_precision=PREC)) * scale
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.autotune(configs=_configs((4, 8)), key=["BT", "BK", "BV", "USE_G", "L2"])
@triton.jit
def _bwd_dv_local_kernel(q, k, gcum, do, de_local, cu_seqlens, chunk_indices, scale, H,
                         K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr,
                         PREC: tl.constexpr):
    """P^T dO per chunk (P = scale causal(Q K^T * D)), fp32: the part of dV' that does not
    depend on the state, in parallel over chunks, so fewer products sit on the reverse scan's
    sequential path (-8 % forward+backward at T = 16384 on an H200, RESULTS.md)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, last, g_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_q, b_k = _chunk_qk(q, k, rows, m_t, i_h, H, K, BK, L2)
    o_i = tl.arange(0, BT)
    causal_t = o_i[:, None] <= o_i[None, :]
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [i, t] = k_i . q_t
    if USE_G:
        b_G = tl.load(gcum + g_rows * H + i_h)
        b_st = b_st * _decay(b_G[None, :] - b_G[:, None], causal_t)
    else:
        b_st = tl.where(causal_t, b_st, 0.0)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    b_de = tl.dot(b_st.to(b_do.dtype), b_do, input_precision=PREC) * scale
    tl.store(de_local + p_v, b_de, mask=m_tv)


@triton.autotune(configs=_configs((4, 8), (2, 3)),
                 key=["BT", "BK", "BV", "USE_G", "DELTA", "DV_LOCAL"])
@triton.jit
def _bwd_dh_kernel(q, k, w, gcum, do, de_local, de, dh_all, dht, dh0, cu_seqlens, chunk_offsets,
                   scale, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                   USE_DHT: tl.constexpr, DELTA: tl.constexpr, L2: tl.constexpr,
                   PREC: tl.constexpr, DV_LOCAL: tl.constexpr):
    """Reverse scan: dh (w.r.t. the state after each chunk) and dV' = P^T dO + K~ dh.

    DV_LOCAL: P^T dO is read from de_local (fp32, from ``_bwd_dv_local_kernel``) instead of
    formed here; off only with ``_reverse_scan(local_first=False)``, the earlier version.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    nt = tl.cdiv(seqlen, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    o_i = tl.arange(0, BT)
    causal_t = o_i[:, None] <= o_i[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    for i_s in range(0, nt):
        i_t = nt - 1 - tl.cast(i_s, tl.int64)
        tl.store(dh_all + ((boh + i_t) * H + i_h) * K * V + p_kv,
                 b_dh.to(dh_all.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + o_i
        m_t = o_t < seqlen
        rows = bos + o_t
        g_rows = _gate_rows(bos, o_t, seqlen)
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        # Each operand is loaded where it is first needed and scaled straight to the input
        # dtype (the dots take it rounded anyway): short live ranges, fewer spills.
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        dt = b_do.dtype
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        if L2:
            b_k, _ = _l2normed(b_k)
        if USE_G:
            b_G = tl.load(gcum + g_rows * H + i_h)
            g_last = tl.load(gcum + (bos + tl.minimum(i_t * BT + BT, seqlen) - 1) * H + i_h)
        if DV_LOCAL:
            b_de = tl.load(de_local + p_v, mask=m_tv, other=0.0)
        else:
            b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
            if L2:
                b_q, _ = _l2normed(b_q)
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [i, t] = k_i . q_t
            if USE_G:
                b_st = b_st * _decay(b_G[None, :] - b_G[:, None], causal_t)
            else:
                b_st = tl.where(causal_t, b_st, 0.0)
            b_de = tl.dot(b_st.to(dt), b_do, input_precision=PREC) * scale
        if USE_G:
            b_ks = (b_k.to(tl.float32) * tl.exp(g_last - b_G)[:, None]).to(dt)
        else:
            b_ks = b_k
        b_de += tl.dot(b_ks, b_dh.to(dt), input_precision=PREC)
        tl.store(de + p_v, b_de.to(de.dtype.element_ty), mask=m_tv)
        if DV_LOCAL:
            b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
            if L2:
                b_q, _ = _l2normed(b_q)
        b_qs = b_q.to(tl.float32) * scale
        if USE_G:
            b_qs = b_qs * tl.exp(b_G)[:, None]
        b_dh_new = tl.dot(tl.trans(b_qs.to(dt)), b_do, input_precision=PREC)
        if DELTA:
            b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
            b_dh_new -= tl.dot(tl.trans(b_w), b_de.to(dt), input_precision=PREC)
        if USE_G:
            b_dh = b_dh * tl.exp(g_last)
        b_dh += b_dh_new
    tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


@triton.autotune(configs=_configs((4, 8)), key=["BT", "BK", "BV", "USE_G", "DELTA", "L2"])
@triton.jit
def _bwd_qk_kernel(q, k, e, gcum, h_all, dh_all, do, dq, dk, dg, cu_seqlens, chunk_indices,
                   scale, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr,
                   L2: tl.constexpr, PREC: tl.constexpr):
    """Per-chunk dq, dk and dg through the output and the state update, given h (state
    before), dh (grad of the state after) and V'.

    dq is final. With DELTA, dk (fp32, before the L2 backward) and dG (per-token grad of the
    cumulative gate, before the reverse cumsum) are partial, completed by _bwd_wy_kernel;
    without it both are final. Split from the WY part so that each kernel keeps fewer
    [BT, K] accumulators in registers.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, last, g_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    if L2:
        b_q, b_rq = _l2normed(b_q)
        b_k, b_rk = _l2normed(b_k)
    dt = b_q.dtype
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    p_h = h_all + (i_c.to(tl.int64) * H + i_h) * K * V
    p_dh = dh_all + (i_c.to(tl.int64) * H + i_h) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_vk = (o_v < V)[:, None] & (o_k < K)[None, :]
        b_e = tl.load(e + p_v, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        b_ht = tl.load(p_h + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0).to(dt)
        b_dht = tl.load(p_dh + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0).to(dt)
        b_dq += tl.dot(b_do, b_ht, input_precision=PREC)
        b_dk += tl.dot(b_e, b_dht, input_precision=PREC)
        b_dP += tl.dot(b_do, tl.trans(b_e), input_precision=PREC)
        if USE_G:
            b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
    causal = o_i[:, None] >= o_i[None, :]
    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)
    if USE_G:
        b_G = tl.load(gcum + g_rows * H + i_h)
        g_last = tl.sum(tl.where(o_i == last, b_G, 0.0), 0)
        b_dS = b_dP * _decay(b_G[:, None] - b_G[None, :], causal) * scale
        b_dq = b_dq * (tl.exp(b_G) * scale)[:, None]
        b_dk = b_dk * tl.exp(g_last - b_G)[:, None]
        b_dG = tl.sum(b_dq * b_qf, 1) - tl.sum(b_dk * b_kf, 1)
        b_dglast = tl.sum(b_dk * b_kf) + tl.sum(b_dgl) * tl.exp(g_last)
        b_Y = b_dS * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_dG += tl.sum(b_Y, 1) - tl.sum(b_Y, 0) + tl.where(o_i == last, b_dglast, 0.0)
        if DELTA:
            tl.store(dg + rows * H + i_h, b_dG, mask=m_t)
        else:
            tl.store(dg + rows * H + i_h, tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG,
                     mask=m_t)
    else:
        b_dS = tl.where(causal, b_dP, 0.0) * scale
        b_dq = b_dq * scale
    b_dq += tl.dot(b_dS.to(dt), b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dS).to(dt), b_q, input_precision=PREC)
    if L2:
        # Through y = x / ||x||: dx = (dy - y (y . dy)) / ||x||.
        b_dq = (b_dq - b_qf * tl.sum(b_dq * b_qf, 1)[:, None]) * b_rq[:, None]
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    if DELTA:
        tl.store(dk + p_k, b_dk, mask=m_tk)
    else:
        if L2:
            b_dk = (b_dk - b_kf * tl.sum(b_dk * b_kf, 1)[:, None]) * b_rk[:, None]
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.autotune(configs=_configs((4, 8)), key=["BT", "BK", "BV", "USE_G", "L2"])
@triton.jit
def _bwd_wy_kernel(k, v, gcum, beta, tmat, h_all, de, dk_part, dk, dv, dg_part, dg, dbeta,
                   cu_seqlens, chunk_indices, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr,
                   PREC: tl.constexpr):
    """Per-chunk gradients through the WY transform (W = T K~, U = T V~, V' = U - W h):
    dv, dbeta, and dk and dg: the rest added to _bwd_qk_kernel's partial ones."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, last, g_rows = _chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    if L2:
        b_k, b_rk = _l2normed(b_k)
    dt = b_k.dtype
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    # T from the prep kernel; its rows past the sequence end are zero instead of identity
    # rows, which no product below reads (those tokens carry zero k, v, dV' and dW).
    b_T = tl.load(tmat + (rows[:, None] * H + i_h) * BT + o_i[None, :], mask=m_t[:, None],
                  other=0.0)
    b_Tt = tl.trans(b_T).to(dt)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    p_h = h_all + (i_c.to(tl.int64) * H + i_h) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_vk = (o_v < V)[:, None] & (o_k < K)[None, :]
        b_ht = tl.load(p_h + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0).to(dt)
        b_de = tl.load(de + p_v, mask=m_tv, other=0.0)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0)
        b_dw -= tl.dot(b_de, b_ht, input_precision=PREC)
        b_dT += tl.dot(b_de, tl.trans((b_v * b_beta[:, None]).to(dt)), input_precision=PREC)
        b_dvb = tl.dot(b_Tt, b_de, input_precision=PREC)
        tl.store(dv + p_v, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
    b_kf = b_k.to(tl.float32)
    if USE_G:
        b_G = tl.load(gcum + g_rows * H + i_h)
        b_E = tl.exp(b_G)
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
        b_E = tl.full([BT], 1.0, dtype=tl.float32)
    b_bE = b_beta * b_E
    # Ordered so that few [BT, BK] fp32 tiles are alive at once (dW, then dK~, then dk).
    b_dT += tl.dot(b_dw.to(dt), tl.trans((b_kf * b_bE[:, None]).to(dt)), input_precision=PREC)
    b_dkb = tl.dot(b_Tt, b_dw.to(dt), input_precision=PREC)
    b_tmp = tl.sum(b_dkb * b_kf, 1)
    b_db += b_tmp * b_E
    b_dk = b_dkb * b_bE[:, None]
    strict = o_i[:, None] > o_i[None, :]
    b_dA = tl.dot(tl.dot(tl.trans(b_T), b_dT, input_precision=PREC), tl.trans(b_T),
                  input_precision=PREC)
    b_dA = -b_dA * _decay(b_G[:, None] - b_G[None, :], strict)
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    b_Z = (b_dA * b_beta[:, None]).to(dt)
    b_dk += tl.dot(b_Z, b_k, input_precision=PREC) + tl.dot(tl.trans(b_Z), b_k,
                                                             input_precision=PREC)
    b_db += tl.sum(b_dA * b_kk, 1)
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_t)
    if USE_G:
        b_Y = b_dA * b_beta[:, None] * b_kk
        b_dG = tl.load(dg_part + rows * H + i_h, mask=m_t, other=0.0)
        b_dG += b_tmp * b_bE + tl.sum(b_Y, 1) - tl.sum(b_Y, 0)
        tl.store(dg + rows * H + i_h, tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG, mask=m_t)
    b_dk += tl.load(dk_part + p_k, mask=m_tk, other=0.0)
    if L2:
        b_dk = (b_dk - b_kf * tl.sum(b_dk * b_kf, 1)[:, None]) * b_rk[:, None]
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@functools.lru_cache(maxsize=None)
def _blocks(K: int, V: int):
    BK = max(16, next_power_of_2(K))
    if BK > 256:
        raise ValueError(f"head dim K={K} is too large for the chunk kernels (at most 256)")
    BV = max(16, min(64, next_power_of_2(V)))
    return BK, BV


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: three-pass tf32 keeps ~fp32 accuracy on the tensor cores ('ieee' compiles
    # slowly and needs too much shared memory at K = 128); half types use them as they are.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _forward_states(q, k, v, g, beta, h0, A_log, dt_bias, opts: "ChunkOptions",
                    store_t: bool = False, tmat: Optional[torch.Tensor] = None):
    """prep + state scan: gcum, e (= V' or V), h_all [NT, H, K, V], ht [N, H, K, V], W (or k),
    T [total, H, BT] (with store_t, or the tmat given: read, not formed again)."""
    layout, delta = opts.layout, opts.delta
    TT, H, K = q.shape
    V = v.shape[-1]
    BT = layout.chunk_size
    BK, BV = _blocks(K, V)
    prec = _prec(q.dtype)
    dev = q.device
    use_g = g is not None
    gcum = new_buffer((TT, H), torch.float32, dev) if use_g else q
    load_t = tmat is not None
    store_t = store_t and not load_t
    if delta:
        w, u = new_buffer(k.shape, k.dtype, dev), new_buffer(v.shape, v.dtype, dev)
        if store_t:
            tmat = new_buffer((TT, H, BT), torch.float32, dev)
    else:
        w, u = k, v
    tmat = tmat if tmat is not None else gcum
    if layout.num_chunks and (use_g or delta):
        _prep_kernel[(layout.num_chunks, H)](
            k, v, g if use_g else q, beta if delta else q, gcum, w, u, tmat,
            A_log if opts.gate else q, dt_bias if opts.gate else q, layout.cu_seqlens,
            layout.chunk_indices, H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, DELTA=delta,
            STORE_T=delta and store_t, LOAD_T=delta and load_t, GATE=opts.gate,
            L2=opts.l2norm, PREC=prec)
    h_all = new_buffer((layout.num_chunks, H, K, V), q.dtype, dev)
    e = new_buffer(v.shape, v.dtype, dev) if delta else v
    ht = new_buffer((layout.num_seqs, H, K, V), torch.float32, dev)
    bv_h = _bv_scan(layout, H, V, BV)
    _fwd_h_kernel[(cdiv(V, bv_h), layout.num_seqs * H)](
        k, u, w, gcum, h_all, e, h0 if h0 is not None else q, ht, layout.cu_seqlens,
        layout.chunk_offsets, H, K=K, V=V, BT=BT, BK=BK, BV=bv_h, USE_G=use_g,
        USE_H0=h0 is not None, DELTA=delta, L2=opts.l2norm, PREC=prec)
    return gcum, e, h_all, ht, w, tmat


def _bv_scan(layout: SeqLayout, H: int, V: int, BV: int) -> int:
    """V block of the sequential scans: they run one program per (sequence, head, V block),
    so with few sequences the block narrows (down to 16) until the programs fill the SMs."""
    sms = sm_count(layout.cu_seqlens.device)
    while BV > 16 and layout.num_seqs * H * cdiv(V, BV) < sms:
        BV //= 2
    return BV


def _keeps_t(opts: "ChunkOptions") -> bool:
    """Whether the forward keeps the WY inverse T for the backward: fp32 [total, H, BT], the
    size of a bf16 k at K = 128, against inverting every chunk a second time (5 % of a
    forward+backward at H = 16, D = 128 on an H200)."""
    return opts.delta and opts.needs_grad


def chunk_fwd(q, k, v, g, beta, h0, A_log, dt_bias, opts: "ChunkOptions"):
    """q, k: [total, H, K]; v: [total, H, V]; g, beta: [total, H]; h0: [N, H, K, V].

    With opts.gate, g holds gate logits and A_log, dt_bias ([H]) form the log-decay in-kernel;
    with opts.l2norm, q and k are L2-normalised on load. Returns o [total, H, V], the final
    states [N, H, K, V] (fp32) and T for the backward (None unless _keeps_t).
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    keep_t = _keeps_t(opts)
    gcum, e, h_all, ht, _, tmat = _forward_states(q, k, v, g, beta, h0, A_log, dt_bias, opts,
                                                  store_t=keep_t)
    o = new_buffer(v.shape, v.dtype, q.device)
    layout = opts.layout
    if layout.num_chunks:
        _fwd_o_kernel[(cdiv(V, BV), layout.num_chunks, H)](
            q, k, e, gcum, h_all, o, layout.cu_seqlens, layout.chunk_indices, opts.scale, H,
            K=K, V=V, BT=layout.chunk_size, BK=BK, BV=BV, USE_G=g is not None, L2=opts.l2norm,
            PREC=_prec(q.dtype))
    return o, ht, (tmat if keep_t else None)


def chunk_bwd(q, k, v, g, beta, h0, A_log, dt_bias, do, dht: Optional[torch.Tensor],
              opts: "ChunkOptions", tmat: Optional[torch.Tensor] = None):
    """Gradients of :func:`chunk_fwd`: dq, dk, dv, dg (fp32 or None; w.r.t. the log-decay,
    also under opts.gate), dbeta (fp32 or None), dh0 [N, H, K, V]. tmat: the T the forward
    kept (else it is formed again)."""
    gcum, e, h_all, _, w, tmat = _forward_states(q, k, v, g, beta, h0, A_log, dt_bias, opts,
                                                 store_t=True, tmat=tmat)
    use_g = g is not None
    dh_all, de, dh0 = _reverse_scan(q, k, w, gcum, do, dht, use_g, opts)
    dq, dk, dv, dg, dbeta = _chunk_grads(q, k, v, e, gcum, beta, tmat, h_all, dh_all, do, de,
                                         use_g, opts)
    return dq, dk, dv, dg, dbeta, dh0


def _reverse_scan(q, k, w, gcum, do, dht, use_g: bool, opts: "ChunkOptions",
                  local_first: bool = True):
    """dh per chunk (grad of the state after it) [NT, H, K, V], dV' [total, H, V] and dh0.
    local_first: P^T dO in a parallel pass before the scan (fp32 [total, H, V]); False forms it
    inside the scan, the earlier version kept for timing on other cards."""
    layout = opts.layout
    TT, H, K = q.shape
    V = do.shape[-1]
    BK, BV = _blocks(K, V)
    dev = q.device
    de_local = new_buffer(do.shape, torch.float32, dev) if local_first else None
    if local_first and layout.num_chunks:
        _bwd_dv_local_kernel[(cdiv(V, BV), layout.num_chunks, H)](
            q, k, gcum, do, de_local, layout.cu_seqlens, layout.chunk_indices, opts.scale, H,
            K=K, V=V, BT=layout.chunk_size, BK=BK, BV=BV, USE_G=use_g, L2=opts.l2norm,
            PREC=_prec(q.dtype))
    dh_all = new_buffer((layout.num_chunks, H, K, V), q.dtype, dev)
    de = new_buffer(do.shape, do.dtype, dev)
    dh0 = new_buffer((layout.num_seqs, H, K, V), torch.float32, dev)
    bv_h = _bv_scan(layout, H, V, BV)
    _bwd_dh_kernel[(cdiv(V, bv_h), layout.num_seqs * H)](
        q, k, w, gcum, do, de_local if de_local is not None else q, de, dh_all,
        dht if dht is not None else q, dh0, layout.cu_seqlens, layout.chunk_offsets, opts.scale,
        H, K=K, V=V, BT=layout.chunk_size, BK=BK, BV=bv_h, USE_G=use_g, USE_DHT=dht is not None,
        DELTA=opts.delta, L2=opts.l2norm, PREC=_prec(q.dtype), DV_LOCAL=local_first)
    return dh_all, de, dh0


def _chunk_grads(q, k, v, e, gcum, beta, tmat, h_all, dh_all, do, de, use_g: bool,
                 opts: "ChunkOptions"):
    """The per-chunk passes: dq, dk, dv, dg (or None), dbeta (or None)."""
    layout, delta = opts.layout, opts.delta
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    dev = q.device
    dq = new_buffer(q.shape, q.dtype, dev)
    dk = new_buffer(k.shape, k.dtype, dev)
    dv = new_buffer(v.shape, v.dtype, dev) if delta else de
    dg = new_buffer((TT, H), torch.float32, dev) if use_g else None
    dbeta = new_buffer((TT, H), torch.float32, dev) if delta else None
    if layout.num_chunks:
        # With DELTA the first kernel leaves partial fp32 dk and dG for the second, in
        # buffers of their own: a kernel that updated its output in place would add twice
        # whenever the autotuner runs it more than once.
        dk_part = new_buffer(k.shape, torch.float32, dev) if delta else dk
        dg_part = new_buffer((TT, H), torch.float32, dev) if delta and use_g else dg
        grid = (layout.num_chunks, H)
        common = dict(K=K, V=V, BT=layout.chunk_size, BK=BK, BV=BV, USE_G=use_g,
                      L2=opts.l2norm, PREC=_prec(q.dtype))
        _bwd_qk_kernel[grid](
            q, k, e, gcum, h_all, dh_all, do, dq, dk_part, dg_part if use_g else q,
            layout.cu_seqlens, layout.chunk_indices, opts.scale, H, DELTA=delta, **common)
        if delta:
            _bwd_wy_kernel[grid](
                k, v, gcum, beta, tmat, h_all, de, dk_part, dk, dv, dg_part if use_g else q,
                dg if use_g else q, dbeta, layout.cu_seqlens, layout.chunk_indices, H, **common)
    return dq, dk, dv, dg, dbeta


@dataclass(frozen=True)
class ChunkOptions:
    """Static settings of one chunk call (kept out of the autograd Function's argument list).

    l2norm: normalise q and k inside the kernels; gate: g holds Gated DeltaNet gate logits
    and the log-decay -exp(A_log) softplus(g + dt_bias) is formed inside the kernels;
    needs_grad: a backward will follow (the forward then keeps what it can hand on).
    """
    delta: bool
    scale: float
    layout: SeqLayout
    l2norm: bool = False
    gate: bool = False
    needs_grad: bool = False


class ChunkFunction(torch.autograd.Function):
    """Autograd glue: forward keeps the inputs and the WY inverse T; backward recomputes the
    chunk states.

    Tensors are flattened: q, k [total, H, K], v [total, H, V], g, beta [total, H] (or None),
    h0 [N, H, K, V] (or None), A_log, dt_bias [H] (opts.gate only, else None).
    Returns o [total, H, V] and final states [N, H, K, V] fp32.
    """

    @staticmethod
    def forward(ctx, opts: ChunkOptions, q, k, v, g, beta, h0, A_log, dt_bias):
        o, ht, tmat = chunk_fwd(q, k, v, g, beta, h0, A_log, dt_bias, opts)
        ctx.save_for_backward(q, k, v, g, beta, h0, A_log, dt_bias, tmat)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # an unused final state costs no zero-filled dht
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, A_log, dt_bias, tmat = ctx.saved_tensors
        opts = ctx.opts
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dbeta, dh0 = chunk_bwd(
            q, k, v, g, beta, h0, A_log, dt_bias, do.contiguous(),
            dht.contiguous() if dht is not None else None, opts, tmat)
        dA_log = ddt_bias = None
        if opts.gate:
            # g_t = -exp(A_log) softplus(a_t + dt_bias): cheap [total, H] chain rule.
            x = g.float() + dt_bias.float()
            decay_rate = A_log.float().exp()
            dA_log = (dg * -decay_rate * torch.nn.functional.softplus(x)).sum(0).to(A_log.dtype)
            dg = dg * -decay_rate * torch.sigmoid(x)
            ddt_bias = dg.sum(0).to(dt_bias.dtype)
        return (None, dq, dk, dv,
                dg.to(g.dtype) if g is not None else None,
                dbeta.to(beta.dtype) if beta is not None and opts.delta else None,
                dh0.to(h0.dtype) if h0 is not None else None,
                dA_log, ddt_bias)
