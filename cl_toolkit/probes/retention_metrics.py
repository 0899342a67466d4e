"""The measures of the retention probe (Orhan 2023, https://arxiv.org/abs/2303.17557) as pure
functions of losses, logits and a predictor: the log-spaced measurement schedule, recognition
(two-alternative forced choice on the sequence loss), recall (greedy continuation: exact match,
token accuracy, and ROUGE-L over words, the paper's measure) and the 95 % confidence interval
over seeds that the tables give.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def log_spaced(limit: int) -> list[int]:
    """0, 1, 3, 10, 30, 100, ... up to ``limit`` (the 1-3-10 series)."""
    points, scale = [0], 1
    while scale <= limit:
        points += [p for p in (scale, 3 * scale) if p <= limit]
        scale *= 10
    return points


def recognition(loss_studied: torch.Tensor, loss_foil: torch.Tensor) -> float:
    """Share of pairs whose studied sequence has the lower loss; ties count half."""
    wins = (loss_studied < loss_foil).float() + 0.5 * (loss_studied == loss_foil).float()
    return float(wins.mean())


def sequence_loss(logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss ``[N]`` of ``seqs`` ``[N, L]`` from ``logits`` ``[N, L-1, V]`` of
    ``seqs[:, :-1]``."""
    return F.cross_entropy(logits.transpose(1, 2).float(), seqs[:, 1:],
                           reduction="none").mean(1)


@torch.no_grad()
def completions(predict: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
                logits: torch.Tensor | None = None, step: Callable | None = None
                ) -> torch.Tensor:
    """``[N, L]``: each of ``seqs`` ``[N, L]`` with its second half replaced by the greedy
    continuation of its first half (the cue).

    ``predict(ids [n, T]) -> logits [n, T, V]``; ``logits`` of ``seqs[:, :-1]`` may be passed to
    save a forward pass. A continuation equals the truth exactly when every teacher-forced
    argmax of the second half is right, and agrees with it up to the first wrong one, so only
    the sequences with an error are decoded, from the earliest first error on. ``step(ids,
    caches) -> (logits, caches)`` decodes with the model's cache (one token per call) instead
    of running ``predict`` over the whole prefix for every token.
    """
    L = seqs.shape[1]
    h = L // 2
    if logits is None:
        logits = predict(seqs[:, :-1])
    right = logits[:, h - 1:].argmax(-1) == seqs[:, h:]
    full = seqs.clone()
    todo = (~right.all(1)).nonzero().squeeze(1)
    if len(todo):
        first = int((~right[todo]).float().argmax(1).min())
        out = seqs[todo, :h + first]
        if step is None:
            while out.shape[1] < L:
                out = torch.cat([out, predict(out)[:, -1].argmax(-1, keepdim=True)], 1)
        else:
            last, caches = step(out, None)
            while out.shape[1] < L:
                out = torch.cat([out, last[:, -1].argmax(-1, keepdim=True)], 1)
                if out.shape[1] < L:
                    last, caches = step(out[:, -1:], caches)
        full[todo] = out
    return full


@torch.no_grad()
def recall(predict: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
           logits: torch.Tensor | None = None, step: Callable | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of the second half of each of ``seqs`` ``[N, L]`` from its first
    half (`completions`): ``(exact match [N] bool, token accuracy [N])``."""
    return recall_scores(seqs, completions(predict, seqs, logits, step))


def recall_scores(seqs: torch.Tensor, completed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact match [N] bool, token accuracy [N])`` of the second halves of ``completed``
    against those of ``seqs``."""
    h = seqs.shape[1] // 2
    right = completed[:, h:] == seqs[:, h:]
    return right.all(1), right.float().mean(1)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming over
    one row, O(len(a) len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(reference: Sequence, candidate: Sequence) -> float:
    """ROUGE-L F-measure (beta = 1): the harmonic mean of the longest common subsequence's share
    of the candidate (precision) and of the reference (recall); 0 when either is empty."""
    if not reference or not candidate:
        return 0.0
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    precision, recall_ = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall_ / (precision + recall_)


# Two-sided 95 % quantiles of Student's t with 1..30 degrees of freedom (then 40, 60, 120, inf).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T975_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (tabulated; between
    tabulated degrees the next smaller one's, which is the wider interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    value = _T975[-1]
    for d, q in _T975_LARGE:
        if df >= d:
            value = q
    return value if df < 1000 else 1.960


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95 % confidence interval by the t-distribution with n - 1
    degrees of freedom); the half-width is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n)
