"""Avalanche benchmarks as task streams, and task streams as Avalanche benchmarks.

`from_avalanche` turns any Avalanche benchmark (its ``train_stream`` / ``test_stream``) into a
`TaskStream` held as tensors, so every Avalanche benchmark runs under our runner and evaluator.
`to_avalanche` goes the other way for the `avalanche` strategy adapter.
Avalanche: https://avalanche.continualai.org (Lomonaco et al., 2021).
"""
from __future__ import annotations

from typing import Any

import torch

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.stream import Task, TaskStream, TensorData


def _require_avalanche():
    try:
        import avalanche  # noqa: F401
    except ImportError as exc:
        raise ConfigError("This needs Avalanche: pip install 'cl_toolkit[avalanche]'.") from exc


def _tensors(dataset, batch_size: int = 2048) -> TensorData:
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    return TensorData(torch.cat(xs).float(), torch.cat(ys).long())


def from_avalanche(benchmark: Any, name: str = "avalanche", scenario: str | None = None,
                   seed: int = 0) -> TaskStream:
    """Convert an Avalanche benchmark. The scenario defaults to task-il when experiences carry
    different task labels and class-il otherwise."""
    train_exps, test_exps = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(train_exps) != len(test_exps):
        raise ConfigError(f"Avalanche benchmark has {len(train_exps)} train but "
                          f"{len(test_exps)} test experiences; we need one test set per task.")
    labels = [getattr(e, "task_label", 0) for e in train_exps]
    if scenario is None:
        scenario = "task-il" if len(set(labels)) > 1 else "class-il"
    tasks = []
    for i, (tr, te) in enumerate(zip(train_exps, test_exps)):
        tasks.append(Task(index=i, name=f"{name}/{i}", train=_tensors(tr.dataset),
                          test=_tensors(te.dataset),
                          classes=tuple(sorted(int(c) for c in tr.classes_in_this_experience))))
    num_classes = int(max(max(t.classes) for t in tasks)) + 1
    return TaskStream(name=name, tasks=tasks, scenario=scenario, num_classes=num_classes,
                      input_shape=tuple(tasks[0].train.x.shape[1:]), seed=seed)


def avalanche_stream(factory: str = "SplitMNIST", kwargs: dict | None = None,
                     scenario: str | None = None, seed: int = 0) -> TaskStream:
    """Build ``avalanche.benchmarks.classic.<factory>(**kwargs)`` and convert it (the dataset is
    fetched by Avalanche/torchvision as usual)."""
    _require_avalanche()
    from avalanche.benchmarks import classic

    if not hasattr(classic, factory):
        valid = [n for n in dir(classic) if n[0].isupper()]
        raise ConfigError(f"avalanche.benchmarks.classic has no benchmark {factory!r}; choose "
                          f"one of {', '.join(valid)}.")
    kwargs = dict(kwargs or {})
    kwargs.setdefault("seed", seed)
    try:
        benchmark = getattr(classic, factory)(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"avalanche.benchmarks.classic.{factory} refused its arguments "
                          f"({exc}). Pass them as benchmark.kwargs, e.g. "
                          "'benchmark.kwargs={n_experiences: 5}'.") from None
    except (OSError, RuntimeError) as exc:  # urllib / torchvision download failures
        from avalanche.benchmarks.datasets.dataset_utils import default_dataset_location

        root = kwargs.get("dataset_root") or default_dataset_location("")
        raise DatasetNotFoundError(
            f"Avalanche could not load or download the data of {factory} "
            f"({type(exc).__name__}: {str(exc)[:200]}). Offline: fetch the dataset on a "
            f"connected machine (run the same command there, or torchvision's dataset class "
            f"with download=True) and copy its folder under {root}, or point "
            "'benchmark.kwargs={dataset_root: DIR}' at a folder that holds it."
        ) from exc
    return from_avalanche(benchmark, f"avalanche_{factory}", scenario, seed)


def to_avalanche(stream: TaskStream):
    """An Avalanche benchmark over the same tensors (task label = task index)."""
    _require_avalanche()
    from avalanche.benchmarks import tensors_benchmark

    return tensors_benchmark(
        train_tensors=[(t.train.x, t.train.y) for t in stream],
        test_tensors=[(t.test.x, t.test.y) for t in stream],
        task_labels=[t.index for t in stream],
    )
