"""Helpers shared by the stream builders: splitting a labelled set into class-incremental tasks
and the domain-il transforms (permutation, rotation), applied once to whole tensors; the
declarations of the keys several builders share (cl_toolkit/validation.py, smoke.py)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.validation import at_least, one_of

# n_tasks of the split and domain streams; the per-task sample limits of Fashion-MNIST's.
SPLIT_RANGES = {"n_tasks": at_least(1)}
SPLIT_SMOKE = {"n_tasks": 2}
LIMIT_RANGES = {"max_train_per_task": at_least(1), "max_test_per_task": at_least(1)}
LIMIT_SMOKE = {"max_train_per_task": 64, "max_test_per_task": 32}
# A token stream shares one vocabulary across its tasks: there are no classes to add up.
TOKEN_SCENARIO = one_of("domain-il", "task-il", note="a token stream shares one vocabulary, "
                        "so it has no classes to add up in class-il; task-il gives the task id")


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """Natural order 0..C-1 (the fixed order of the papers) or a seeded shuffle."""
    if seed is None:
        return list(range(num_classes))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_classes, generator=g).tolist()


def split_by_classes(name: str, train: TensorData, test: TensorData, num_classes: int,
                     n_tasks: int, scenario: str, order: Sequence[int],
                     class_names: Sequence[str] = (), seed: int = 0,
                     info: dict | None = None) -> TaskStream:
    """Tasks of ``num_classes / n_tasks`` consecutive classes of ``order`` each."""
    if n_tasks < 1 or num_classes % n_tasks:
        raise ConfigError(
            f"{name}: cannot split {num_classes} classes into {n_tasks} equal tasks; choose "
            f"n_tasks among the divisors of {num_classes}."
        )
    per = num_classes // n_tasks
    tasks = []
    for i in range(n_tasks):
        classes = tuple(int(c) for c in order[i * per:(i + 1) * per])
        sel = torch.tensor(classes)
        tasks.append(Task(
            index=i, name=f"{name}/{i}", classes=classes, class_names=tuple(class_names),
            train=train.subset(torch.isin(train.y, sel).nonzero().squeeze(1)),
            test=test.subset(torch.isin(test.y, sel).nonzero().squeeze(1)),
        ))
    return TaskStream(name=name, tasks=tasks, scenario=scenario, num_classes=num_classes,
                      input_shape=tuple(train.x.shape[1:]), seed=seed,
                      info={"class_order": list(map(int, order)), **(info or {})})


def permute_pixels(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Apply one fixed pixel permutation to every image of ``x`` ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every image of ``x`` ``[N, C, H, W]`` by ``degrees`` (bilinear, zero fill), in one
    batched grid-sample rather than a per-image transform."""
    theta = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    c, s = torch.cos(theta), torch.sin(theta)
    affine = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(affine.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def domain_stream(name: str, train: TensorData, test: TensorData, num_classes: int,
                  n_tasks: int, scenario: str, transforms: Sequence, task_names: Sequence[str],
                  class_names: Sequence[str] = (), seed: int = 0,
                  info: dict | None = None) -> TaskStream:
    """Every task holds all classes; task i applies ``transforms[i]`` to train and test."""
    if scenario == "class-il":
        raise ConfigError(f"{name} is a domain-incremental stream (all classes in every task); "
                          "use scenario=domain-il, or task-il when the task id is known.")
    classes = tuple(range(num_classes))
    tasks = [Task(index=i, name=task_names[i], classes=classes, class_names=tuple(class_names),
                  train=TensorData(transforms[i](train.x), train.y),
                  test=TensorData(transforms[i](test.x), test.y))
             for i in range(n_tasks)]
    return TaskStream(name=name, tasks=tasks, scenario=scenario, num_classes=num_classes,
                      input_shape=tuple(train.x.shape[1:]), seed=seed, info=info or {})
