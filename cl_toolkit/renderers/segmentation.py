"""Predicted and true contours on a few frames of each task (``results["extras"]
["segmentation_examples"]``): researchers judge a segmenter by its masks, not only its Dice.

`examples_analysis` is the stream analysis that keeps them (a video stream sets
``stream.analyses["segmentation_examples"] = examples_analysis(tasks)``): after every task it
segments the first test clip of every task, so the stored examples (the last analysis, after the
last task) show what the model still gets right on the tasks it learned first. Frames are kept
at most `MAX_SIDE` pixels a side (a strided subsample: the figure only), as strings: the image
as one hex digit per pixel (16 grey levels), the masks as one character per pixel (the class id,
``x`` for an unlabelled pixel). `render` draws them: one panel per (task, frame), the truth in
green, the prediction in red.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from ..task_kinds import IGNORE_INDEX
from . import save_png

MAX_SIDE = 64
FRAMES = 4
MAX_RUNS = 4  # runs drawn per report section (the first run of each row)


def _frames(y: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` frame indices of the clip masks ``y [T, H, W]``, evenly spaced over its
    labelled frames (all frames where every one is unlabelled)."""
    labelled = [t for t in range(y.shape[0]) if bool((y[t] != IGNORE_INDEX).any())]
    pool = labelled or list(range(y.shape[0]))
    if len(pool) <= count:
        return pool
    return [pool[round(i * (len(pool) - 1) / (count - 1))] for i in range(count)] if count > 1 \
        else pool[:1]


def _image_text(img: torch.Tensor) -> str:
    lo, hi = float(img.min()), float(img.max())
    levels = ((img - lo) / (hi - lo) * 15).round().long() if hi > lo else torch.zeros_like(
        img, dtype=torch.long)
    return "".join("0123456789abcdef"[v] for v in levels.flatten().tolist())


def _mask_text(mask: torch.Tensor) -> str:
    if int(mask.max()) > 9:
        raise ValueError("segmentation_examples keeps class ids 0-9; a stream with more "
                         "classes needs another encoding")
    return "".join("x" if v == IGNORE_INDEX else str(v) for v in mask.flatten().tolist())


def examples_analysis(tasks, frames: int = FRAMES):
    """The analysis keeping the first test clip of every task in ``tasks`` (clips ``[N, T, C,
    H, W]`` with masks ``[N, T, H, W]``; an image task is a clip of one frame)."""
    clips = []
    for task in tasks:
        x, y = task.test.x[:1], task.test.y[:1]
        frames_x, frames_y = (x, y) if y.dim() == 4 else (x[:, None], y[:, None])
        clips.append((task.name, x, frames_x, frames_y, _frames(frames_y[0], frames)))

    def analyse(predict) -> dict:
        out = []
        for name, x, frames_x, y, pick in clips:
            pred = predict(x).reshape(y.shape)
            step = max(1, math.ceil(max(y.shape[-2:]) / MAX_SIDE))
            sub = (slice(None, None, step), slice(None, None, step))
            out.append({"task": name, "frames": pick,
                        "height": len(range(0, y.shape[-2], step)),
                        "width": len(range(0, y.shape[-1], step)),
                        "image": [_image_text(frames_x[0, t, 0][sub]) for t in pick],
                        "truth": [_mask_text(y[0, t][sub]) for t in pick],
                        "pred": [_mask_text(pred[0, t][sub]) for t in pick]})
        return {"tasks": out}

    return analyse


def check(extra) -> None:
    """Refuse an ``extras["segmentation_examples"]`` `render` cannot draw."""
    if not isinstance(extra, dict) or not isinstance(extra.get("tasks"), list):
        raise TypeError("no 'tasks' list")
    for i, e in enumerate(extra["tasks"]):
        missing = [k for k in ("task", "frames", "height", "width", "image", "truth", "pred")
                   if not isinstance(e, dict) or k not in e]
        if missing:
            raise ValueError(f"tasks[{i}] lacks {', '.join(map(repr, missing))}")
        size = e["height"] * e["width"]
        for key in ("image", "truth", "pred"):
            if len(e[key]) != len(e["frames"]) or any(len(s) != size for s in e[key]):
                raise ValueError(f"tasks[{i}].{key} does not hold {len(e['frames'])} frames of "
                                 f"{e['height']} x {e['width']} pixels")


def _decode(text: str, h: int, w: int, image: bool = False):
    import numpy as np

    if image:
        return np.array([int(c, 16) for c in text], dtype=float).reshape(h, w)
    return np.array([-1 if c == "x" else int(c) for c in text]).reshape(h, w)


def _contours(ax, mask, color: str, style: str) -> None:
    import numpy as np

    for c in sorted(set(np.unique(mask).tolist()) - {0, -1}):
        ax.contour((mask == c).astype(float), levels=[0.5], colors=color, linewidths=1.0,
                   linestyles=style)


def render(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """One figure per row of the section (its first run): tasks down, frames across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, dict] = {}
    for r in runs:
        firsts.setdefault(r["_row"], r)
    md, page = ["### Predicted (red) and true (green) contours, after the last task", ""], []
    for n, (row, r) in enumerate(list(firsts.items())[:MAX_RUNS]):
        tasks = r["extras"]["segmentation_examples"]["tasks"]
        cols = max(len(e["frames"]) for e in tasks)
        fig, axes = plt.subplots(len(tasks), cols, figsize=(1.6 * cols, 1.6 * len(tasks)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, e in enumerate(tasks):
            h, w = e["height"], e["width"]
            for j, t in enumerate(e["frames"]):
                ax = axes[i, j]
                ax.imshow(_decode(e["image"][j], h, w, image=True), cmap="gray")
                _contours(ax, _decode(e["truth"][j], h, w), "lime", "solid")
                _contours(ax, _decode(e["pred"][j], h, w), "red", "dashed")
                ax.set_title(f"frame {t}", fontsize=7)
            axes[i, 0].text(-0.08, 0.5, textwrap.fill(e["task"], 16), fontsize=7, ha="right",
                            va="center", transform=axes[i, 0].transAxes)
        fig.suptitle(row, fontsize=8)
        ref_md, ref_html = save_png(fig, out_dir, f"segmentation_examples_{n}.png", wide=True)
        md += [f"{row}:", "", ref_md, ""]
        page.append(f"<p>{row}</p>{ref_html}")
    if len(firsts) > MAX_RUNS:
        md.append(f"({len(firsts) - MAX_RUNS} more rows not drawn.)")
    html = "<h3>Predicted (red) and true (green) contours, after the last task</h3>" + \
        "".join(page)
    return "\n".join(md), html


render.check = check
