"""Other versions of parts of the chunk kernels, timed against the current ones on a GPU in
the same call (``gpu_kernels.py --variant NAME``). Not used by the library.

A candidate here is checked for correctness on the CPU (tests/kernels/test_kernel_variants.py);
one that wins on a GPU moves into chunk_triton.py, one that loses is deleted. The earlier
versions timed in issue 5's fourth session (``dense-inverse``, ``fused-bwd``,
``scan-bv-by-pairs``; benchmarks/RESULTS.md) are in this file at commit 7bb7d8b.

A variant is applied by replacing a name in ``cl_toolkit.kernels.chunk_triton`` before any
kernel is compiled: Triton hashes a kernel together with the jit functions it calls, so the
patched kernel compiles as its own binary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cl_toolkit.kernels import chunk_triton


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


_LIBRARY_REVERSE_SCAN = chunk_triton._reverse_scan  # the variant replaces the module's name


def reverse_scan_dv_local(q, k, w, gcum, do, dht, use_g, opts):
    """chunk_triton._reverse_scan with the state-free part of dV' as a parallel pass first, so
    fewer products sit on the scan's sequential path."""
    ct = chunk_triton
    layout = opts.layout
    TT, H, K = q.shape
    V = do.shape[-1]
    BK, BV = ct._blocks(K, V)
    de_local = ct.new_buffer(do.shape, torch.float32, q.device)
    if layout.num_chunks:
        dv_local_kernel[(ct.cdiv(V, BV), layout.num_chunks, H)](
            q, k, gcum, do, de_local, layout.cu_seqlens, layout.chunk_indices, opts.scale, H,
            K=K, V=V, BT=layout.chunk_size, BK=BK, BV=BV, USE_G=use_g, L2=opts.l2norm,
            PREC=ct._prec(q.dtype))
    return _LIBRARY_REVERSE_SCAN(q, k, w, gcum, do, dht, use_g, opts, de_local=de_local)


VARIANTS = {
    # Not yet timed on a GPU.
    "bwd-dv-local": ("_reverse_scan", reverse_scan_dv_local),  # DV_LOCAL in _bwd_dh_kernel
}


def apply(name: str) -> None:
    """Swap one variant into the chunk kernels module (before its kernels are first used)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    attr, impl = VARIANTS[name]
    setattr(chunk_triton, attr, impl)
