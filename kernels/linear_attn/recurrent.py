"""Fused recurrent (gated) linear attention for decoding (forward only, state in / out)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.dispatch import run_recurrent


def fused_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`chunk_linear_attn`; one launch walking the tokens, no backward."""
    return run_recurrent(q, k, v, g, None, delta=False, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         backend=backend)
