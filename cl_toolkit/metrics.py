"""Continual-learning metrics as pure functions of the score matrix.

``R[i, j]`` is the score on task j after learning task i (i, j = 0..T-1) and ``b[j]`` the
score on task j before any training (the runner's row ``-1``). The score is the task kind's
(accuracy, the daily IC, Dice, ...); the names below say "accuracy" as the papers do. For a
score where lower is better, `summary` computes every metric on ``-R``, so BWT, FWT and
forgetting keep their sign convention (positive forgetting = worse, positive BWT = better) and
ACC stays in the score's own units. Definitions follow
Lopez-Paz & Ranzato, GEM (https://arxiv.org/abs/1706.08840) and Chaudhry et al., RWalk
(https://arxiv.org/abs/1801.10112):

- ACC  = mean_j R[T-1, j]
- running ACC_k = mean_{j<=k} R[k, j]
- BWT  = mean_{j<T-1} (R[T-1, j] - R[j, j])
- FWT  = mean_{j>0} (R[j-1, j] - b[j])
- forgetting (max-based) = mean_{j<T-1} (max_{j<=l<T-1} R[l, j] - R[T-1, j])
- learning accuracy = mean_j R[j, j]
- next-task score = mean_{j>0} R[j-1, j]: each task just before it is learned (FWT without
  the untrained baseline; for a stream of calendar periods, the next-period score)
- transient forgetting = mean_{j<T-1} of task j's largest drop after it was learned,
  max_{j<=m<=l<T} (R[m, j] - R[l, j]); beside it, per task, the worst score after it was
  learned, min_{j<=l<T} R[l, j]. A final-row average can hide an old task that fell to chance
  mid-stream and came back; these cannot.

Forgetting is Chaudhry et al.'s (2018), as most code computes it: the max runs over the rows
from the one where task j was learned, so accuracy on task j from forward transfer before it was
learned does not count as something to forget. Avalanche's "forgetting" uses R[j, j] instead of
the max, i.e. -BWT. Metrics that need a task that does not exist (BWT and forgetting with T=1,
FWT with T=1) are ``None`` rather than a made-up 0.

Metrics that a run cannot measure are ``None`` too, with the reason in
``results["not_applicable"]`` ({name: reason}): `not_applicable` collects them from
the scenario (class-il FWT) and from what the strategy declares (its class attribute
``not_applicable``, e.g. KCL's FWT).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SCALARS = ("acc", "bwt", "fwt", "forgetting", "learning_acc", "transient_forgetting",
           "next_task")
CLASS_IL_FWT = ("class-il: a model never trained on task j's classes does not predict them "
                "(R[j-1, j] is about 0 whatever was learned), so R[j-1, j] - b[j] measures the "
                "untrained model, not transfer")


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"The accuracy matrix must be square [T, T] with T >= 1; got shape "
                         f"{R.shape}.")
    return R


def accuracy(R) -> float:
    R = _matrix(R)
    return float(R[-1].mean())


def running_accuracy(R) -> list[float]:
    R = _matrix(R)
    return [float(R[k, : k + 1].mean()) for k in range(R.shape[0])]


def learning_accuracy(R) -> float:
    return float(np.diag(_matrix(R)).mean())


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean(R[T - 1, : T - 1] - np.diag(R)[: T - 1]))


def forward_transfer(R, b: Sequence[float]) -> float | None:
    R = _matrix(R)
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (R.shape[0],):
        raise ValueError(f"The before-training row needs {R.shape[0]} entries; got {b.shape}.")
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R) -> float | None:
    """Max-based forgetting (Chaudhry et al. 2018, https://arxiv.org/abs/1801.10112); use
    `forgetting_per_task` for the per-task values."""
    per_task = forgetting_per_task(R)
    return None if not per_task else float(np.mean(per_task))


def forgetting_per_task(R) -> list[float]:
    """``max_{j<=l<T-1} R[l, j] - R[T-1, j]`` for every j < T-1: only rows after task j was
    learned count (rows before it hold forward transfer, not knowledge that was lost)."""
    R = _matrix(R)
    T = R.shape[0]
    return [float(R[j: T - 1, j].max() - R[T - 1, j]) for j in range(T - 1)]


def worst_after_learning(R) -> list[float]:
    """``min_{j<=l<T} R[l, j]`` for every task j: its lowest score once it was learned (for a
    lower-is-better score, `summary` makes this the highest: the worst either way)."""
    R = _matrix(R)
    return [float(R[j:, j].min()) for j in range(R.shape[0])]


def largest_drop_per_task(R) -> list[float]:
    """``max_{j<=m<=l<T} (R[m, j] - R[l, j])`` for every task j: the deepest fall of its score
    from an earlier peak after it was learned (0 if it never fell)."""
    R = _matrix(R)
    out = []
    for j in range(R.shape[0]):
        col = R[j:, j]
        out.append(float((np.maximum.accumulate(col) - col).max()))
    return out


def next_task(R) -> float | None:
    """``mean_{j>0} R[j-1, j]`` (None with T=1)."""
    R = _matrix(R)
    T = R.shape[0]
    return None if T < 2 else float(np.mean([R[j - 1, j] for j in range(1, T)]))


def transient_forgetting(R) -> float | None:
    """Mean over the tasks learned before the last of their largest drop (None with T=1)."""
    drops = largest_drop_per_task(R)[:-1]
    return None if not drops else float(np.mean(drops))


def not_applicable(scenario: str, declared: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{metric: reason}`` for the metrics a run cannot measure: class-il FWT, then what the
    strategy declares (its reason wins: it is the more specific one)."""
    out = {"fwt": CLASS_IL_FWT} if scenario == "class-il" else {}
    return {**out, **dict(declared or {})}


def summary(R, b: Sequence[float] | None = None,
            not_applicable: Mapping[str, str] | None = None,
            higher_is_better: bool = True) -> dict:
    """All scalar metrics of one run (JSON-friendly); those named in ``not_applicable`` are
    ``None``."""
    if not higher_is_better:
        out = summary(-np.asarray(R, dtype=np.float64),
                      None if b is None else -np.asarray(b, dtype=np.float64), not_applicable)
        for key in ("acc", "learning_acc", "next_task"):
            out[key] = None if out[key] is None else -out[key]
        out["running_acc"] = [-v for v in out["running_acc"]]
        out["worst_after_learning"] = [-v for v in out["worst_after_learning"]]
        return out
    unknown = set(not_applicable or {}) - set(SCALARS)
    if unknown:
        raise ValueError(f"not_applicable names unknown metrics {sorted(unknown)}; the scalar "
                         f"metrics are {', '.join(SCALARS)} (e.g. 'fwt').")
    out = {
        "acc": accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
        "running_acc": running_accuracy(R),
        "forgetting_per_task": forgetting_per_task(R),
        "transient_forgetting": transient_forgetting(R),
        "next_task": next_task(R),
        "largest_drop_per_task": largest_drop_per_task(R),
        "worst_after_learning": worst_after_learning(R),
    }
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
    for name in not_applicable or {}:
        out[name] = None
    return out
