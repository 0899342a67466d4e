"""CLIP-ViT task sets for model merging: TA8, TALL14, TALL20.

The protocol of task arithmetic (https://arxiv.org/abs/2212.04089) and OPCM
(https://arxiv.org/abs/2501.09522): one open_clip model (`cl_toolkit.models.clip`) whose
zero-shot heads come from each task's class names and the prompt templates given here
(``task.info["templates"]``). The stream is task-il: each task is evaluated with its own head,
as in the papers.

Datasets come from torchvision under ``root``. With ``download=True`` torchvision fetches
those it can; these need manual download (put them where the path says):

- StanfordCars: torchvision's source is gone; get ``stanford_cars`` (devkit, cars_train,
  cars_test, cars_test_annos_withlabels.mat) into ``root/stanford_cars/``.
- RESISC45: not in torchvision; unpack NWPU-RESISC45 as ``root/resisc45/NWPU-RESISC45/<class>/``.
- FER2013: Kaggle login; put ``icml_face_data.csv`` (or ``fer2013.csv``) into
  ``root/fer2013/`` (with only ``train.csv`` / ``test.csv`` torchvision has no test labels).
- PCAM needs ``h5py``; SUN397 is a 37 GB download.

SUN397, EuroSAT and RESISC45 ship without a train/test split: a fixed 80/20 split (seed 0,
independent of the run's seed) is used. Images are kept as uint8 ``[N, 3, S, S]`` tensors
(a quarter of float32's memory), resized (bicubic, shorter side) and centre-cropped to the
model's input size; ``max_train`` / ``max_test`` subsample each task (fixed seed) so a stream
fits in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from cl_toolkit.errors import ConfigError, DatasetNotFoundError, suggest
from cl_toolkit.models.clip import PHOTO
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.validation import at_least

TA8 = ("SUN397", "StanfordCars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
TALL14 = TA8 + ("Flowers102", "PCAM", "FER2013", "OxfordIIITPet", "STL10", "CIFAR100")
TALL20 = TALL14 + ("CIFAR10", "Food101", "FashionMNIST", "EMNIST", "KMNIST", "RenderedSST2")
TASK_SETS = {"TA8": TA8, "TALL14": TALL14, "TALL20": TALL20}

DIGITS = ('a photo of the number "{}".', 'a photo of the digit "{}".')
SATELLITE = ("a satellite photo of {}.", "an aerial view of {}.")
GTSRB_NAMES = (
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120",
    "no passing", "no passing for trucks", "right of way at the next intersection",
    "priority road", "yield", "stop", "no vehicles", "no trucks", "no entry",
    "general caution", "dangerous curve to the left", "dangerous curve to the right",
    "double curve", "bumpy road", "slippery road", "road narrows on the right", "road work",
    "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice or snow", "wild animals crossing", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left",
    "keep right", "keep left", "roundabout", "end of no passing",
    "end of no passing for trucks")
EUROSAT_NAMES = ("annual crop land", "forest", "herbaceous vegetation", "a highway",
                 "an industrial area", "pasture", "permanent crop land", "a residential area",
                 "a river", "a sea or lake")


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one task: ``load(root, train, download)`` returns a torchvision dataset of
    (PIL image, int label); ``names`` are the class names (None: the dataset's ``classes``);
    ``split`` says whether the dataset has its own train/test split; ``fix_image`` repairs the
    stored orientation (EMNIST's images are transposed)."""

    load: Callable
    templates: tuple[str, ...] = PHOTO
    names: tuple[str, ...] | None = None
    split: bool = True
    manual: str = ""
    first_class: int = 0  # labels below it never occur (EMNIST letters: 0 is "N/A")
    fix_image: Callable | None = None


def _tv(cls_name: str, mode: str, **extra) -> Callable:
    """Loader for a torchvision dataset; ``mode``: "train" (a bool), "split" (train/test),
    "trainval" (trainval/test) or "none" (one set, split by us)."""
    def load(root, train, download):
        import torchvision.datasets as D

        cls = getattr(D, cls_name)
        kw = dict(extra)
        if mode == "train":
            kw["train"] = train
        elif mode == "split":
            kw["split"] = "train" if train else "test"
        elif mode == "trainval":
            kw["split"] = "trainval" if train else "test"
        if cls_name != "FER2013":
            kw["download"] = download
        return cls(str(root), **kw)
    return load


def _resisc45(root, train, download):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(Path(root) / "resisc45" / "NWPU-RESISC45"))


DATASETS: dict[str, DatasetSpec] = {
    "SUN397": DatasetSpec(_tv("SUN397", "none"), split=False),
    "StanfordCars": DatasetSpec(_tv("StanfordCars", "split"), ("a photo of a {}, a type of car.",
                                                               "a photo of the {}, a car."),
                                manual="stanford_cars/ (devkit, cars_train, cars_test)"),
    "RESISC45": DatasetSpec(_resisc45, SATELLITE, split=False,
                            manual="resisc45/NWPU-RESISC45/<class>/*.jpg"),
    "EuroSAT": DatasetSpec(_tv("EuroSAT", "none"), SATELLITE, EUROSAT_NAMES, split=False),
    "SVHN": DatasetSpec(_tv("SVHN", "split"), DIGITS, tuple(str(i) for i in range(10))),
    "GTSRB": DatasetSpec(_tv("GTSRB", "split"), ('a photo of a "{}" traffic sign.',
                                                'a zoomed in photo of a "{}" traffic sign.'),
                         GTSRB_NAMES),
    "MNIST": DatasetSpec(_tv("MNIST", "train"), DIGITS, tuple(str(i) for i in range(10))),
    "DTD": DatasetSpec(_tv("DTD", "split"), ("a photo of a {} texture.",
                                            "a photo of a {} pattern.")),
    "Flowers102": DatasetSpec(_tv("Flowers102", "split"), ("a photo of a {}, a type of flower.",)),
    "PCAM": DatasetSpec(_tv("PCAM", "split"), ("a histopathology slide showing {}.",),
                        ("lymph node tissue", "lymph node tissue with metastatic tumour")),
    "FER2013": DatasetSpec(_tv("FER2013", "split"), ("a photo of a {} looking face.",
                                                    "a face that looks {}."),
                           ("angry", "disgusted", "fearful", "happy", "sad", "surprised",
                            "neutral"), manual="fer2013/train.csv, test.csv (Kaggle)"),
    "OxfordIIITPet": DatasetSpec(_tv("OxfordIIITPet", "trainval"),
                                 ("a photo of a {}, a type of pet.",)),
    "STL10": DatasetSpec(_tv("STL10", "split")),
    "CIFAR100": DatasetSpec(_tv("CIFAR100", "train")),
    "CIFAR10": DatasetSpec(_tv("CIFAR10", "train")),
    "Food101": DatasetSpec(_tv("Food101", "split"), ("a photo of {}, a type of food.",)),
    "FashionMNIST": DatasetSpec(_tv("FashionMNIST", "train"), ("a photo of a {}.",
                                                              "a black and white photo of a {}.")),
    "EMNIST": DatasetSpec(_tv("EMNIST", "train", split="letters"),
                          ('a photo of the letter "{}".',), first_class=1,
                          fix_image=lambda im: im.transpose(Image.Transpose.TRANSPOSE)),
    "KMNIST": DatasetSpec(_tv("KMNIST", "train"), ('a photo of the character "{}".',)),
    "RenderedSST2": DatasetSpec(_tv("RenderedSST2", "split"),
                                ("a {} review of a movie.",), ("negative", "positive")),
}


def _readable(name: str) -> str:
    return name.replace("_", " ").replace("/", " ").strip()


def load_split(name: str, root: str | Path, train: bool, image_size: int,
               max_samples: int | None = None, download: bool = False
               ) -> tuple[TensorData, tuple[str, ...]]:
    """One split of one dataset as uint8 ``[N, 3, S, S]`` images and labels, plus class names."""
    from torchvision import transforms as T

    if name not in DATASETS:
        raise ConfigError(f"Unknown CLIP task {name!r}.{suggest(name, DATASETS)} Known tasks: "
                          f"{', '.join(DATASETS)}; task sets: {', '.join(TASK_SETS)}.")
    spec = DATASETS[name]
    try:
        ds = spec.load(Path(root), train, download)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        where = spec.manual or "(torchvision downloads it with download=True)"
        raise DatasetNotFoundError(
            f"Dataset {name} is not under {str(root)!r}: {exc}. Expected layout: "
            f"{str(root)}/{where}. See cl_toolkit.benchmarks.clip_tasks for which sets need "
            "a manual download."
        ) from exc
    names = (spec.names or tuple(_readable(c) for c in ds.classes))[spec.first_class:]
    index = torch.arange(len(ds))
    if not spec.split:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(ds))
        index = perm[:cut] if train else perm[cut:]
    if max_samples is not None and len(index) > max_samples:
        g = torch.Generator().manual_seed(1 if train else 2)
        index = index[torch.randperm(len(index), generator=g)[:max_samples]].sort().values
    prep = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.PILToTensor()])
    xs, ys = [], []
    for i in index.tolist():
        image, label = ds[i]
        if label is None:
            raise DatasetNotFoundError(
                f"Dataset {name} under {str(root)!r} has no labels for its "
                f"{'train' if train else 'test'} split (FER2013 from train.csv / test.csv "
                "alone); add icml_face_data.csv or fer2013.csv next to them."
            )
        if spec.fix_image is not None:
            image = spec.fix_image(image)
        xs.append(prep(image.convert("RGB")))
        ys.append(int(label) - spec.first_class)
    return TensorData(torch.stack(xs), torch.tensor(ys)), names


def clip_stream(tasks: str | Sequence[str] = "TA8", root: str | Path = "data",
                image_size: int = 224, max_train: int | None = None,
                max_test: int | None = None, download: bool = False, seed: int = 0
                ) -> TaskStream:
    """A task-il stream of CLIP tasks; class ids are the tasks' classes laid end to end.
    ``benchmark.shuffle_tasks=true`` permutes the task order by the run seed."""
    names = list(TASK_SETS[tasks]) if isinstance(tasks, str) and tasks in TASK_SETS else \
        ([tasks] if isinstance(tasks, str) else list(tasks))
    built, class_names, offset = [], [], 0
    for index, name in enumerate(names):
        train, task_names = load_split(name, root, True, image_size, max_train, download)
        test, _ = load_split(name, root, False, image_size, max_test, download)
        classes = tuple(range(offset, offset + len(task_names)))
        train.y += offset
        test.y += offset
        built.append(Task(index, name, train, test, classes,
                          info={"templates": list(DATASETS[name].templates)}))
        class_names += list(task_names)
        offset += len(task_names)
    for task in built:
        task.class_names = tuple(class_names)
    label = tasks if isinstance(tasks, str) else "+".join(names)
    return TaskStream(f"clip-{label}", built, "task-il", offset, (3, image_size, image_size),
                      seed=seed)


clip_stream.ranges = {"image_size": at_least(1), "max_train": at_least(1), "max_test": at_least(1)}
clip_stream.smoke = {"max_train": 16, "max_test": 8, "image_size": 32}
