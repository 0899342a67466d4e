"""Weight averaging as a continual merge (model soups, https://arxiv.org/abs/2203.05482).

The average of models fine-tuned from one base equals the base plus the average of their task
vectors, so it is kept as a running mean of task vectors:
``mean_t = (t * mean_{t-1} + tau_t) / (t + 1)`` with ``t`` models merged before, and
``theta_t = theta_0 + mean_t``. `MergeAverage` is the continual strategy.
"""
from __future__ import annotations

import torch

from .base import MergeStrategy
from .task_vectors import StateDict, clone


def average(task_vectors: list[StateDict]) -> dict[str, torch.Tensor]:
    """Mean of the task vectors, entry by entry."""
    if not task_vectors:
        raise ValueError("average() needs at least one task vector.")
    n = len(task_vectors)
    return {k: sum(tv[k] for tv in task_vectors) / n for k in task_vectors[0]}


def average_step_(mean: dict[str, torch.Tensor], tau: StateDict, count: int
                  ) -> dict[str, torch.Tensor]:
    """Fold ``tau`` into the running ``mean`` of ``count`` task vectors, in place."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    for k, m in mean.items():
        m.mul_(count / (count + 1)).add_(tau[k], alpha=1.0 / (count + 1))
    return mean


class MergeAverage(MergeStrategy):
    """Weight averaging (https://arxiv.org/abs/2203.05482): running mean of task vectors."""

    name = "merge_average"
    state_attrs = ("mean",)

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.mean = clone(tau)
        else:
            average_step_(self.mean, tau, self.tasks_seen)

    def merged_update(self):
        return self.mean, 1.0
