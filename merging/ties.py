"""TIES-merging (Yadav et al., https://arxiv.org/abs/2306.01708).

Three steps per parameter tensor, so that task vectors stop cancelling each other out:

1. trim: keep the ``density`` fraction of each task vector's entries with the largest
   magnitude, zero the rest (the paper keeps the top 20%);
2. elect: the sign of every entry is the sign of its total mass ``sum_i trimmed_i``;
3. disjoint merge: average (``reduce="mean"``) or add (``"sum"``) only the non-zero entries
   that agree with the elected sign.

Trimming ranks the entries of a whole task vector (all its tensors together), as the TIES paper
and the continual-merging baselines of OPCM do: a layer whose updates are small loses more of
them than one whose updates are large. The threshold is found without a model-sized flat vector
(bisection on float32 bit patterns, one pass over the tensors per bit). Continual TIES
(DESIGN.md section 6) keeps ``S_t = TIES(S_{t-1}, tau_t)`` and merges
``theta_t = theta_0 + lam * S_t``.
"""
from __future__ import annotations

import torch

from .task_vectors import StateDict

REDUCTIONS = ("mean", "sum")


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as float32 bit patterns: for non-negative floats the int32 order is the value order."""
    return x.detach().abs().float().view(torch.int32)


def trim_threshold(tensors, density: float) -> int | None:
    """Bit pattern of the ``round(density * n)``-th largest magnitude over all ``tensors``
    (``None``: keep everything). Exact: 31 bisection steps over the float32 bit range."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}; 0.2 keeps the top 20%.")
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    if density == 1.0 or n == 0:
        return None
    k = max(1, int(round(density * n)))
    lo, hi = 0, 0x7F800001  # count(bits >= lo) >= k > count(bits >= hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(int((_magnitude_bits(t) >= mid).sum()) for t in tensors) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def keep_above(x: torch.Tensor, threshold: int | None) -> torch.Tensor:
    """``x`` with the entries below ``threshold`` (a `trim_threshold`) zeroed; ties are kept."""
    if threshold is None:
        return x.clone()
    return torch.where(_magnitude_bits(x) >= threshold, x, torch.zeros_like(x))


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` alone trimmed to its top ``density`` fraction by magnitude."""
    return keep_above(x, trim_threshold([x], density))


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Sign of the summed mass over the task axis (dim 0) of ``[n_tasks, ...]``."""
    return torch.sign(trimmed.sum(dim=0))


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, reduce: str = "mean"
                   ) -> torch.Tensor:
    """Combine the entries of ``trimmed [n_tasks, ...]`` whose sign equals ``sign``."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"Unknown TIES reduce {reduce!r}; use one of {REDUCTIONS}.")
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    if reduce == "sum":
        return total
    return total / agree.sum(dim=0).clamp_min(1)


def ties_tensor(tensors: list[torch.Tensor], thresholds: list[int | None],
                reduce: str = "mean") -> torch.Tensor:
    """TIES of one parameter tensor across task vectors, each trimmed at its vector's
    threshold (`trim_threshold`)."""
    trimmed = torch.stack([keep_above(t, th) for t, th in zip(tensors, thresholds)])
    return disjoint_merge(trimmed, elect_sign(trimmed), reduce)


def ties(task_vectors: list[StateDict], density: float = 0.2, reduce: str = "mean"
         ) -> dict[str, torch.Tensor]:
    """TIES merge of whole task vectors, one tensor at a time (unscaled: add ``lam *`` it)."""
    if not task_vectors:
        raise ValueError("ties() needs at least one task vector.")
    thresholds = [trim_threshold(tv.values(), density) for tv in task_vectors]
    return {k: ties_tensor([tv[k] for tv in task_vectors], thresholds, reduce)
            for k in task_vectors[0]}
