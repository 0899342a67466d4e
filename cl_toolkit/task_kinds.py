"""Task kinds: what a task's data look like, the loss a model trains on, and the score the
runner writes into the matrix.

The runner, the metrics (ACC, BWT, FWT, forgetting), the store and the report are the same for
every kind; only these three things differ. A stream names its kind (``TaskStream.kind``); a
plugin adds a kind through the registry (kind ``task_kind``, entry-point group
``cl_toolkit.task_kinds``) by subclassing `TaskKind`.

Built-in kinds, each ``score`` returning its primary metric first:

- ``classification``: ``x [N, ...]``, labels ``y [N]``; accuracy.
- ``tokens``: token ids ``x, y [N, L]``, ``IGNORE_INDEX`` where no answer is due; accuracy over
  answer positions and exact match (every answer of a sequence right).
- ``cross_section``: one time step's cross-section of entities per sample (a trading day of
  stocks): features ``x [D, S, F]``, targets ``y [D, S]`` float (NaN: entity absent that day);
  the model predicts ``[D, S]``. Score: the Pearson information coefficient per day between
  prediction and target, averaged over days (IC); beside it the rank IC (Spearman per day),
  ICIR and rank ICIR (mean / std over days) and precision@k (`precision_at_k`).
- ``segmentation``: images ``[N, C, H, W]`` or clips ``[N, T, C, H, W]``, integer masks
  ``[N, H, W]`` / ``[N, T, H, W]`` (0 = background, ``IGNORE_INDEX`` = unlabelled); the model
  gives class logits ``[N, K, H, W]`` / ``[N, T, K, H, W]``. Score: Dice per frame and
  foreground class, averaged (a class absent from both prediction and truth in a frame is
  skipped); IoU beside it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .stream import TensorData

# Target of a position or pixel without a loss or a score (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

# Logit elements [B, L, V] one evaluation batch of a token task may hold (128 MiB of float32).
EVAL_LOGITS = 2 ** 25
# predict(x, t) -> the model's output for one batch (inputs and task ids on the CPU)
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """How a score is named and shown: ``percent`` scores are shown x100 with a % sign."""

    key: str
    label: str
    higher_is_better: bool = True
    percent: bool = True
    # Report the next-task score, mean_{j>0} R[j-1, j]: each task scored just before it is
    # learned (for a stream of calendar periods, the next-period IC practitioners trade on).
    next_task: bool = False

    def describe(self) -> dict:
        return asdict(self)


class TaskKind:
    """Base class of task kinds; ``metric`` is the score of the matrix, ``extra_metrics`` are
    recorded beside it (``results["extras"][key]``)."""

    name: str = ""
    metric: Metric
    extra_metrics: tuple[Metric, ...] = ()
    # True where an image or token classifier cannot take the data (market panels, clips with
    # masks): only a model that lists the kind in its ``task_kinds`` may (cl_toolkit/validation).
    needs_own_model: bool = False

    def check(self, data: TensorData, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` if ``data`` do not have this kind's shape."""

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, predict: Predictor, data: TensorData, batch_size: int) -> dict[str, float]:
        raise NotImplementedError

    def rows_per_batch(self, x: torch.Tensor, batch_size: int, stream) -> int:
        """Rows of inputs like ``x`` per evaluation batch (token tasks cap it so that the
        logits fit in memory)."""
        return batch_size

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        """The predicted class ids of a model output (what a stream's analyses read)."""
        return output.argmax(-1)

    def keys(self) -> list[str]:
        return [self.metric.key] + [m.key for m in self.extra_metrics]


class Classification(TaskKind):
    name = "classification"
    metric = Metric("accuracy", "accuracy")

    def check(self, data, where):
        if data.y.dim() != 1 or data.y.is_floating_point():
            raise ValueError(f"{where}: a classification task needs integer labels y [N]; got "
                             f"{data.y.dtype} {tuple(data.y.shape)}.")

    def loss(self, output, y):
        return F.cross_entropy(output, y)

    @torch.no_grad()
    def score(self, predict, data, batch_size):
        correct = 0
        for x, y, t in data.batches(batch_size):
            correct += int((predict(x, t).argmax(1).cpu() == y).sum())
        return {"accuracy": correct / max(len(data), 1)}


class Tokens(TaskKind):
    name = "tokens"
    metric = Metric("accuracy", "accuracy")
    extra_metrics = (Metric("exact_match", "exact match"),)

    def check(self, data, where):
        if not data.is_tokens or data.x.dtype != torch.long:
            raise ValueError(f"{where}: token tasks need x and y as int64 [N, L]; got x "
                             f"{data.x.dtype} {tuple(data.x.shape)}, y {tuple(data.y.shape)}.")

    def loss(self, output, y):
        return F.cross_entropy(output.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    def rows_per_batch(self, x, batch_size, stream):
        """So that one batch's logits ``[B, L, V]`` stay under ``EVAL_LOGITS`` elements."""
        vocab = getattr(stream, "vocab_size", None) or 1
        return max(1, min(batch_size, EVAL_LOGITS // (x.shape[1] * vocab)))

    @torch.no_grad()
    def score(self, predict, data, batch_size):
        correct = answers = exact = 0
        for x, y, t in data.batches(batch_size):
            c, n = answer_scores(predict(x, t).argmax(-1).cpu(), y)
            correct, answers = correct + int(c.sum()), answers + int(n.sum())
            exact += int((c == n).sum())
        return {"accuracy": correct / max(answers, 1), "exact_match": exact / max(len(data), 1)}


def answer_scores(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: correct answers and answer positions (``y != IGNORE_INDEX``), both
    ``[N]``, from predicted ids ``pred [N, L]``. Accuracy counts answers (queries); a sequence
    is an exact match when every one of its answers is right."""
    answer = y != IGNORE_INDEX
    return ((pred == y) & answer).sum(1), answer.sum(1)


def rank_normalise(y: torch.Tensor) -> torch.Tensor:
    """Per row of ``y [D, S]``: ranks of the present (non-NaN) entries scaled to [-1, 1]
    (ties get their mean rank), NaN kept; a row with one entry gets 0."""
    out = torch.full_like(y, float("nan"))
    for d in range(y.shape[0]):
        present = ~torch.isnan(y[d])
        n = int(present.sum())
        if n:
            out[d, present] = 2 * (_ranks(y[d, present]) - 1) / max(n - 1, 1) - 1 if n > 1 \
                else 0.0
    return out


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``v [n]``, ties averaged."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    values, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse].to(v.dtype)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two vectors; NaN when either is constant or has < 2 entries."""
    a, b = a.double(), b.double()
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def daily_ic(pred: torch.Tensor, y: torch.Tensor, rank: bool = False) -> list[float]:
    """IC of every day of ``pred, y [D, S]`` over the entities present that day (``y`` not
    NaN): Pearson, or Spearman (Pearson of ranks) with ``rank``. Days where it is undefined
    (fewer than 2 entities, a constant prediction or target) are left out."""
    out = []
    for d in range(y.shape[0]):
        present = ~torch.isnan(y[d])
        p, t = pred[d, present], y[d, present]
        if rank and p.numel() > 1:
            p, t = _ranks(p.double()), _ranks(t.double())
        ic = pearson(p, t)
        if ic == ic:
            out.append(ic)
    return out


class CrossSection(TaskKind):
    name = "cross_section"
    needs_own_model = True
    metric = Metric("ic", "IC", percent=False, next_task=True)
    extra_metrics = (Metric("rank_ic", "rank IC", percent=False),
                     Metric("icir", "ICIR", percent=False),
                     Metric("rank_icir", "rank ICIR", percent=False),
                     Metric("precision_at_k", "precision@5"))
    # k of precision@k (HIST/MTMD report k = 3, 5, 10, 30; one k keeps one column: our choice)
    precision_k = 5

    def check(self, data, where):
        if data.x.dim() != 3 or data.y.shape != data.x.shape[:2] or \
                not data.y.is_floating_point():
            raise ValueError(f"{where}: a cross-section task needs features x [D, S, F] and "
                             f"float targets y [D, S]; got x {tuple(data.x.shape)}, y "
                             f"{data.y.dtype} {tuple(data.y.shape)}.")

    def loss(self, output, y):
        """MSE against the day's rank-normalised targets, over present entities."""
        target = rank_normalise(y)
        present = ~torch.isnan(target)
        return F.mse_loss(output[present], target[present])

    @torch.no_grad()
    def score(self, predict, data, batch_size):
        preds = torch.cat([predict(x, t).float().cpu() for x, _, t in data.batches(batch_size)])
        ic, ric = daily_ic(preds, data.y.float()), daily_ic(preds, data.y.float(), rank=True)
        mean, icir = _mean_ir(ic)
        rmean, ricir = _mean_ir(ric)
        prec = precision_at_k(preds, data.y.float(), self.precision_k)
        return {"ic": mean, "rank_ic": rmean, "icir": icir, "rank_icir": ricir,
                "precision_at_k": sum(prec) / len(prec) if prec else float("nan")}


def _mean_ir(values: list[float]) -> tuple[float, float]:
    """Mean over days and mean / std (the information ratio); NaN where undefined."""
    mean = sum(values) / len(values) if values else float("nan")
    std = torch.tensor(values, dtype=torch.float64).std().item() if len(values) > 1 \
        else float("nan")
    return mean, (mean / std if std > 0 else float("nan"))


def precision_at_k(pred: torch.Tensor, y: torch.Tensor, k: int) -> list[float]:
    """Per day of ``pred, y [D, S]``: the share of the ``k`` entities ranked highest by
    ``pred`` (among those present) whose target is above the day's median, i.e. whose
    rank-normalised target is positive, as the HIST/MTMD code counts on its CSRankNorm'd labels.
    Days with fewer than ``k`` present entities are left out (market streams refuse them
    when built)."""
    out = []
    for d in range(y.shape[0]):
        present = ~torch.isnan(y[d])
        if int(present.sum()) < k:
            continue
        p, t = pred[d, present], y[d, present]
        above = _ranks(t.double()) > (t.numel() + 1) / 2      # rank-normalised target > 0
        out.append(float(above[torch.topk(p, k).indices].double().mean()))
    return out


def dice_iou(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[list, list]:
    """Dice and IoU of every (frame, foreground class) of ``pred, y [M, H, W]`` (class ids;
    ``IGNORE_INDEX`` pixels of ``y`` count for neither), as ``[M]`` lists per class with NaN
    where a class is absent from both prediction and truth in a frame (no score, skipped)."""
    valid = y != IGNORE_INDEX
    dice, iou = [], []
    for c in range(1, num_classes):
        p, g = (pred == c) & valid, (y == c) & valid
        inter = (p & g).flatten(1).sum(1).double()
        sp, sg = p.flatten(1).sum(1).double(), g.flatten(1).sum(1).double()
        dice.append((2 * inter / (sp + sg)).tolist())            # 0/0 = NaN: skipped
        iou.append((inter / (sp + sg - inter)).tolist())
    return dice, iou


def hd95(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[list[float]]:
    """The 95th-percentile symmetric Hausdorff distance in pixels of every (frame, foreground
    class) of ``pred, y [M, H, W]``: the distances from each boundary pixel of one mask to the
    other mask's boundary, both directions pooled into one percentile, as medpy's ``hd95``
    computes it (MONAI's ``compute_hausdorff_distance(percentile=95)`` takes the larger of the
    two one-way percentiles instead, which is never smaller). NaN where the class is absent from both; where it is absent
    from one only, the image diagonal (our choice: the largest distance the frame allows, so a
    missed ventricle costs instead of vanishing from the mean). Pixels with ``IGNORE_INDEX``
    truth are background in both masks; a frame whose truth is all ``IGNORE_INDEX`` is NaN."""
    from scipy import ndimage

    out = []
    diagonal = math.hypot(*y.shape[-2:])
    for c in range(1, num_classes):
        per = []
        for p, g, v in zip(pred == c, y == c, y != IGNORE_INDEX):
            p, g = (p & v).numpy(), g.numpy()
            if not v.any() or (not p.any() and not g.any()):
                per.append(float("nan"))
            elif not p.any() or not g.any():
                per.append(diagonal)
            else:
                bp, bg = _boundary(p, ndimage), _boundary(g, ndimage)
                to_g = ndimage.distance_transform_edt(~bg)[bp]
                to_p = ndimage.distance_transform_edt(~bp)[bg]
                per.append(float(np.percentile(np.concatenate([to_g, to_p]), 95)))
        out.append(per)
    return out


def _boundary(mask, ndimage):
    """Pixels of ``mask`` with a 4-neighbour outside it (the frame's edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def change_error(pred: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Temporal consistency of clips ``pred, y [N, T, H, W]``: for every pair of consecutive
    frames, the share of pixels whose class changes in the prediction minus the share that
    changes in the truth, in absolute value (0: the masks move as much as the truth does;
    flicker or a frozen mask raise it). Pixels unlabelled in either frame are left out, and so
    are pairs with no labelled pixel (EchoNet labels two frames per clip). Our definition: the
    GDKVM paper names temporal consistency but gives no formula."""
    valid = (y[:, 1:] != IGNORE_INDEX) & (y[:, :-1] != IGNORE_INDEX)
    n = valid.flatten(2).sum(2)
    moved_p = ((pred[:, 1:] != pred[:, :-1]) & valid).flatten(2).sum(2)
    moved_y = ((y[:, 1:] != y[:, :-1]) & valid).flatten(2).sum(2)
    keep = n > 0
    return ((moved_p - moved_y).abs()[keep].double() / n[keep]).tolist()


def _clip_means(per_frame: list[list[float]], clips: int) -> list[float]:
    """Per clip: the mean over its frames and foreground classes of a per-(frame, class) score
    (``per_frame``: one ``[clips * T]`` list per class; NaN entries skipped); clips with no
    score at all are left out."""
    values = torch.tensor(per_frame, dtype=torch.float64).reshape(len(per_frame), clips, -1)
    values = values.permute(1, 0, 2).reshape(clips, -1)
    seen = ~torch.isnan(values)
    count = seen.sum(1)
    sums = torch.where(seen, values, torch.zeros_like(values)).sum(1)
    return (sums[count > 0] / count[count > 0]).tolist()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class Segmentation(TaskKind):
    name = "segmentation"
    needs_own_model = True
    metric = Metric("dice", "Dice")
    extra_metrics = (Metric("iou", "IoU"),
                     Metric("hd95", "HD95 (px)", higher_is_better=False, percent=False),
                     Metric("temporal_error", "temporal error", higher_is_better=False),
                     Metric("fps", "frames/s", percent=False))
    # frame pixels of one evaluation batch (a clip's activations scale with T x H x W)
    eval_pixels = 2 ** 20

    def check(self, data, where):
        if data.y.is_floating_point() or data.y.dim() not in (3, 4) or \
                tuple(data.x.shape[:data.y.dim() - 2]) != tuple(data.y.shape[:-2]) or \
                data.x.shape[-2:] != data.y.shape[-2:]:
            raise ValueError(f"{where}: a segmentation task needs images x [N, C, H, W] with "
                             f"masks y [N, H, W] (clips: x [N, T, C, H, W], y [N, T, H, W]) of "
                             f"integer class ids; got x {tuple(data.x.shape)}, y {data.y.dtype} "
                             f"{tuple(data.y.shape)}.")

    def loss(self, output, y):
        """Per-pixel cross-entropy; class logits on dim 1 (images) or 2 (clips)."""
        if y.dim() == 4:
            output, y = output.flatten(0, 1), y.flatten(0, 1)
        return F.cross_entropy(output, y, ignore_index=IGNORE_INDEX)

    def predicted(self, output):
        return output.argmax(-3)

    def rows_per_batch(self, x, batch_size, stream):
        """So that one batch holds at most ``eval_pixels`` frame pixels."""
        return max(1, min(batch_size, self.eval_pixels // max(x[0, ..., 0, :, :].numel(), 1)))

    @torch.no_grad()
    def score(self, predict, data, batch_size):
        """Dice and IoU per clip (the mean over its frames and foreground classes), averaged
        over clips (an image is a clip of one frame); HD95 over (frame, class) pairs;
        ``temporal_error`` (`change_error`, clips only); frames per second of ``predict`` up to
        its masks on the CPU (wall clock, so it varies between runs; the first batch's one-time
        costs, e.g. a Triton compile, count too: ``perf/gdkvm_speed.py`` times warm models)."""
        dice, iou, hd, moved, frames, seconds = [], [], [], [], 0, 0.0
        for x, y, t in data.batches(batch_size):
            t0 = time.perf_counter()
            out = predict(x, t)
            pred = self.predicted(out).cpu()          # waits for a GPU's queued kernels
            seconds += time.perf_counter() - t0
            flat_p, flat_y = pred.reshape(-1, *y.shape[-2:]), y.reshape(-1, *y.shape[-2:])
            frames += flat_y.shape[0]
            d, i = dice_iou(flat_p, flat_y, out.shape[-3])
            dice += _clip_means(d, y.shape[0])
            iou += _clip_means(i, y.shape[0])
            hd += [v for per in hd95(flat_p, flat_y, out.shape[-3]) for v in per if v == v]
            if y.dim() == 4 and y.shape[1] > 1:
                moved += change_error(pred, y)
        return {"dice": _mean(dice), "iou": _mean(iou), "hd95": _mean(hd),
                "temporal_error": _mean(moved), "fps": frames / seconds if seconds else
                float("nan")}


def task_kind(name: str) -> TaskKind:
    """The task kind registered as ``name`` (built-ins and plugins)."""
    from . import registry

    kind = registry.resolve("task_kind", name)
    kind = kind() if isinstance(kind, type) else kind
    if not isinstance(kind, TaskKind):
        from .errors import PluginError

        raise PluginError(f"Task kind {name!r} is a {type(kind).__name__}, which does not "
                          "subclass cl_toolkit.task_kinds.TaskKind; derive it from that class.")
    return kind
