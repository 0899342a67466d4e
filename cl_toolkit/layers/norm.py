"""RMSNorm (https://arxiv.org/abs/1910.07467): the pre-norm of every sequence block."""
from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32 or better. x: [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * \
            self.weight
