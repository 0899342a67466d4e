"""What every video segmentation stream shares: the gate its clips pass through
(`check_clips`), the common config declarations, and the helpers that turn clips into a
domain-il `TaskStream` of task kind ``segmentation`` (cl_toolkit/task_kinds.py).

Layout of every video stream: a task's ``x`` is float32 ``[N, T, C, H, W]`` (normalised to
roughly zero mean and unit scale), its ``y`` int64 ``[N, T, H, W]`` of class ids in ``[0, K)``
(0 = background) or ``IGNORE_INDEX`` (-100) for unlabelled pixels and frames. No first-frame
mask is given to the model (GDKVM's echocardiography setting, arXiv 2512.10252): every frame is
segmented from the images alone, so ``info["first_mask_given"]`` is ``False``.
"""
from __future__ import annotations

import numpy as np
import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.renderers.segmentation import examples_analysis
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.task_kinds import IGNORE_INDEX
from cl_toolkit.validation import at_least, one_of

VIDEO_SCENARIO = one_of("domain-il", note="every task of a video stream has the same classes "
                        "(background and the structures); what shifts is the images")
# Keys every video builder takes: frame size, clip length, clips per task.
VIDEO_RANGES = {"height": at_least(4), "width": at_least(4), "frames": at_least(1),
                "train_clips": at_least(1), "test_clips": at_least(1),
                "scenario": VIDEO_SCENARIO}
VIDEO_SMOKE = {"height": 16, "width": 16, "frames": 4, "train_clips": 6, "test_clips": 3}


def check_clips(x: torch.Tensor, y: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse clips no segmenter can learn from, before anything trains: ``x`` must be floating
    ``[N, T, C, H, W]`` with N, T > 0 and finite pixels, ``y`` integer ``[N, T, H, W]`` (the
    frames' N, T, H, W) holding class ids in ``[0, num_classes)`` or ``IGNORE_INDEX``.
    ``where`` names the config key or file the clips came from; each error says the fix."""
    if x.dim() != 5 or not x.is_floating_point():
        raise ConfigError(f"{where}: video clips need float frames x [N, T, C, H, W]; got "
                          f"{x.dtype} {tuple(x.shape)}. Give each clip as T frames of C "
                          "channels.")
    if x.shape[0] == 0:
        raise ConfigError(f"{where}: no clips; give at least one clip per task (raise the "
                          "clip count or point the key at data that has clips).")
    if x.shape[1] == 0:
        raise ConfigError(f"{where}: the clips have zero frames; every clip needs at least one "
                          "frame (set frames >= 1, or drop empty sequences).")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"{where}: masks must be integer class ids, got {y.dtype}; convert "
                          "them with .long() (IGNORE_INDEX=-100 for unlabelled pixels).")
    n, t, _, h, w = x.shape
    if tuple(y.shape) != (n, t, h, w):
        raise ConfigError(f"{where}: masks y {tuple(y.shape)} do not match the frames x "
                          f"{tuple(x.shape)}; y needs one [H, W] mask per frame, [N, T, H, W] "
                          f"= {[n, t, h, w]} (resize the masks with the frames, nearest "
                          "neighbour).")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        i, f = (~finite).nonzero()[0, :2].tolist()
        raise ConfigError(f"{where}: {int((~finite).sum())} pixel values are NaN or infinite "
                          f"(first: clip {i}, frame {f}); clean or drop those frames before "
                          "building the stream.")
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        values = sorted({int(v) for v in torch.unique(y[bad])})[:5]
        raise ConfigError(f"{where}: mask values {values} lie outside the class set "
                          f"0..{num_classes - 1} (and {IGNORE_INDEX} for unlabelled pixels); "
                          "remap the labels to class ids or raise num_classes to cover them.")


def normalise_clip(x: torch.Tensor) -> torch.Tensor:
    """Per clip: zero mean and unit standard deviation over all its pixels and frames,
    ``x [N, T, C, H, W]`` -> same shape (our choice for real data: no statistic crosses clips,
    so no task's test or future data enters another's input scaling)."""
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    std = x.std(dim=(1, 2, 3, 4), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def seeded(*keys: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (seed, task, split, component): each part of
    a stream draws from its own, so changing one knob never shifts another part's draws."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def per_task(values: dict[str, list], where: str = "benchmark") -> int:
    """The number of tasks set by per-task lists: each list has one value per task or one value
    for all (broadcast); lists of other lengths disagree."""
    lengths = {k: len(v) for k, v in values.items()}
    if any(n == 0 for n in lengths.values()):
        empty = next(k for k, n in lengths.items() if n == 0)
        raise ConfigError(f"{where}.{empty} is an empty list; give one value per task, or one "
                          "value for all tasks.")
    longer = {k: n for k, n in lengths.items() if n > 1}
    if len(set(longer.values())) > 1:
        raise ConfigError(f"{where}: the per-task lists disagree on the number of tasks "
                          f"({', '.join(f'{k}: {n}' for k, n in longer.items())}); give each "
                          "the same number of values, or a single value for all tasks.")
    return max(lengths.values())


def video_stream(name: str, parts: list[tuple[str, tuple, tuple]], num_classes: int,
                 scenario: str, seed: int, info: dict, class_names: tuple[str, ...],
                 where: str = "benchmark") -> TaskStream:
    """A domain-il segmentation stream from ``(task name, (x_train, y_train), (x_test,
    y_test))`` per task; every clip set passes `check_clips`, and the contour-figure analysis
    is attached (``stream.analyses["segmentation_examples"]``)."""
    if scenario != "domain-il":
        raise ConfigError(f"{where}.scenario={scenario!r}; a video segmentation stream is "
                          "domain-il (every task has the same classes). Set "
                          f"{where}.scenario=domain-il.")
    tasks = []
    for i, (task_name, (xa, ya), (xb, yb)) in enumerate(parts):
        check_clips(xa, ya, num_classes, f"{where} ({name} task {task_name!r} train)")
        check_clips(xb, yb, num_classes, f"{where} ({name} task {task_name!r} test)")
        tasks.append(Task(i, task_name, TensorData(xa, ya), TensorData(xb, yb),
                          classes=tuple(range(num_classes)), class_names=class_names))
    shape = tuple(tasks[0].train.x.shape[1:])
    stream = TaskStream(name, tasks, scenario, num_classes, shape, seed,
                        info={"first_mask_given": False, **info}, kind="segmentation")
    stream.analyses["segmentation_examples"] = examples_analysis(tasks)
    return stream
