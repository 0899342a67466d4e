"""Split digits: sklearn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn),
5 tasks x 2 classes. The embedded default stream: it needs no download and trains in seconds."""
from __future__ import annotations

import torch

from cl_toolkit.stream import TaskStream, TensorData

from .common import SPLIT_RANGES, SPLIT_SMOKE, class_order, split_by_classes


def load_digits_tensors(test_fraction: float = 0.25) -> tuple[TensorData, TensorData]:
    """Images ``[N, 1, 8, 8]`` in [0, 1] and a stratified split that is fixed (seed 0) so that
    every run, whatever its seed, is scored on the same test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                              stratify=y.numpy(), random_state=0)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return TensorData(x[tr], y[tr]), TensorData(x[te], y[te])


def split_digits(n_tasks: int = 5, scenario: str = "task-il", class_order_seed: int | None = None,
                 seed: int = 0) -> TaskStream:
    train, test = load_digits_tensors()
    return split_by_classes("split_digits", train, test, 10, n_tasks, scenario,
                            class_order(10, class_order_seed), [str(i) for i in range(10)], seed)


split_digits.ranges, split_digits.smoke = SPLIT_RANGES, SPLIT_SMOKE
