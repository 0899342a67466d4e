"""TIES-merging (Yadav et al., https://arxiv.org/abs/2306.01708).

Three steps per parameter tensor, so that task vectors stop cancelling each other out:

1. trim: keep the ``density`` fraction of each task vector's entries with the largest
   magnitude, zero the rest (the paper keeps the top 20%);
2. elect: the sign of every entry is the sign of its total mass ``sum_i trimmed_i``; where that
   mass cancels exactly (sign 0), the entry takes the majority sign, the sign of the summed
   elected signs over the whole vector, as the official code does (``resolve_zero_signs(...,
   "majority")`` in https://github.com/prateeky2806/ties-merging, src/utils/merge_utils.py,
   kept in FusionBench's ``ties_merging_utils.py``);
3. disjoint merge: average (``reduce="mean"``) or add (``"sum"``) only the non-zero entries
   that agree with the elected sign.

Trimming ranks the entries of a whole task vector (all its tensors together), as the TIES paper
and the continual-merging baselines of OPCM do: a layer whose updates are small loses more of
them than one whose updates are large. The threshold is the ``k``-th largest magnitude,
``k = max(1, round(density * n))``, found by one ``kthvalue`` over the vector's magnitudes (a
flat copy of them, and kthvalue's working copy, live for that call); entries tied with it are
kept, so ties can keep more than ``k``.
(The official ``topk_values_mask`` takes the ``(n - int(density * n))``-th smallest, which keeps
one entry more than ``int(density * n)``.) Where the elected signs cancel over the whole
vector too, no majority exists and such entries merge to 0.

As continual strategies (one family, `MergeTIES`): the sound default keeps
``S_t = TIES_mean(S_{t-1}, tau_t)``; `MergeTIESFusionBench` is the OPCM paper's baseline, which
accumulates ``U_t = U_{t-1} + lam * TIES_sum(U_{t-1}, tau_t)``.
"""
from __future__ import annotations

from functools import reduce as fold

import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.validation import between

from .base import MergeStrategy
from .task_vectors import StateDict

REDUCTIONS = ("mean", "sum")


def trim_threshold(tensors, density: float) -> torch.Tensor | None:
    """Magnitude of the ``max(1, round(density * n))``-th largest entry over all ``tensors``
    (a 0-d tensor; ``None``: keep everything)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}; 0.2 keeps the top 20%.")
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    if density == 1.0 or n == 0:
        return None
    k = max(1, int(round(density * n)))
    # Half-precision magnitudes are ranked in float32 (exact); float64 stays float64.
    dtype = fold(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    magnitudes = torch.cat([t.detach().abs().flatten().to(dtype) for t in tensors])
    return magnitudes.kthvalue(n - k + 1).values


def keep_above(x: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the entries below ``threshold`` (a `trim_threshold`) zeroed; ties are kept."""
    if threshold is None:
        return x.clone()
    magnitude = x.detach().abs().to(threshold.dtype)
    return torch.where(magnitude >= threshold, x, torch.zeros_like(x))


def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` alone trimmed to its top ``density`` fraction by magnitude."""
    return keep_above(x, trim_threshold([x], density))


def elect_sign(trimmed: torch.Tensor, majority: float = 0.0) -> torch.Tensor:
    """Sign of the summed mass over the task axis (dim 0) of ``[n_tasks, ...]``; entries whose
    mass is exactly 0 take ``majority`` (see `majority_sign`)."""
    sign = torch.sign(trimmed.sum(dim=0))
    return sign.masked_fill(sign == 0, majority) if majority else sign


def majority_sign(vectors: list[StateDict], thresholds: list[torch.Tensor | None]) -> float:
    """Sign of the sum of the elected signs over every entry of the trimmed ``vectors``: the
    sign an exact cancellation resolves to. A second pass over the tensors, so that no
    model-sized sign buffer is kept."""
    total = 0
    for k in vectors[0]:
        sign = elect_sign(_trimmed([v[k] for v in vectors], thresholds))
        total += int((sign > 0).sum()) - int((sign < 0).sum())
    return float((total > 0) - (total < 0))


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


def _trimmed(tensors: list[torch.Tensor], thresholds: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.stack([keep_above(t, th) for t, th in zip(tensors, thresholds)])


def ties_tensor(tensors: list[torch.Tensor], thresholds: list[torch.Tensor | None],
                majority: float, reduce: str = "mean") -> torch.Tensor:
    """TIES of one parameter tensor across task vectors, each trimmed at its vector's
    threshold (`trim_threshold`), cancelled signs resolved to ``majority`` (`majority_sign`)."""
    trimmed = _trimmed(tensors, thresholds)
    return disjoint_merge(trimmed, elect_sign(trimmed, majority), reduce)


def ties(task_vectors: list[StateDict], density: float = 0.2, reduce: str = "mean"
         ) -> dict[str, torch.Tensor]:
    """TIES merge of whole task vectors, one tensor at a time (unscaled: add ``lam *`` it)."""
    if not task_vectors:
        raise ValueError("ties() needs at least one task vector.")
    thresholds = [trim_threshold(tv.values(), density) for tv in task_vectors]
    majority = majority_sign(task_vectors, thresholds)
    return {k: ties_tensor([tv[k] for tv in task_vectors], thresholds, majority, reduce)
            for k in task_vectors[0]}


class MergeTIES(MergeStrategy):
    """Continual TIES (https://arxiv.org/abs/2306.01708), the sound default:
    ``S_t = TIES(S_{t-1}, tau_t)``, ``theta_t = theta_0 + lam * S_t`` (``S_0 = 0``): every step
    is one TIES merge of two vectors, so the merged update stays on the scale of one task vector.
    With the disjoint mean, ``lam = 1`` is the TIES paper's default.

    ``accumulate`` (a class attribute) selects the other member of the family,
    `MergeTIESFusionBench`: ``U_1 = lam * tau_1``, ``U_t = U_{t-1} + lam * TIES(U_{t-1}, tau_t)``,
    ``theta_t = theta_0 + U_t``."""

    name = "merge_ties"
    state_attrs = ("merged",)
    ranges = {"density": between(0, 1, low_open=True)}
    accumulate = False

    def __init__(self, lam: float = 1.0, density: float = 0.2, reduce: str = "mean",
                 **kwargs):
        super().__init__(**kwargs)
        if reduce not in REDUCTIONS:
            raise ConfigError(f"Unknown TIES reduce {reduce!r}; use one of {REDUCTIONS}.")
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"TIES density must be in (0, 1], got {density}.")
        self.lam, self.density, self.reduce = lam, density, reduce

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            if self.accumulate:  # untrimmed, as FusionBench starts
                self.merged = {k: v.mul(self.lam) for k, v in tau.items()}
                return
            self.merged = {k: torch.zeros_like(v) for k, v in tau.items()}
        # Per-vector thresholds of [merged, tau] and their majority sign are fixed before any
        # tensor is updated: each tensor's TIES reads only that tensor of the previous merge.
        vectors = [self.merged, tau]
        thresholds = [trim_threshold(v.values(), self.density) for v in vectors]
        majority = majority_sign(vectors, thresholds)
        for k, s in self.merged.items():
            step = ties_tensor([s, tau[k]], thresholds, majority, self.reduce)
            if self.accumulate:
                s.add_(step, alpha=self.lam)
            else:
                self.merged[k] = step

    def merged_update(self):
        return self.merged, 1.0 if self.accumulate else self.lam


class MergeTIESFusionBench(MergeTIES):
    """The continual TIES baseline of the OPCM paper (https://arxiv.org/abs/2501.09522), as
    FusionBench runs it (``ContinualTiesMergingForCLIP``, fusion_bench/method/opcm/
    ties_merging.py, https://github.com/tanganke/fusion_bench):
    ``theta_1 = theta_0 + s * tau_1`` (untrimmed), then
    ``theta_t = theta_{t-1} + s * TIES_sum(theta_{t-1} - theta_0, tau_t)``, ``s = lam`` = 0.3
    for 8 tasks and 0.1 for 14/20. Kept for comparability with the paper's C-TIES numbers: the
    previous merge is added again at every step (where it agrees with tau_t), so the merged
    update grows with the number of tasks instead of staying on one task vector's scale."""

    name = "merge_ties_fusionbench"
    accumulate = True

    def __init__(self, lam: float = 0.3, density: float = 0.2, reduce: str = "sum", **kwargs):
        super().__init__(lam=lam, density=density, reduce=reduce, **kwargs)
