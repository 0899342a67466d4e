"""Fused recurrent gated delta rule for decoding (forward only, state in / state out)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.dispatch import run_recurrent


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`chunk_gated_delta_rule` but one launch that walks the tokens.

    Meant for decoding (T small); no backward. On the CPU ('auto', 'torch') the token loop runs
    batched over sequences (kernels/common/recurrent_torch.py); 'naive' is the per-sequence
    reference.
    """
    return run_recurrent(q, k, v, g, beta, delta=True, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         backend=backend)
