"""Other versions of parts of the chunk kernels, timed against the current ones on a GPU in
the same call (``gpu_kernels.py --variant NAME``). Not used by the library.

- Earlier versions (``dense-inverse``, ``fused-bwd``, ``scan-bv-by-pairs``): each was slower
  than the current one on an H200 with Triton 3.6 (benchmarks/RESULTS.md, fourth session); kept
  so the comparison can be rerun on other cards and Triton versions.
- Candidates (``bwd-dv-local``): checked for correctness on the CPU, not yet timed; one that
  wins on a GPU moves into chunk_triton.py.

A variant is applied by replacing a name in ``cl_toolkit.kernels.chunk_triton`` before any
kernel is compiled: Triton hashes a kernel together with the jit functions it calls, so the
patched kernel compiles as its own binary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cl_toolkit.kernels import chunk_triton


@triton.jit
def dense_inverse_unit_lower(b_A, BT: tl.constexpr):
    """(I + A)^-1 as the kernels computed it before the batched blocks (issue 5, run 3 on an
    H200): the 16 x 16 diagonal stage as full BT x BT products of block-diagonal matrices,
    ten three-pass tf32 products of BT x BT in all."""
    o = tl.arange(0, BT)
    same_block = (o[:, None] // 16) == (o[None, :] // 16)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    b_L = tl.where(same_block, b_A, 0.0)
    b_D = eye - b_L
    for _ in tl.static_range(3):
        b_L = tl.dot(b_L, b_L, input_precision="tf32x3")
        b_D = tl.dot(b_D, eye + b_L, input_precision="tf32x3")
    if BT > 16:
        b_M = tl.dot(b_D, tl.where(same_block, 0.0, b_A), input_precision="tf32x3")
        b_P = eye - b_M
        if BT > 32:
            b_M = tl.dot(b_M, b_M, input_precision="tf32x3")
            b_P = tl.dot(b_P, eye + b_M, input_precision="tf32x3")
            if BT > 64:
                b_M = tl.dot(b_M, b_M, input_precision="tf32x3")
                b_P = tl.dot(b_P, eye + b_M, input_precision="tf32x3")
        b_D = tl.dot(b_P, b_D, input_precision="tf32x3")
    return b_D


def scan_bv_by_pairs(layout, H: int, V: int, BV: int) -> int:
    """The state scans' V block before it followed the SM count: 32 below 256 programs."""
    n = layout.num_seqs * H * chunk_triton.cdiv(V, 64)
    return min(BV, 32 if n < 256 else BV)


@triton.autotune(configs=chunk_triton._configs((4, 8)),
                 key=["BT", "BK", "BV", "USE_G", "DELTA", "L2"])
@triton.jit
def fused_bwd_chunk_kernel(q, k, v, e, gcum, beta, tmat, h_all, dh_all, do, de, dq, dk, dv, dg,
                           dbeta, cu_seqlens, chunk_indices, scale, H,
                           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                           DELTA: tl.constexpr, L2: tl.constexpr, PREC: tl.constexpr):
    """The single per-chunk gradient kernel before it was split in two (issue 5, third
    session): every gradient of one chunk in one program."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, last = chunk_triton._chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    if L2:
        b_q, b_rq = chunk_triton._l2normed(b_q)
        b_k, b_rk = chunk_triton._l2normed(b_k)
    dt = b_q.dtype
    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)
    if USE_G:
        b_G = tl.load(gcum + rows * H + i_h, mask=m_t, other=0.0)
        g_last = tl.sum(tl.where(o_i == last, b_G, 0.0), 0)
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
    if DELTA:
        b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        # T from the prep kernel; its rows past the sequence end are zero instead of identity
        # rows, which no product below reads (those tokens carry zero k, v, dV' and dW).
        b_T = tl.load(tmat + (rows[:, None] * H + i_h) * BT + o_i[None, :], mask=m_t[:, None],
                      other=0.0)
        b_Tt = tl.trans(b_T).to(dt)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        b_dT = tl.zeros([BT, BT], dtype=tl.float32)
        b_db = tl.zeros([BT], dtype=tl.float32)
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
        b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
        if DELTA:
            b_de = tl.load(de + p_v, mask=m_tv, other=0.0)
            b_v = tl.load(v + p_v, mask=m_tv, other=0.0)
            b_dw -= tl.dot(b_de, b_ht, input_precision=PREC)
            b_dT += tl.dot(b_de, tl.trans((b_v * b_beta[:, None]).to(dt)), input_precision=PREC)
            b_dvb = tl.dot(b_Tt, b_de, input_precision=PREC)
            tl.store(dv + p_v, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
            b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
    causal = o_i[:, None] >= o_i[None, :]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    if USE_G:
        b_E = tl.exp(b_G)
        b_dS = tl.where(causal, b_dP * tl.exp(b_G[:, None] - b_G[None, :]), 0.0) * scale
        b_dq = b_dq * (b_E * scale)[:, None]
        b_dk = b_dk * tl.exp(g_last - b_G)[:, None]
        b_dG = tl.sum(b_dq * b_qf, 1) - tl.sum(b_dk * b_kf, 1)
        b_dglast = tl.sum(b_dk * b_kf) + tl.sum(b_dgl) * tl.exp(g_last)
        b_Y = b_dS * b_s
        b_dG += tl.sum(b_Y, 1) - tl.sum(b_Y, 0)
    else:
        b_E = tl.full([BT], 1.0, dtype=tl.float32)
        b_dS = tl.where(causal, b_dP, 0.0) * scale
        b_dq = b_dq * scale
    b_dq += tl.dot(b_dS.to(dt), b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dS).to(dt), b_q, input_precision=PREC)
    if DELTA:
        b_bE = b_beta * b_E
        b_dkb = tl.dot(b_Tt, b_dw.to(dt), input_precision=PREC)
        b_dk += b_dkb * b_bE[:, None]
        b_tmp = tl.sum(b_dkb * b_kf, 1)
        b_db += b_tmp * b_E
        b_dT += tl.dot(b_dw.to(dt), tl.trans((b_kf * b_bE[:, None]).to(dt)), input_precision=PREC)
        strict = o_i[:, None] > o_i[None, :]
        b_dA = tl.dot(tl.dot(tl.trans(b_T), b_dT, input_precision=PREC), tl.trans(b_T),
                      input_precision=PREC)
        b_Ds = tl.where(strict, tl.exp(b_G[:, None] - b_G[None, :]), 0.0)
        b_dA = -tl.where(strict, b_dA, 0.0) * b_Ds
        b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
        b_Z = (b_dA * b_beta[:, None]).to(dt)
        b_dk += tl.dot(b_Z, b_k, input_precision=PREC) + tl.dot(tl.trans(b_Z), b_k,
                                                                 input_precision=PREC)
        b_db += tl.sum(b_dA * b_kk, 1)
        if USE_G:
            b_dG += b_tmp * b_bE
            b_Y = b_dA * b_beta[:, None] * b_kk
            b_dG += tl.sum(b_Y, 1) - tl.sum(b_Y, 0)
        tl.store(dbeta + rows * H + i_h, b_db, mask=m_t)
    if USE_G:
        b_dG += tl.where(o_i == last, b_dglast, 0.0)
        b_dg = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG
        tl.store(dg + rows * H + i_h, b_dg, mask=m_t)
    if L2:
        # Through y = x / ||x||: dx = (dy - y (y . dy)) / ||x||.
        b_dq = (b_dq - b_qf * tl.sum(b_dq * b_qf, 1)[:, None]) * b_rq[:, None]
        b_dk = (b_dk - b_kf * tl.sum(b_dk * b_kf, 1)[:, None]) * b_rk[:, None]
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


def fused_chunk_grads(q, k, v, e, gcum, beta, tmat, h_all, dh_all, do, de, use_g, opts):
    """chunk_triton._chunk_grads as one kernel."""
    layout, delta = opts.layout, opts.delta
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = chunk_triton._blocks(K, V)
    new_buffer, dev = chunk_triton.new_buffer, q.device
    dq = new_buffer(q.shape, q.dtype, dev)
    dk = new_buffer(k.shape, k.dtype, dev)
    dv = new_buffer(v.shape, v.dtype, dev) if delta else de
    dg = new_buffer((TT, H), torch.float32, dev) if use_g else None
    dbeta = new_buffer((TT, H), torch.float32, dev) if delta else None
    if layout.num_chunks:
        fused_bwd_chunk_kernel[(layout.num_chunks, H)](
            q, k, v, e, gcum, beta if delta else q, tmat, h_all, dh_all, do, de, dq, dk, dv,
            dg if use_g else q, dbeta if delta else q, layout.cu_seqlens, layout.chunk_indices,
            opts.scale, H, K=K, V=V, BT=layout.chunk_size, BK=BK, BV=BV, USE_G=use_g,
            DELTA=delta, L2=opts.l2norm, PREC=chunk_triton._prec(q.dtype))
    return dq, dk, dv, dg, dbeta


@triton.autotune(configs=chunk_triton._configs((4, 8)), key=["BT", "BK", "BV", "USE_G", "L2"])
@triton.jit
def dv_local_kernel(q, k, gcum, do, de_local, cu_seqlens, chunk_indices, scale, H,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr,
                    PREC: tl.constexpr):
    """P^T dO per chunk (P = scale causal(Q K^T * D)), fp32: the part of dV' that does not
    depend on the state, computed in parallel over chunks instead of inside the reverse scan."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, last = chunk_triton._chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    if L2:
        b_q, _ = chunk_triton._l2normed(b_q)
        b_k, _ = chunk_triton._l2normed(b_k)
    o_i = tl.arange(0, BT)
    causal_t = o_i[:, None] <= o_i[None, :]
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [i, t] = k_i . q_t
    if USE_G:
        b_G = tl.load(gcum + rows * H + i_h, mask=m_t, other=0.0)
        b_st = tl.where(causal_t, b_st * tl.exp(b_G[None, :] - b_G[:, None]), 0.0)
    else:
        b_st = tl.where(causal_t, b_st, 0.0)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    b_de = tl.dot(b_st.to(b_do.dtype), b_do, input_precision=PREC) * scale
    tl.store(de_local + p_v, b_de, mask=m_tv)


@triton.autotune(configs=chunk_triton._configs((4, 8), (2, 3)),
                 key=["BT", "BK", "BV", "USE_G", "DELTA"])
@triton.jit
def dh_scan_local_kernel(q, k, w, gcum, do, de_local, de, dh_all, dht, dh0, cu_seqlens,
                         chunk_offsets, scale, H, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         USE_G: tl.constexpr, USE_DHT: tl.constexpr, DELTA: tl.constexpr,
                         L2: tl.constexpr, PREC: tl.constexpr):
    """chunk_triton._bwd_dh_kernel with P^T dO read from dv_local_kernel: per step only the
    products that depend on dh (K~ dh, W^T dV') and Q^T dO stay on the sequential path."""
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
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
        if L2:
            b_q, _ = chunk_triton._l2normed(b_q)
            b_k, _ = chunk_triton._l2normed(b_k)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        dt = b_q.dtype
        b_qf = b_q.to(tl.float32) * scale
        b_kf = b_k.to(tl.float32)
        if USE_G:
            b_G = tl.load(gcum + rows * H + i_h, mask=m_t, other=0.0)
            g_last = tl.load(gcum + (bos + tl.minimum(i_t * BT + BT, seqlen) - 1) * H + i_h)
            b_qf = b_qf * tl.exp(b_G)[:, None]
            b_kf = b_kf * tl.exp(g_last - b_G)[:, None]
        b_de = tl.load(de_local + p_v, mask=m_tv, other=0.0)
        b_de += tl.dot(b_kf.to(dt), b_dh.to(dt), input_precision=PREC)
        tl.store(de + p_v, b_de.to(de.dtype.element_ty), mask=m_tv)
        b_dh_new = tl.dot(tl.trans(b_qf.to(dt)), b_do, input_precision=PREC)
        if DELTA:
            b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
            b_dh_new -= tl.dot(tl.trans(b_w), b_de.to(dt), input_precision=PREC)
        if USE_G:
            b_dh = b_dh * tl.exp(g_last)
        b_dh += b_dh_new
    tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


def reverse_scan_dv_local(q, k, w, gcum, do, dht, use_g, opts):
    """chunk_triton._reverse_scan with the state-free part of dV' as a parallel pass first."""
    ct = chunk_triton
    layout = opts.layout
    TT, H, K = q.shape
    V = do.shape[-1]
    BK, BV = ct._blocks(K, V)
    BT, prec, dev = layout.chunk_size, ct._prec(q.dtype), q.device
    de_local = ct.new_buffer(do.shape, torch.float32, dev)
    if layout.num_chunks:
        dv_local_kernel[(ct.cdiv(V, BV), layout.num_chunks, H)](
            q, k, gcum, do, de_local, layout.cu_seqlens, layout.chunk_indices, opts.scale, H,
            K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, L2=opts.l2norm, PREC=prec)
    dh_all = ct.new_buffer((layout.num_chunks, H, K, V), q.dtype, dev)
    de = ct.new_buffer(do.shape, do.dtype, dev)
    dh0 = ct.new_buffer((layout.num_seqs, H, K, V), torch.float32, dev)
    bv_h = ct._bv_scan(layout, H, V, BV)
    dh_scan_local_kernel[(ct.cdiv(V, bv_h), layout.num_seqs * H)](
        q, k, w, gcum, do, de_local, de, dh_all, dht if dht is not None else q, dh0,
        layout.cu_seqlens, layout.chunk_offsets, opts.scale, H, K=K, V=V, BT=BT, BK=BK,
        BV=bv_h, USE_G=use_g, USE_DHT=dht is not None, DELTA=opts.delta, L2=opts.l2norm,
        PREC=prec)
    return dh_all, de, dh0


VARIANTS = {
    "dense-inverse": ("_inverse_unit_lower", dense_inverse_unit_lower),
    "scan-bv-by-pairs": ("_bv_scan", scan_bv_by_pairs),
    "fused-bwd": ("_chunk_grads", fused_chunk_grads),
    # A candidate, not an earlier version: not yet timed on a GPU.
    "bwd-dv-local": ("_reverse_scan", reverse_scan_dv_local),
}


def apply(name: str) -> None:
    """Swap one variant into the chunk kernels module (before its kernels are first used)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    attr, impl = VARIANTS[name]
    setattr(chunk_triton, attr, impl)
