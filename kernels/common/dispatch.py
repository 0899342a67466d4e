"""Validation and device dispatch shared by the public chunk functions of both ops."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .utils import (CHUNK_SIZES, FLOATS, check_inputs, check_tensor, check_triton_inputs, gdn_gate,
                    host_to_device, l2norm, make_layout, resolve_backend)


def run_chunk(q, k, v, g, beta, *, delta: bool, scale: Optional[float],
              initial_state: Optional[torch.Tensor], output_final_state: bool,
              cu_seqlens: Optional[torch.Tensor], chunk_size: int, backend: str,
              qk_l2norm: bool = False,
              gate: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate, then run 'triton' | 'torch' | 'naive' (see the public functions' docs).

    qk_l2norm: normalise q and k; gate = (A_log, dt_bias): g holds gate logits and the
    log-decay is -exp(A_log) softplus(g + dt_bias). Both are fused into the Triton kernels and
    applied as torch ops before the other backends.
    """
    cu_host = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens,
                           g_is_log_decay=gate is None, scale=scale)
    requested = backend
    backend = resolve_backend(backend, q.device)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if backend == "triton" and q.is_cuda and q.dtype == torch.float32 and K > 64:
        # fp32 tiles of a 128-wide key dim need more shared memory than an H100 has in the
        # backward kernel; half precision is the fast path, the torch path covers the rest.
        if requested == "auto":
            backend = "torch"
        else:
            raise ValueError(f"the float32 Triton chunk kernels support K <= 64, got K={K}; "
                             "use bfloat16/float16 inputs or backend='torch'")
    triton_path = backend == "triton"
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}, got "
                         f"{chunk_size}")
    scale = K ** -0.5 if scale is None else float(scale)
    if gate is not None:
        if g is None:
            raise ValueError("the fused gate needs the gate logits (passed as g)")
        for name, t in zip(("A_log", "dt_bias"), gate):
            check_tensor(name, t, (H,), q.device, FLOATS, contiguous=triton_path)
    if triton_path:
        check_triton_inputs(q=q, k=k, v=v, g=g, beta=beta)
    if backend != "triton":
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(q.device)
        if gate is not None:
            g = gdn_gate(g, *gate)
        if qk_l2norm:
            q, k = l2norm(q), l2norm(k)
    if backend == "naive":
        from ..gated_delta_rule.naive import naive_gated_delta_rule
        from ..linear_attn.naive import naive_linear_attn
        kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
        if delta:
            return naive_gated_delta_rule(q, k, v, g, beta, **kw)
        return naive_linear_attn(q, k, v, g, **kw)
    if backend == "torch":
        from .chunk_torch import chunk_forward_torch
        return chunk_forward_torch(q, k, v, g, beta, delta=delta, scale=scale,
                                   initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   chunk_size=chunk_size)
    from .chunk_triton import ChunkFunction, ChunkOptions
    layout = make_layout(B, T, cu_seqlens, chunk_size, q.device, cu_host)
    if delta and beta is None:
        beta = q.new_ones(B, T, H)
    h0 = initial_state.transpose(-1, -2).contiguous() if initial_state is not None else None
    flat = lambda x: x.reshape((B * T,) + tuple(x.shape[2:])) if x is not None else None
    A_log, dt_bias = gate if gate is not None else (None, None)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, h0, A_log, dt_bias))
    opts = ChunkOptions(delta, scale, layout, l2norm=qk_l2norm, gate=gate is not None,
                        needs_grad=needs_grad)
    o, ht = ChunkFunction.apply(opts, flat(q), flat(k), flat(v), flat(g),
                                flat(beta) if delta else None, h0, A_log, dt_bias)
    final = ht.transpose(-1, -2) if output_final_state else None
    return o.view(B, T, H, V), final


def run_recurrent(q, k, v, g, beta, *, delta: bool, scale: Optional[float],
                  initial_state: Optional[torch.Tensor], output_final_state: bool,
                  cu_seqlens: Optional[torch.Tensor], backend: str
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward-only token loop for decoding: 'triton' fused kernel, 'torch' the token loop
    batched over sequences (the CPU path), 'naive' the per-sequence reference."""
    cu_host = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale=scale)
    backend = resolve_backend(backend, q.device)
    if backend == "naive":
        return run_chunk(q, k, v, g, beta, delta=delta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         chunk_size=64, backend="naive")
    if backend == "torch":
        from .recurrent_torch import recurrent_forward_torch
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return recurrent_forward_torch(q, k, v, g, beta, delta=delta, scale=scale,
                                       initial_state=initial_state,
                                       output_final_state=output_final_state,
                                       cu_seqlens=cu_seqlens, cu_host=cu_host)
    if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state)):
        raise ValueError("the fused recurrent kernel is forward-only (decoding); use the chunk "
                         "function for training, or wrap the call in torch.no_grad()")
    check_triton_inputs(q=q, k=k, v=v, g=g, beta=beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    from .recurrent_triton import recurrent_fwd
    cu = host_to_device(range(0, B * T + 1, T) if cu_host is None else cu_host, q.device)
    h0 = initial_state.transpose(-1, -2).contiguous() if initial_state is not None else None
    flat = lambda x: x.reshape((B * T,) + tuple(x.shape[2:])) if x is not None else None
    o, ht = recurrent_fwd(flat(q), flat(k), flat(v), flat(g), flat(beta) if delta else None, h0,
                          cu, K ** -0.5 if scale is None else float(scale), delta)
    return o.view(B, T, H, V), ht.transpose(-1, -2) if output_final_state else None
