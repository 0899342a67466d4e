"""Short causal depthwise convolution over packed segments (the MoM layer's k/v/q convolution).

y[t, c] = silu(sum_i weight[c, i] * x[t - (W-1) + i, c]) where every input before the start of
t's segment comes from that segment's cache (the inputs that preceded it, zeros by default),
never from the segment before. Two paths with one contract:

- torch: each segment laid out after its cached rows in one extended sequence, one shifted
  multiply-add per tap; the CPU path. (The executable spec of both is ``naive.py``.)
- Triton: one forward kernel (one read of x, one write of y) and two backward passes, instead
  of the torch path's W + 3 passes forward and about 3 W backward: the first recomputes the
  pre-activation and gives dpre (stored in x's dtype, as torch's own bf16 backward would),
  per-block dweight sums and dcache; the second gives dx from W shifted reads of dpre. (One
  fused pass had to recompute the pre-activation at all W shifts: on an H200 it took 8x the
  forward's time; see RESULTS.md.)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..common.utils import make_layout, new_buffer, resolve_backend, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _block(cu_seqlens, chunk_indices, i_b, C, BT: tl.constexpr, BC: tl.constexpr):
        """Block i_b's segment, the segment's first row and length, the rows' positions in it,
        the channels, and their masks (a block never straddles two segments)."""
        i_n = tl.load(chunk_indices + 2 * i_b).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        pos = tl.load(chunk_indices + 2 * i_b + 1).to(tl.int64) * BT + tl.arange(0, BT)
        o_c = tl.program_id(1) * BC + tl.arange(0, BC)
        return i_n, bos, seqlen, pos, o_c, o_c < C, pos < seqlen

    @triton.jit
    def _tap(x, cache, bos, src, m_t, i_n, o_c, m_c, C, stride_x, W: tl.constexpr,
             USE_CACHE: tl.constexpr):
        """Inputs at segment positions src [BT] (fp32 [BT, BC]): x rows for src >= 0, the
        segment's cache slot W-1+src before its start (zeros without a cache)."""
        m = m_c[None, :] & m_t[:, None]
        b = tl.load(x + (bos + src)[:, None] * stride_x + o_c[None, :],
                    mask=m & (src >= 0)[:, None], other=0.0).to(tl.float32)
        if USE_CACHE:
            b += tl.load(cache + (i_n * C + o_c[None, :]) * (W - 1) + (W - 1 + src)[:, None],
                         mask=m & (src < 0)[:, None], other=0.0).to(tl.float32)
        return b

    @triton.jit
    def _weight_cache_grads(x, w, cache, dw_part, dcache, b_dpre, i_b, i_n, bos, pos, o_c, m_c,
                            m_t, C, stride_x, W: tl.constexpr, USE_CACHE: tl.constexpr,
                            CACHE_GRAD: tl.constexpr):
        """From one block's dpre: its dweight sums (dpre * tap input over the rows) and, with
        CACHE_GRAD, dcache by atomic adds (only a segment's first W-1 rows reach its cache, so
        they do not contend)."""
        for i in tl.static_range(W):
            src = pos - (W - 1 - i)
            tap = _tap(x, cache, bos, src, m_t, i_n, o_c, m_c, C, stride_x, W, USE_CACHE)
            tl.store(dw_part + (i_b * C + o_c) * W + i, tl.sum(b_dpre * tap, 0), mask=m_c)
            if CACHE_GRAD:
                w_i = tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)
                tl.atomic_add(dcache + (i_n * C + o_c[None, :]) * (W - 1) + (W - 1 + src)[:, None],
                              b_dpre * w_i[None, :],
                              mask=m_t[:, None] & m_c[None, :] & (src < 0)[:, None])

    @triton.jit
    def _segment_conv_fwd_kernel(x, w, cache, y, cu_seqlens, chunk_indices, C, stride_x,
                                 W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                                 USE_CACHE: tl.constexpr):
        i_b = tl.program_id(0)
        i_n, bos, seqlen, pos, o_c, m_c, m_t = _block(cu_seqlens, chunk_indices, i_b, C, BT, BC)
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for i in tl.static_range(W):
            acc += tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)[None, :] * \
                _tap(x, cache, bos, pos - (W - 1 - i), m_t, i_n, o_c, m_c, C, stride_x, W,
                     USE_CACHE)
        out = acc * tl.sigmoid(acc)
        tl.store(y + (bos + pos)[:, None] * C + o_c[None, :], out.to(y.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])

    @triton.jit
    def _segment_conv_dpre_kernel(x, w, cache, dy, dpre, dw_part, dcache, cu_seqlens,
                                  chunk_indices, C, stride_x, W: tl.constexpr,
                                  BT: tl.constexpr, BC: tl.constexpr, USE_CACHE: tl.constexpr,
                                  CACHE_GRAD: tl.constexpr):
        """First backward pass, per row: dpre = dy * silu'(pre) (pre recomputed) stored in x's
        dtype; then this block's dweight sums and dcache (:func:`_weight_cache_grads`)."""
        i_b = tl.program_id(0)
        i_n, bos, seqlen, pos, o_c, m_c, m_t = _block(cu_seqlens, chunk_indices, i_b, C, BT, BC)
        m = m_t[:, None] & m_c[None, :]
        pre = tl.zeros([BT, BC], dtype=tl.float32)
        for i in tl.static_range(W):
            pre += tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)[None, :] * \
                _tap(x, cache, bos, pos - (W - 1 - i), m_t, i_n, o_c, m_c, C, stride_x, W,
                     USE_CACHE)
        g = tl.load(dy + (bos + pos)[:, None] * C + o_c[None, :], mask=m,
                    other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        b_dpre = g * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre + (bos + pos)[:, None] * C + o_c[None, :],
                 b_dpre.to(dpre.dtype.element_ty), mask=m)
        _weight_cache_grads(x, w, cache, dw_part, dcache, b_dpre, i_b, i_n, bos, pos, o_c, m_c,
                            m_t, C, stride_x, W, USE_CACHE, CACHE_GRAD)

    @triton.jit
    def _segment_conv_dx_kernel(w, dpre, dx, cu_seqlens, chunk_indices, C, W: tl.constexpr,
                                BT: tl.constexpr, BC: tl.constexpr):
        """Second backward pass: dx[t] = sum_d weight[W-1-d] dpre[t+d] within t's segment."""
        i_b = tl.program_id(0)
        _, bos, seqlen, pos, o_c, m_c, m_t = _block(cu_seqlens, chunk_indices, i_b, C, BT, BC)
        b_dx = tl.zeros([BT, BC], dtype=tl.float32)
        for d in tl.static_range(W):
            m_d = (pos + d) < seqlen
            b_dx += tl.load(w + o_c * W + (W - 1 - d), mask=m_c,
                            other=0.0).to(tl.float32)[None, :] * \
                tl.load(dpre + (bos + pos + d)[:, None] * C + o_c[None, :],
                        mask=m_d[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        tl.store(dx + (bos + pos)[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])


_BT, _BC, _WARPS = 32, 64, 8  # at 4 warps the sm_90 builds spill (backward first pass: 224 B)


class _SegmentConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cache, cu: Tuple[int, ...]):
        P, C = x.shape
        W = weight.shape[1]
        layout = make_layout(1, P, None, _BT, x.device, cu)
        y = new_buffer((P, C), x.dtype, x.device)
        w = weight.contiguous()
        c = cache.contiguous() if cache is not None else x
        grid = (layout.num_chunks, triton.cdiv(C, _BC))
        if layout.num_chunks:
            _segment_conv_fwd_kernel[grid](x, w, c, y, layout.cu_seqlens, layout.chunk_indices,
                                           C, x.stride(0), W=W, BT=_BT, BC=_BC,
                                           USE_CACHE=cache is not None, num_warps=_WARPS)
        ctx.save_for_backward(x, w, c if cache is not None else None)
        ctx.layout = layout
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, cache = ctx.saved_tensors
        cache_grad = cache is not None and ctx.needs_input_grad[2]
        dx, dw_part, dcache = _conv_bwd(x, w, cache, dy.contiguous(), ctx.layout, cache_grad)
        dw = dw_part.sum(0).to(w.dtype)
        return dx, dw, dcache.to(cache.dtype) if cache_grad else None, None


def _bwd_buffers(x, w, cache, layout, cache_grad: bool):
    """dx, per-block dweight sums [blocks, C, W] fp32, and dcache (fp32, zeroed for the
    atomic adds; None without cache_grad)."""
    dx = new_buffer(x.shape, x.dtype, x.device)
    dw_part = new_buffer((layout.num_chunks,) + tuple(w.shape), torch.float32, x.device)
    dcache = (torch.zeros(cache.shape, dtype=torch.float32, device=x.device)
              if cache_grad else None)
    return dx, dw_part, dcache


def _conv_bwd(x, w, cache, dy, layout, cache_grad: bool):
    """The backward's two passes into :func:`_bwd_buffers`."""
    P, C = x.shape
    W = w.shape[1]
    dx, dw_part, dcache = _bwd_buffers(x, w, cache, layout, cache_grad)
    if layout.num_chunks:
        grid = (layout.num_chunks, triton.cdiv(C, _BC))
        dpre = new_buffer((P, C), x.dtype, x.device)
        _segment_conv_dpre_kernel[grid](
            x, w, cache if cache is not None else x, dy, dpre, dw_part,
            dcache if cache_grad else dw_part, layout.cu_seqlens, layout.chunk_indices, C,
            x.stride(0), W=W, BT=_BT, BC=_BC, USE_CACHE=cache is not None,
            CACHE_GRAD=cache_grad, num_warps=_WARPS)
        _segment_conv_dx_kernel[grid](w, dpre, dx, layout.cu_seqlens, layout.chunk_indices,
                                      C, W=W, BT=_BT, BC=_BC, num_warps=_WARPS)
    return dx, dw_part, dcache


class _ConvTorch(torch.autograd.Function):
    """Each segment after its own W-1 cached rows in one extended sequence ``ext``, so one
    shifted multiply-add per tap serves every segment; rows move by host-built indices (ext
    rows of x: ``x_pos``, of the cache: ``head_pos``). The backward is written out: dpre
    placed back in ext order gives dx and dcache by W shifted multiply-adds and the weight
    sums by W dot products, with no per-segment autograd nodes."""

    @staticmethod
    def forward(ctx, x, weight, heads, x_pos, head_pos):
        pad, C = weight.shape[1] - 1, x.shape[1]
        n_ext = x.shape[0] + head_pos.numel()
        ext = x.new_zeros(n_ext, C) if heads is None else x.new_empty(n_ext, C)
        ext.index_copy_(0, x_pos, x)
        if heads is not None:
            ext.index_copy_(0, head_pos, heads.reshape(-1, C))
        taps = weight.t().contiguous()  # [W, C]: contiguous rows keep the multiply-adds vectorised
        n = n_ext - pad  # pre_ext[t] = sum_i weight[:, i] ext[t + i], the output of ext row t+pad
        pre = ext[:n] * taps[0]
        for i in range(1, pad + 1):
            pre.addcmul_(ext[i:i + n], taps[i])
        pre = pre.index_select(0, x_pos - pad)
        ctx.save_for_backward(ext, taps, pre, x_pos, head_pos)
        ctx.has_heads = heads is not None
        return F.silu(pre)

    @staticmethod
    def backward(ctx, dy):
        ext, taps, pre, x_pos, head_pos = ctx.saved_tensors
        pad = taps.shape[0] - 1
        n = ext.shape[0] - pad
        dpre = torch.ops.aten.silu_backward(dy, pre)
        d_ext_pre = dpre.new_zeros(n, dpre.shape[1]).index_copy_(0, x_pos - pad, dpre)
        dweight = torch.stack([(d_ext_pre * ext[i:i + n]).sum(0) for i in range(pad + 1)], 1)
        dext = torch.zeros_like(ext)
        for i in range(pad + 1):
            dext[i:i + n].addcmul_(d_ext_pre, taps[i])
        dx = dext.index_select(0, x_pos)
        dheads = None
        if ctx.has_heads and ctx.needs_input_grad[2]:
            dheads = dext.index_select(0, head_pos).view(-1, pad, ext.shape[1])
        return dx, dweight, dheads, None, None


def _conv_torch(x: torch.Tensor, weight: torch.Tensor, cu: Sequence[int],
                heads: Optional[torch.Tensor]) -> torch.Tensor:
    """The torch path of :func:`segment_conv`; heads [S, W-1, C] (None: zeros)."""
    pad, S = weight.shape[1] - 1, len(cu) - 1
    dev = x.device
    lens = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=dev)
    seg = torch.repeat_interleave(torch.arange(S, device=dev), lens, output_size=x.shape[0])
    x_pos = torch.arange(x.shape[0], device=dev) + (seg + 1) * pad
    start = torch.tensor(cu[:-1], device=dev) + torch.arange(S, device=dev) * pad
    head_pos = (start[:, None] + torch.arange(pad, device=dev)).reshape(-1)
    return _ConvTorch.apply(x, weight, heads, x_pos, head_pos)


def _tails(x: torch.Tensor, heads: torch.Tensor, cu: Sequence[int]) -> torch.Tensor:
    """[S, pad, C]: each segment's last pad inputs, the older ones from its cache when the
    segment is shorter than pad; one gather (host-built index) over [cache rows; x]."""
    S, pad = heads.shape[:2]
    idx = []
    for s in range(S):
        taken = min(cu[s + 1] - cu[s], pad)  # rows from the segment itself
        idx += [s * pad + j for j in range(taken, pad)]
        idx += [S * pad + r for r in range(cu[s + 1] - taken, cu[s + 1])]
    src = torch.cat([heads.reshape(S * pad, -1), x])
    return src.index_select(0, torch.tensor(idx, device=x.device)).view(S, pad, -1)


def segment_conv(x: torch.Tensor, weight: torch.Tensor, cu: Sequence[int],
                 cache: Optional[torch.Tensor] = None, *, return_tail: bool = False,
                 backend: str = "auto"
                 ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """silu(causal depthwise conv) of packed segments that never looks across a boundary.

    x: [P, C] rows (a row stride other than C is fine); weight: [C, W]; cu: S+1 segment
    starts as host ints; cache: [S, C, W-1] inputs that precede each segment, oldest first
    (None: zeros). Returns y [P, C], and with return_tail the new cache [S, C, W-1] (each
    segment's last W-1 inputs, reaching into its cache when it is shorter than that).
    backend: 'auto' (CUDA -> Triton), 'triton', 'torch' ('naive' means 'torch' here); float64
    always takes the torch path.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [P, C] packed rows, got shape {tuple(x.shape)}")
    P, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 2:
        raise ValueError(f"weight must be [C, W] = [{C}, W >= 2], got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("cache", cache)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    W = weight.shape[1]
    cu = [int(c) for c in cu]
    S, pad = len(cu) - 1, W - 1
    if S < 1 or cu[0] != 0 or cu[-1] != P or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu must rise from 0 to the row count {P}, got {cu}")
    if cache is not None and tuple(cache.shape) != (S, C, pad):
        raise ValueError(f"cache must be [S, C, W-1] = [{S}, {C}, {pad}], "
                         f"got {tuple(cache.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    heads = cache.transpose(1, 2).to(x.dtype) if cache is not None else None  # [S, W-1, C]
    if resolve_backend(backend, x.device) == "triton" and x.dtype != torch.float64:
        y = _SegmentConvFunction.apply(x, weight, cache, tuple(cu))
    else:
        y = _conv_torch(x, weight, cu, heads)
    if not return_tail:
        return y
    if heads is None:
        heads = x.new_zeros(S, pad, C)
    return y, _tails(x, heads, cu).transpose(1, 2)
