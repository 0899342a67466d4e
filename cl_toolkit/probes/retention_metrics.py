"""The measures of the retention probe (Orhan 2023, https://arxiv.org/abs/2303.17557) as pure
functions of losses, logits and a predictor: the log-spaced measurement schedule, recognition
(two-alternative forced choice on the sequence loss) and recall (greedy continuation).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def log_spaced(limit: int) -> list[int]:
    """0, 1, 3, 10, 30, 100, ... up to ``limit`` (the 1-3-10 series)."""
    points, scale = [0], 1
    while scale <= limit:
        points += [p for p in (scale, 3 * scale) if p <= limit]
        scale *= 10
    return points


def on_log_schedule(n: int) -> bool:
    return n in log_spaced(n)


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
def recall(predict: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
           logits: torch.Tensor | None = None, step: Callable | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of the second half of each of ``seqs`` ``[N, L]`` from its first
    half: ``(exact match [N] bool, token accuracy [N])``.

    ``predict(ids [n, T]) -> logits [n, T, V]``; ``logits`` of ``seqs[:, :-1]`` may be passed to
    save a forward pass. A continuation equals the truth exactly when every teacher-forced
    argmax of the second half is right, and agrees with it up to the first wrong one, so only
    the sequences with an error are decoded, from the earliest first error on. ``step(ids,
    caches) -> (logits, caches)`` decodes with the model's cache (one token per call) instead
    of running ``predict`` over the whole prefix for every token.
    """
    n, L = seqs.shape
    h = L // 2
    if logits is None:
        logits = predict(seqs[:, :-1])
    right = logits[:, h - 1:].argmax(-1) == seqs[:, h:]
    exact = right.all(1)
    acc = torch.ones(n, device=seqs.device)
    todo = (~exact).nonzero().squeeze(1)
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
        acc[todo] = (out[:, h:] == seqs[todo, h:]).float().mean(1)
    return exact, acc
