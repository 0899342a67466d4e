"""Task arithmetic (Ilharco et al., https://arxiv.org/abs/2212.04089).

``theta = theta_0 + lam * sum_i tau_i``. As a continual merge the sum is kept and grows by one
task vector per step: ``theta_t = theta_{t-1} + lam * tau_t``. The OPCM paper's baselines use
``lam = 0.3`` for 8 tasks and ``0.1`` for 14 or 20. `MergeTA` is the continual strategy.
"""
from __future__ import annotations

import torch

from .base import MergeStrategy
from .task_vectors import StateDict, clone


def task_arithmetic(task_vectors: list[StateDict], lam: float) -> dict[str, torch.Tensor]:
    """``lam * sum_i tau_i``, the update to add to ``theta_0``."""
    if not task_vectors:
        raise ValueError("task_arithmetic() needs at least one task vector.")
    return {k: lam * sum(tv[k] for tv in task_vectors) for k in task_vectors[0]}


def task_arithmetic_step_(total: dict[str, torch.Tensor], tau: StateDict
                          ) -> dict[str, torch.Tensor]:
    """``total += tau`` in place; the merged model is ``theta_0 + lam * total``."""
    for k, v in total.items():
        v.add_(tau[k])
    return total


class MergeTA(MergeStrategy):
    """Continual task arithmetic (https://arxiv.org/abs/2212.04089):
    ``theta_t = theta_0 + lam * sum_{i<=t} tau_i``."""

    name = "merge_ta"
    state_attrs = ("total",)

    def __init__(self, lam: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.lam = lam

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.total = clone(tau)
        else:
            task_arithmetic_step_(self.total, tau)

    def merged_update(self):
        return self.total, self.lam
