"""Other versions of parts of the chunk kernels, timed against the current ones on a GPU in
the same call (``gpu_kernels.py --variant NAME``). Not used by the library.

A version here is checked for correctness on the CPU (tests/kernels/test_kernel_variants.py).
A candidate that wins on a GPU moves into chunk_triton.py, one that loses is deleted; the
version it replaced may stay here while other cards have not timed it. Earlier entries:
``dense-inverse``, ``fused-bwd``, ``scan-bv-by-pairs`` (issue 5, fourth session) are in this
file at commit 7bb7d8b; ``bwd-dv-local`` became the library's path in the fifth session.

A variant is applied by replacing a name in ``cl_toolkit.kernels.chunk_triton`` or
``cl_toolkit.kernels.short_conv`` before any kernel is compiled: Triton hashes a kernel
together with the jit functions it calls, so a patched kernel compiles as its own binary.
"""
from __future__ import annotations

import triton
import triton.language as tl

from cl_toolkit.kernels import chunk_triton, short_conv
from cl_toolkit.kernels.short_conv import _block, _tap, _weight_cache_grads

_LIBRARY_REVERSE_SCAN = chunk_triton._reverse_scan  # a variant replaces the module's name


def reverse_scan_dv_in_scan(q, k, w, gcum, do, dht, use_g, opts):
    """The reverse scan with P^T dO formed inside the sequential scan, as in the fourth session
    (no parallel pass and no fp32 buffer). On an H200 it was 1 % slower forward+backward at
    T <= 4096 and 8.5 % slower at T = 16384 (RESULTS.md)."""
    return _LIBRARY_REVERSE_SCAN(q, k, w, gcum, do, dht, use_g, opts, local_first=False)


def keeps_t_never(opts):
    """The forward keeps no T and the backward inverts every chunk again (fifth session)."""
    return False


@triton.jit
def _segment_conv_bwd_kernel(x, w, cache, dy, dx, dw_part, dcache, cu_seqlens,
                             chunk_indices, C, stride_x, W: tl.constexpr, BT: tl.constexpr,
                             BC: tl.constexpr, USE_CACHE: tl.constexpr,
                             CACHE_GRAD: tl.constexpr):
    """dx[t] = sum_d weight[W-1-d] dpre[t+d] (same segment), dpre recomputed at every shift,
    not stored; then the block's dweight sums and dcache from dpre at d = 0."""
    i_b = tl.program_id(0)
    i_n, bos, seqlen, pos, o_c, m_c, m_t = _block(cu_seqlens, chunk_indices, i_b, C, BT, BC)
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    dpre0 = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(W):  # dpre at the rows d later, which read this row at tap W-1-d
        m_d = (pos + d) < seqlen
        pre = tl.zeros([BT, BC], dtype=tl.float32)
        for i in tl.static_range(W):
            pre += tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)[None, :] * \
                _tap(x, cache, bos, pos + d - (W - 1 - i), m_d, i_n, o_c, m_c, C, stride_x,
                     W, USE_CACHE)
        g = tl.load(dy + (bos + pos + d)[:, None] * C + o_c[None, :],
                    mask=m_d[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        dpre = g * sig * (1.0 + pre * (1.0 - sig))
        b_dx += tl.load(w + o_c * W + (W - 1 - d), mask=m_c,
                        other=0.0).to(tl.float32)[None, :] * dpre
        if d == 0:
            dpre0 = dpre
    tl.store(dx + (bos + pos)[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])
    _weight_cache_grads(x, w, cache, dw_part, dcache, dpre0, i_b, i_n, bos, pos, o_c, m_c, m_t,
                        C, stride_x, W, USE_CACHE, CACHE_GRAD)


def conv_bwd_one_pass(x, w, cache, dy, layout, cache_grad: bool):
    """The short convolution's backward as one kernel (fifth session): dx from the
    pre-activation recomputed at all W shifts, no dpre buffer. On an H200 it took 8x the
    forward's time in the MoM layer profile (RESULTS.md, run 9)."""
    C, W = w.shape
    BT, BC = short_conv._BT, short_conv._BC
    dx, dw_part, dcache = short_conv._bwd_buffers(x, w, cache, layout, cache_grad)
    if layout.num_chunks:
        _segment_conv_bwd_kernel[(layout.num_chunks, triton.cdiv(C, BC))](
            x, w, cache if cache is not None else x, dy, dx, dw_part,
            dcache if cache_grad else dw_part, layout.cu_seqlens, layout.chunk_indices, C,
            x.stride(0), W=W, BT=BT, BC=BC, USE_CACHE=cache is not None,
            CACHE_GRAD=cache_grad, num_warps=short_conv._WARPS)
    return dx, dw_part, dcache


VARIANTS = {  # name: (module, name in it, replacement)
    "dv-in-scan": (chunk_triton, "_reverse_scan", reverse_scan_dv_in_scan),
    "prep-recompute": (chunk_triton, "_keeps_t", keeps_t_never),
    "conv-bwd-one-pass": (short_conv, "_conv_bwd", conv_bwd_one_pass),
}


def apply(name: str) -> None:
    """Swap one variant into its kernels module (before its kernels are first used)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    module, attr, impl = VARIANTS[name]
    setattr(module, attr, impl)
