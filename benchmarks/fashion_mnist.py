"""Fashion-MNIST streams: split (5 x 2 classes), permuted and rotated (domain-il, N tasks).

Files are the original idx files (``train-images-idx3-ubyte[.gz]`` etc.). We look in ``root``
(default: where Debian's ``dataset-fashion-mnist`` package puts them), then in torchvision's
layout ``root/FashionMNIST/raw``; with ``download=True`` torchvision fetches them there.
Pixels are scaled to [0, 1] without normalisation (the KCL MNIST protocol).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from cl_toolkit.errors import DatasetNotFoundError
from cl_toolkit.stream import TaskStream, TensorData

from .common import (LIMIT_RANGES, LIMIT_SMOKE, SPLIT_RANGES, SPLIT_SMOKE, class_order,
                     domain_stream, permute_pixels, rotate, split_by_classes)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic {raw[:4]!r}).")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {tuple(dims)} "
                         f"({int(np.prod(dims))} bytes) but holds {data.size} bytes.")
    return data.reshape(tuple(int(d) for d in dims))


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str | None = None, download: bool = False
                       ) -> tuple[TensorData, TensorData]:
    """Train and test sets as ``[N, 1, 28, 28]`` float tensors in [0, 1]."""
    root_path = Path(root or os.environ.get("CLTK_FASHION_MNIST", DEFAULT_ROOT))
    paths = {k: _find(root_path, v) for k, v in FILES.items()}
    if any(p is None for p in paths.values()) and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root_path), train=True, download=True)
        FashionMNIST(str(root_path), train=False, download=True)
        paths = {k: _find(root_path, v) for k, v in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files {', '.join(missing)} (.gz or plain) were not found in "
            f"{root_path} nor in {root_path / 'FashionMNIST' / 'raw'}. Install them with "
            "`apt-get install dataset-fashion-mnist` (puts them in "
            f"{DEFAULT_ROOT}), point benchmark.root (or $CLTK_FASHION_MNIST) at a folder that "
            "has them, or set benchmark.download=true to let torchvision fetch them."
        )

    def images(k):
        return torch.from_numpy(read_idx(paths[k]).copy()).float().div_(255).unsqueeze(1)

    def labels(k):
        return torch.from_numpy(read_idx(paths[k]).astype(np.int64))

    return (TensorData(images("train_images"), labels("train_labels")),
            TensorData(images("test_images"), labels("test_labels")))


def _limit(data: TensorData, n: int | None, seed: int) -> TensorData:
    if n is None or n >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n])


def split_fashion_mnist(n_tasks: int = 5, scenario: str = "task-il",
                        class_order_seed: int | None = None, root: str | None = None,
                        download: bool = False, max_train_per_task: int | None = None,
                        max_test_per_task: int | None = None, seed: int = 0) -> TaskStream:
    """The per-task limits draw a seeded subset of each task's own images (after the split, so
    that every task keeps its classes)."""
    train, test = load_fashion_mnist(root, download)
    stream = split_by_classes("split_fashion_mnist", train, test, 10, n_tasks, scenario,
                              class_order(10, class_order_seed), CLASS_NAMES, seed)
    for task in stream.tasks:
        task.train = _limit(task.train, max_train_per_task, seed)
        task.test = _limit(task.test, max_test_per_task, seed)
    return stream


def permuted_fashion_mnist(n_tasks: int = 8, scenario: str = "domain-il",
                           root: str | None = None, download: bool = False,
                           max_train_per_task: int | None = None,
                           max_test_per_task: int | None = None, seed: int = 0) -> TaskStream:
    """Task 0 is the identity, every later task has its own fixed pixel permutation (drawn from
    ``seed``)."""
    train, test = load_fashion_mnist(root, download)
    train, test = _limit(train, max_train_per_task, seed), _limit(test, max_test_per_task, seed)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(784)] + [torch.randperm(784, generator=g) for _ in range(n_tasks - 1)]
    transforms = [lambda x, p=p: permute_pixels(x, p) for p in perms]
    return domain_stream("permuted_fashion_mnist", train, test, 10, n_tasks, scenario,
                         transforms, [f"permuted/{i}" for i in range(n_tasks)], CLASS_NAMES,
                         seed)


def rotated_fashion_mnist(n_tasks: int = 8, scenario: str = "domain-il",
                          root: str | None = None, download: bool = False,
                          degrees_per_task: float = 10.0,
                          max_train_per_task: int | None = None,
                          max_test_per_task: int | None = None, seed: int = 0) -> TaskStream:
    """Task t (1-based) is rotated by ``(t-1) * 10`` degrees minus a uniform draw in [0, 10),
    one angle per task (the rotated-MNIST protocol of Stable SGD / KCL)."""
    train, test = load_fashion_mnist(root, download)
    train, test = _limit(train, max_train_per_task, seed), _limit(test, max_test_per_task, seed)
    g = torch.Generator().manual_seed(seed)
    angles = [t * degrees_per_task - float(torch.rand((), generator=g)) * degrees_per_task
              for t in range(n_tasks)]
    transforms = [lambda x, a=a: rotate(x, a) for a in angles]
    return domain_stream("rotated_fashion_mnist", train, test, 10, n_tasks, scenario,
                         transforms, [f"rotated/{a:.1f}" for a in angles], CLASS_NAMES, seed,
                         info={"angles": angles})


for _builder in (split_fashion_mnist, permuted_fashion_mnist, rotated_fashion_mnist):
    _builder.ranges = {**SPLIT_RANGES, **LIMIT_RANGES}
    _builder.smoke = {**SPLIT_SMOKE, **LIMIT_SMOKE}
