"""Short causal convolution, one row at a time: the executable spec of ``segment_conv``.

Rows ``cu[s] .. cu[s+1] - 1`` of x ``[P, C]`` form segment s. Each segment is read after its
cache (the W-1 inputs that preceded it, oldest first; zeros without one), and row t gives

    y[t, c] = silu(sum_i weight[c, i] * h[t - (W-1) + i, c])

over that history h, so no output reads the segment before. Plain torch ops, a Python step
per row: slow, any dtype, and autograd gives every gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def naive_segment_conv(x: torch.Tensor, weight: torch.Tensor, cu: Sequence[int],
                       cache: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: [P, C]; weight: [C, W]; cu: S+1 segment starts; cache: [S, C, W-1] or None (zeros).

    Returns y [P, C] and the new cache [S, C, W-1]: each segment's last W-1 inputs, the older
    ones from its cache when the segment is shorter than that.
    """
    cu = [int(c) for c in cu]
    S, C, W = len(cu) - 1, x.shape[1], weight.shape[1]
    if cache is None:
        cache = x.new_zeros(S, C, W - 1)
    ys, tails = [], []
    for s in range(S):
        history = [cache[s, :, j] for j in range(W - 1)]
        for t in range(cu[s], cu[s + 1]):
            history.append(x[t])
            ys.append(F.silu(sum(weight[:, i] * history[-W + i] for i in range(W))))
        tails.append(torch.stack(history[-(W - 1):], 1))
    y = torch.stack(ys) if ys else x.new_zeros(0, C)
    return y, torch.stack(tails)
