"""TIES-merging (Yadav et al., https://arxiv.org/abs/2306.01708).

Three steps per parameter tensor, so that task vectors stop cancelling each other out:

1. trim: keep the ``density`` fraction of each task vector's entries with the largest
   magnitude, zero the rest (the paper keeps the top 20%);
2. elect: the sign of every entry is the sign of its total mass ``sum_i trimmed_i``;
3. disjoint merge: average (``reduce="mean"``) or add (``"sum"``) only the non-zero entries
   that agree with the elected sign.

Trimming is per tensor, as in mergekit, so no model-sized flat vector is ever built.
Continual TIES (DESIGN.md section 6) keeps ``S_t = TIES(S_{t-1}, tau_t)`` and merges
``theta_t = theta_0 + lam * S_t``.
"""
from __future__ import annotations

import torch

from .task_vectors import StateDict

REDUCTIONS = ("mean", "sum")


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``ceil(density * numel)`` largest-magnitude entries zeroed
    (ties at the threshold are kept)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}; 0.2 keeps the top 20%.")
    if density == 1.0 or x.numel() == 0:
        return x.clone()
    k = max(1, int(round(density * x.numel())))
    threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


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


def ties_tensor(tensors: list[torch.Tensor], density: float = 0.2, reduce: str = "mean"
                ) -> torch.Tensor:
    """TIES of one parameter tensor across task vectors."""
    trimmed = torch.stack([trim(t, density) for t in tensors])
    return disjoint_merge(trimmed, elect_sign(trimmed), reduce)


def ties(task_vectors: list[StateDict], density: float = 0.2, reduce: str = "mean"
         ) -> dict[str, torch.Tensor]:
    """TIES merge of whole task vectors, one tensor at a time (unscaled: add ``lam *`` it)."""
    if not task_vectors:
        raise ValueError("ties() needs at least one task vector.")
    return {k: ties_tensor([tv[k] for tv in task_vectors], density, reduce)
            for k in task_vectors[0]}
