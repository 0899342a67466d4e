"""Pure-torch chunkwise (gated) linear attention (the CPU fast path); math in ``chunk_torch``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.chunk_torch import chunk_forward_torch
from ..common.utils import check_inputs


def torch_chunk_linear_attn(q, k, v, g=None, *, scale: Optional[float] = None,
                            initial_state=None, output_final_state: bool = False,
                            cu_seqlens=None, chunk_size: int = 64
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as :func:`naive_linear_attn`; autograd gives the backward."""
    check_inputs(q, k, v, g, None, initial_state, cu_seqlens, scale=scale)
    return chunk_forward_torch(q, k, v, g, None, delta=False,
                               scale=q.shape[-1] ** -0.5 if scale is None else scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, chunk_size=chunk_size)
