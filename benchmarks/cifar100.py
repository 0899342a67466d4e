"""Split CIFAR-100 on the original ``cifar-100-python`` files (the format torchvision downloads).

KCL protocol (https://arxiv.org/abs/2107.05757): 20 tasks x 5 classes in the fixed class order
0..99, task-il; the 10 x 10 variant is ``n_tasks=10``. ``class_order_seed`` shuffles the order.
We parse the pickles ourselves (a dict with ``data`` [N, 3072] uint8 and ``fine_labels``) so
that files we did not download, such as the small ones our tests write, load by the same path;
``download=True`` uses torchvision to fetch the archive.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from cl_toolkit.errors import DatasetNotFoundError
from cl_toolkit.stream import TaskStream, TensorData

from .common import SPLIT_RANGES, SPLIT_SMOKE, class_order, split_by_classes

FOLDER = "cifar-100-python"
# Per-channel statistics of the CIFAR-100 training set.
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetNotFoundError(
            f"{path} is not a readable CIFAR-100 pickle ({type(exc).__name__}: {exc}); delete "
            "the folder and download it again (benchmark.download=true)."
        ) from exc


def _key(d: dict, name: str):
    return d[name.encode()] if name.encode() in d else d[name]


def load_cifar100(root: str | None = None, download: bool = False, normalize: bool = True
                  ) -> tuple[TensorData, TensorData, list[str]]:
    """Train / test ``[N, 3, 32, 32]`` float tensors and the 100 fine class names."""
    root_path = Path(root or os.environ.get("CLTK_DATA", "~/.cache/cl_toolkit/data")).expanduser()
    folder = root_path / FOLDER
    if not (folder / "train").is_file() and download:
        from torchvision.datasets import CIFAR100

        try:
            CIFAR100(str(root_path), train=True, download=True)
        except (OSError, RuntimeError) as exc:  # no network, proxy, refused, bad checksum
            raise DatasetNotFoundError(
                f"Downloading CIFAR-100 into {root_path} failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Offline: fetch {CIFAR100.url} on a connected machine, "
                f"extract it into {root_path} (it holds {FOLDER}/train, test, meta; or set "
                "benchmark.root / $CLTK_DATA to where it is) and run with "
                "benchmark.download=false."
            ) from exc
    missing = [n for n in ("train", "test", "meta") if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-100 files {', '.join(missing)} not found in {folder}. Set "
            "benchmark.download=true to fetch them with torchvision, or extract "
            "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into "
            f"{root_path} (benchmark.root or $CLTK_DATA)."
        )
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def split(name: str) -> TensorData:
        d = _unpickle(folder / name)
        data = np.asarray(_key(d, "data"), dtype=np.uint8)
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()).float().div_(255)
        if normalize:
            x = (x - mean) / std
        return TensorData(x, torch.as_tensor(np.asarray(_key(d, "fine_labels")), dtype=torch.long))

    names = [n.decode() if isinstance(n, bytes) else n
             for n in _key(_unpickle(folder / "meta"), "fine_label_names")]
    return split("train"), split("test"), names


def split_cifar100(n_tasks: int = 20, scenario: str = "task-il",
                   class_order_seed: int | None = None, root: str | None = None,
                   download: bool = False, normalize: bool = True, seed: int = 0) -> TaskStream:
    train, test, names = load_cifar100(root, download, normalize)
    return split_by_classes("split_cifar100", train, test, 100, n_tasks, scenario,
                            class_order(100, class_order_seed), names, seed)


split_cifar100.ranges, split_cifar100.smoke = SPLIT_RANGES, SPLIT_SMOKE
