"""Moving Fashion-MNIST: garments moving on a noisy canvas, segmented frame by frame (the second
video stream of GDKVM's issue; the Moving MNIST protocol of Srivastava et al. 2015,
https://arxiv.org/abs/1502.04681, with Fashion-MNIST objects and masks).

Each clip places ``num_objects`` Fashion-MNIST images (area-resized to ``object_size``) on a
``height x width`` canvas; each moves in a straight line at ``speed`` pixels per frame in a
random direction and bounces off the canvas edges (positions rounded to whole pixels, so the
masks are exact). Where objects overlap the brighter pixel shows (Moving MNIST's maximum).
Gaussian noise of std ``noise`` is added to the canvas. Mask: 1 where any object's own pixel
exceeds ``mask_threshold`` (classes: 0 background, 1 object; K = 2). Tasks differ by class
groups: task i draws its garments from the i-th group of ``10 / n_tasks`` consecutive
Fashion-MNIST classes (T-shirt/top and Trouser, then Pullover and Dress, ...), the same
foreground/background classes in every task (domain-il). Train clips use the training images,
test clips the test images. No first-frame mask is given to the model.

The images are read as `cl_toolkit.benchmarks.fashion_mnist` reads them (Debian's
``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist, or ``root``), with its error when
they are missing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError
from cl_toolkit.validation import at_least, between

from .fashion_mnist import CLASS_NAMES as GARMENTS
from .fashion_mnist import load_fashion_mnist
from .video_common import VIDEO_RANGES, VIDEO_SMOKE, seeded, video_stream

# Scaling of the canvas to roughly zero mean and unit scale (measured on the default stream:
# mean ~0.15, std ~0.3; fixed so that every clip and task is scaled alike: our choice).
MEAN, SCALE = 0.15, 0.3


def moving_clips(objects: torch.Tensor, n: int, frames: int, height: int, width: int, *,
                 num_objects: int = 2, speed: float = 2.0, noise: float = 0.1,
                 mask_threshold: float = 0.3, g: torch.Generator) -> dict:
    """``n`` clips from ``objects [M, s, s]`` (pixel values in [0, 1]): ``x [N, T, 1, H, W]``
    float32 (scaled), ``y [N, T, H, W]`` int64, ``index [N, K]`` (the objects used) and
    ``top_left [N, K, T, 2]`` (row, column of each object in each frame)."""
    s = objects.shape[-1]
    if s > height or s > width:
        raise ConfigError(f"benchmark.object_size={s} does not fit the {height} x {width} "
                          "canvas; use an object_size of at most min(height, width).")
    span = torch.tensor([height - s, width - s], dtype=torch.float64)
    index = torch.randint(len(objects), (n, num_objects), generator=g)
    pos = torch.rand(n, num_objects, 2, generator=g, dtype=torch.float64) * span
    angle = torch.rand(n, num_objects, generator=g, dtype=torch.float64) * 2 * math.pi
    vel = speed * torch.stack([torch.sin(angle), torch.cos(angle)], -1)
    top_left = torch.empty(n, num_objects, frames, 2, dtype=torch.long)
    for f in range(frames):
        top_left[:, :, f] = pos.round().long()
        pos = pos + vel
        # Bounce: reflect a coordinate that left [0, span] back inside, and turn its velocity.
        for _ in range(2):
            low, high = pos < 0, pos > span
            pos = torch.where(low, -pos, torch.where(high, 2 * span - pos, pos))
            vel = torch.where(low | high, -vel, vel)
        pos = torch.minimum(pos.clamp_min(0), span)
    canvas = torch.zeros(n, frames, height, width)
    mask = torch.zeros(n, frames, height, width, dtype=torch.bool)
    rows = torch.arange(s)
    for k in range(num_objects):
        obj = objects[index[:, k]]                                          # [N, s, s]
        r = top_left[:, k, :, 0, None] + rows                               # [N, T, s]
        c = top_left[:, k, :, 1, None] + rows
        ni = torch.arange(n)[:, None, None, None]
        fi = torch.arange(frames)[None, :, None, None]
        placed = obj[:, None].expand(n, frames, s, s)
        canvas[ni, fi, r[..., :, None], c[..., None, :]] = torch.maximum(
            canvas[ni, fi, r[..., :, None], c[..., None, :]], placed)
        mask[ni, fi, r[..., :, None], c[..., None, :]] |= placed > mask_threshold
    canvas = canvas + noise * torch.randn(canvas.shape, generator=g)
    x = ((canvas - MEAN) / SCALE).unsqueeze(2)
    return {"x": x, "y": mask.long(), "index": index, "top_left": top_left}


def moving_fashion_mnist(height: int = 32, width: int = 32, frames: int = 8,
                         train_clips: int = 32, test_clips: int = 16, n_tasks: int = 5,
                         num_objects: int = 2, object_size: int = 16, speed: float = 2.0,
                         noise: float = 0.1, mask_threshold: float = 0.3,
                         root: str | None = None, download: bool = False,
                         scenario: str = "domain-il", seed: int = 0):
    """The stream (module doc): ``n_tasks`` class groups (a divisor of 10), ``train_clips`` /
    ``test_clips`` clips per task of ``frames`` frames, ``x [N, T, 1, H, W]``, ``y [N, T, H,
    W]``. Each task and split draws from its own seed. No first-frame mask is given."""
    if n_tasks < 1 or 10 % n_tasks:
        raise ConfigError(f"benchmark.n_tasks={n_tasks}: the 10 Fashion-MNIST classes split "
                          "into equal groups only for n_tasks in 1, 2, 5 or 10.")
    train, test = load_fashion_mnist(root, download)
    per = 10 // n_tasks
    parts = []
    for i in range(n_tasks):
        classes = torch.arange(i * per, (i + 1) * per)
        splits = []
        for split, (data, count) in enumerate(((train, train_clips), (test, test_clips))):
            images = data.x[torch.isin(data.y, classes), 0]
            g = seeded(seed, i, split)
            # Only the images a split uses are resized (a few hundred, not 60,000).
            pick = torch.randperm(len(images), generator=g)[:count * num_objects]
            objects = F.interpolate(images[pick, None], size=(object_size, object_size),
                                    mode="area")[:, 0]
            clips = moving_clips(objects, count, frames, height, width,
                                 num_objects=num_objects, speed=speed, noise=noise,
                                 mask_threshold=mask_threshold, g=g)
            splits.append((clips["x"], clips["y"]))
        name = "+".join(GARMENTS[c] for c in classes.tolist())
        parts.append((name, splits[0], splits[1]))
    return video_stream("moving_fashion_mnist", parts, 2, scenario, seed,
                        info={"class_groups": [list(range(i * per, (i + 1) * per))
                                               for i in range(n_tasks)],
                              "num_objects": num_objects, "speed": speed, "noise": noise},
                        class_names=("background", "object"))


moving_fashion_mnist.task_kind = "segmentation"
moving_fashion_mnist.ranges = {
    **VIDEO_RANGES, "n_tasks": at_least(1), "num_objects": at_least(1),
    "object_size": at_least(1), "speed": at_least(0), "noise": at_least(0),
    "mask_threshold": between(0, 1, high_open=True)}
moving_fashion_mnist.smoke = {**VIDEO_SMOKE, "object_size": 8, "n_tasks": 2}
