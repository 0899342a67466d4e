"""Chunkwise gated delta rule: public entry point (Triton on CUDA, torch chunk path on CPU).

Gated DeltaNet, https://arxiv.org/abs/2412.06464. Kernels in ``..chunk_triton``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.dispatch import run_chunk


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
    gate_logits: Optional[torch.Tensor] = None,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """o_t = S_t (scale q_t), S_t = exp(g_t) S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay <= 0) and beta: [B, T, H] (g=None: no
    decay; beta=None: 1, else in [0, 1]). A positive or non-finite g and a beta outside [0, 1]
    raise on CPU tensors; on a GPU their values are not read (a device sync per call). scale
    defaults to K ** -0.5. With cu_seqlens [N+1] the inputs are packed as [1, total, H, D];
    zero-length sequences are allowed; cu_seqlens on the CPU saves the device sync that reading
    it from the GPU costs. initial_state: [N, H, V, K]. Returns (o [B, T, H, V], final state
    [N, H, V, K] float32 or None).

    use_qk_l2norm normalises q and k first; gate_logits/A_log/dt_bias ([B, T, H], [H], [H])
    compute g = -exp(A_log) softplus(gate_logits + dt_bias) instead of passing g. On the Triton
    path both are fused into the kernels (no normalised copies or decay tensor in memory);
    the other backends apply them as torch ops. backend: 'auto' (CUDA -> 'triton', CPU ->
    'torch'), 'triton' (CPU only under TRITON_INTERPRET=1), 'torch', or 'naive'.
    """
    gate = None
    if gate_logits is not None:
        if g is not None:
            raise ValueError("pass either g or gate_logits (with A_log, dt_bias), not both")
        if A_log is None or dt_bias is None:
            raise ValueError("gate_logits needs A_log and dt_bias ([H] each)")
        g, gate = gate_logits, (A_log, dt_bias)
    return run_chunk(q, k, v, g, beta, delta=True, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                     chunk_size=chunk_size, backend=backend, qk_l2norm=use_qk_l2norm, gate=gate)
