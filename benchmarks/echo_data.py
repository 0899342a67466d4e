"""Loaders of the two echocardiography video data sets GDKVM (arXiv 2512.10252,
https://arxiv.org/abs/2512.10252) is evaluated on, read from their published on-disk formats.
Neither can be shipped: download them yourself and set ``benchmark.root``.

- CAMUS (Leclerc et al., IEEE TMI 2019, https://www.creatis.insa-lyon.fr/Challenge/camus/):
  ``patientXXXX/patientXXXX_{2CH,4CH}_half_sequence.nii.gz`` (a grey-level half cycle, ED to
  ES, NIfTI-1 with the frames on the third axis) and ``..._half_sequence_gt.nii.gz`` (every
  frame labelled: 0 background, 1 LV endocardium, 2 myocardium, 3 left atrium). Read with our
  own NIfTI-1 reader (`read_nifti`).
- EchoNet-Dynamic (Ouyang et al., Nature 2020, https://echonet.github.io/dynamic/):
  ``Videos/*.avi``, ``FileList.csv`` (FileName, EF, ESV, EDV, FrameHeight, FrameWidth, FPS,
  NumberOfFrames, Split) and ``VolumeTracings.csv`` (FileName, X1, Y1, X2, Y2, Frame): for each
  of the two traced frames (end-diastole and end-systole) the first row is the long axis and
  the others are chords across the ventricle; the LV outline is the chords' first ends in order
  then their second ends in reverse (the convention of the EchoNet-Dynamic code), filled. The
  other frames are unlabelled (``IGNORE_INDEX``). AVI decoding needs OpenCV
  (``pip install 'cl_toolkit[video]'``).

Frames are resized to ``height x width`` (bilinear with antialiasing; masks nearest
neighbour, EchoNet's outlines filled at the target size), grey levels are standardised per clip
(`normalise_clip`). No first-frame mask is given to the model (GDKVM's setting).
"""
from __future__ import annotations

import csv
import gzip
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.task_kinds import IGNORE_INDEX
from cl_toolkit.validation import at_least, between, one_of

from .video_common import (
    VIDEO_RANGES,
    VIDEO_SMOKE,
    check_clips,
    normalise_clip,
    seeded,
    video_stream,
)

CAMUS_URL = "https://www.creatis.insa-lyon.fr/Challenge/camus/"
ECHONET_URL = "https://echonet.github.io/dynamic/"
CAMUS_VIEWS = ("2CH", "4CH")
CAMUS_CLASSES = ("background", "LV endocardium", "myocardium", "left atrium")
# NIfTI-1 datatype codes -> numpy types (the integer and float types images are stored in).
NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


def _default_root(folder: str) -> Path:
    return Path(os.environ.get("CLTK_DATA", "~/data")).expanduser() / folder


def read_nifti(path: str | os.PathLike) -> np.ndarray:
    """A single-file NIfTI-1 image (``.nii`` or ``.nii.gz``): the 348-byte header (byte order
    from ``sizeof_hdr`` = 348; ``dim`` at byte 40, ``datatype`` at 70, ``vox_offset`` at 108,
    ``scl_slope``/``scl_inter`` at 112, magic ``n+1`` at 344), then the voxels, first axis
    fastest. Returned with the axes reversed, C order: a ``(W, H, T)`` file (CAMUS) gives
    ``[T, H, W]``. Scaled by ``scl_slope``/``scl_inter`` when the slope is set (not 0)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot be read as a NIfTI file ({exc}); download it "
                          "again.") from None
    if len(raw) < 348:
        raise ConfigError(f"{path}: {len(raw)} bytes, shorter than a NIfTI-1 header (348); the "
                          "file is truncated, download it again.")
    order = next((e for e in "<>" if struct.unpack(e + "i", raw[:4])[0] == 348), None)
    if order is None or raw[344:347] not in (b"n+1", b"ni1"):
        raise ConfigError(f"{path} is not a NIfTI-1 file (sizeof_hdr / magic do not match); "
                          "give the data set's .nii or .nii.gz files.")
    if raw[344:347] == b"ni1":
        raise ConfigError(f"{path} is a two-file NIfTI (.hdr + .img); convert it to a single "
                          ".nii / .nii.gz file.")
    dim = struct.unpack(order + "8h", raw[40:56])
    datatype = struct.unpack(order + "h", raw[70:72])[0]
    offset = int(struct.unpack(order + "f", raw[108:112])[0])
    slope, inter = struct.unpack(order + "ff", raw[112:120])
    if not (math.isfinite(slope) and math.isfinite(inter)):
        slope, inter = 0.0, 0.0                    # unset scaling (some writers leave NaN)
    if datatype not in NIFTI_TYPES or not 1 <= dim[0] <= 7:
        raise ConfigError(f"{path}: NIfTI datatype {datatype} with {dim[0]} dimensions is not "
                          f"supported (datatypes {sorted(NIFTI_TYPES)}, 1 to 7 dimensions).")
    shape = tuple(int(d) for d in dim[1:dim[0] + 1])
    dtype = np.dtype(NIFTI_TYPES[datatype]).newbyteorder(order)
    count = int(np.prod(shape))
    if len(raw) < offset + count * dtype.itemsize:
        raise ConfigError(f"{path} is truncated: its header says {shape} voxels of "
                          f"{dtype.itemsize} bytes after byte {offset}, the file has "
                          f"{len(raw)} bytes; download it again.")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape[::-1])
    if slope not in (0.0, 1.0) or (slope != 0.0 and inter != 0.0):
        data = data * slope + inter
    return data


def _resize(frames: torch.Tensor, height: int, width: int, labels: bool = False) -> torch.Tensor:
    """``[T, H0, W0]`` -> ``[T, height, width]``: images bilinear with antialiasing, label maps
    nearest neighbour (pixel centres)."""
    x = frames[:, None].float()
    if labels:
        return F.interpolate(x, size=(height, width), mode="nearest-exact")[:, 0].long()
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[:, 0]


def _sample(n: int, frames: int) -> torch.Tensor:
    """``frames`` indices spread evenly over ``0..n-1``, both ends included (repeats when the
    sequence is shorter than the clip: our choice, rather than dropping the sequence)."""
    return torch.linspace(0, n - 1, frames).round().long()


def _camus_dir(root: str | None) -> Path:
    base = Path(root).expanduser() if root else _default_root("camus")
    for path in (base, base / "database_nifti", base / "CAMUS_public" / "database_nifti"):
        if path.is_dir() and any(_patients(path)):
            return path
    raise DatasetNotFoundError(
        f"benchmark.root={root!r}: no CAMUS patient folders (patientXXXX/) in {base} nor in "
        f"{base / 'database_nifti'}. CAMUS is obtained by registering at {CAMUS_URL}; unpack "
        "it and set benchmark.root to the folder that holds patient0001/ ... (database_nifti).")


def _patients(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))


def _camus_file(folder: Path, view: str, suffix: str) -> Path:
    stem = f"{folder.name}_{view}_half_sequence{suffix}"
    for name in (stem + ".nii.gz", stem + ".nii"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetNotFoundError(
        f"benchmark.root: {folder / (stem + '.nii.gz')} is missing (CAMUS has an image and a "
        f"ground-truth half sequence per patient and view). Download the full data set from "
        f"{CAMUS_URL}, or leave out the view with benchmark.views.")


def camus(root: str | None = None, views: tuple[str, ...] = CAMUS_VIEWS,
          structures: str = "lv", height: int = 32, width: int = 32, frames: int = 8,
          test_fraction: float = 0.2, max_patients: int | None = None,
          scenario: str = "domain-il", seed: int = 0):
    """CAMUS half sequences as clips, one task per view (default 2CH then 4CH: the continual
    stream moves to another apical view, domain-il). Each clip is ``frames`` frames spread over
    the half cycle, ED first and ES last; every frame is labelled. ``structures=lv``: 0 / 1 =
    LV endocardium (K=2, what GDKVM scores); ``all``: the four CAMUS labels (K=4). Patients are
    split into train and test by a seeded draw (``test_fraction``; the same patients in every
    task; our choice), ``max_patients`` keeps the first patients by number. ``x [N, T, 1, H,
    W]``, ``y [N, T, H, W]``. No first-frame mask is given to the model."""
    _check_views(views)
    if structures not in ("lv", "all"):
        raise ConfigError(f"benchmark.structures={structures!r}; use lv (left ventricle vs the "
                          "rest, K=2) or all (the four CAMUS labels, K=4).")
    folder = _camus_dir(root)
    patients = _patients(folder)[:max_patients]
    n_test = round(len(patients) * test_fraction)
    if n_test < 1 or n_test >= len(patients):
        raise ConfigError(f"benchmark.test_fraction={test_fraction} leaves {n_test} of "
                          f"{len(patients)} patients for testing; choose a fraction that gives "
                          "both splits at least one patient (or more patients, max_patients).")
    order = torch.randperm(len(patients), generator=seeded(seed, 0)).tolist()
    test_ids = set(order[:n_test])
    num_classes = 2 if structures == "lv" else 4
    parts = []
    for view in views:
        clips: dict[bool, list] = {False: [], True: []}
        for i, patient in enumerate(patients):
            img_path = _camus_file(patient, view, "")
            gt_path = _camus_file(patient, view, "_gt")
            img = torch.from_numpy(read_nifti(img_path).astype(np.float32))
            gt = torch.from_numpy(read_nifti(gt_path).astype(np.int64))
            if img.dim() != 3:
                raise ConfigError(f"{img_path}: a half sequence needs 3 axes (width, height, "
                                  f"frames); this file has shape {tuple(img.shape[::-1])}.")
            if gt.shape != img.shape:
                raise ConfigError(f"{gt_path}: the ground truth {tuple(gt.shape)} [T, H, W] "
                                  f"does not match its image {tuple(img.shape)}; give the "
                                  "matching _gt file of the same half sequence.")
            check_clips(img[None, :, None], gt[None], 4, str(gt_path))
            pick = _sample(img.shape[0], frames)
            x = _resize(img[pick], height, width)
            y = _resize(gt[pick], height, width, labels=True)
            if structures == "lv":
                y = (y == 1).long()
            clips[i in test_ids].append((x, y))
        split = [(normalise_clip(torch.stack([c[0] for c in clips[t]])[:, :, None]),
                  torch.stack([c[1] for c in clips[t]])) for t in (False, True)]
        parts.append((view, split[0], split[1]))
    names = CAMUS_CLASSES[:2] if structures == "lv" else CAMUS_CLASSES
    return video_stream("camus", parts, num_classes, scenario, seed,
                        info={"root": str(folder), "views": list(views),
                              "structures": structures, "patients": len(patients),
                              "test_patients": n_test},
                        class_names=names)


def _check_views(views) -> None:
    bad = [v for v in views if v not in CAMUS_VIEWS]
    if bad or not views:
        raise ConfigError(f"benchmark.views={list(views)}: CAMUS has the views 2CH and 4CH; "
                          "give one or both, one task each (e.g. benchmark.views=[2CH,4CH]).")


def fill_polygon(xs: np.ndarray, ys: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels ``[height, width]`` whose centre (column j, row i at coordinates (j, i), the
    convention of skimage.draw.polygon that EchoNet's code uses) lies inside the polygon of
    vertices ``(xs, ys)``: the even-odd rule, one crossing test per edge (a centre exactly on
    the outline counts on its top and left edges, not on its bottom and right ones)."""
    py, px = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = np.zeros((height, width), dtype=bool)
    for k in range(len(xs)):
        x0, y0, x1, y1 = xs[k - 1], ys[k - 1], xs[k], ys[k]
        straddles = (y0 > py) != (y1 > py)
        dy = y1 - y0 if y1 != y0 else 1.0
        inside ^= straddles & (px < x0 + (x1 - x0) * (py - y0) / dy)
    return inside


def tracing_mask(rows: np.ndarray, source: tuple[int, int], height: int,
                 width: int) -> np.ndarray:
    """The LV mask ``[height, width]`` of one traced frame, ``rows [K, 4]`` = (X1, Y1, X2, Y2)
    in the video's pixel coordinates (``source`` = its height, width); the first row, the long
    axis, is not part of the outline. Coordinates are mapped to the target grid
    (pixel centres aligned) and the outline filled there, so no mask is resized."""
    chords = rows[1:]
    xs = np.concatenate([chords[:, 0], chords[::-1, 2]])
    ys = np.concatenate([chords[:, 1], chords[::-1, 3]])
    xs = (xs + 0.5) * width / source[1] - 0.5
    ys = (ys + 0.5) * height / source[0] - 0.5
    return fill_polygon(xs, ys, height, width)


def read_avi(path: Path) -> np.ndarray:
    """The frames of a video as grey levels ``[T, H, W]`` float32 (the mean of the three
    channels: EchoNet's videos are grey images stored as colour)."""
    try:
        import cv2
    except ImportError:
        raise ConfigError("Reading EchoNet-Dynamic's AVI videos needs OpenCV: pip install "
                          "'cl_toolkit[video]' (opencv-python-headless).") from None
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame.astype(np.float32).mean(-1) if frame.ndim == 3 else frame)
    capture.release()
    if not frames:
        raise ConfigError(f"{path}: no frame could be decoded; the file is damaged or not an "
                          f"AVI video, download it again from {ECHONET_URL}.")
    return np.stack(frames).astype(np.float32)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"benchmark.root: {path} is missing. EchoNet-Dynamic (Videos/, FileList.csv, "
            f"VolumeTracings.csv) is obtained by requesting access at {ECHONET_URL}; set "
            "benchmark.root to the folder that holds them.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)} (has "
                              f"{', '.join(reader.fieldnames or [])}); give the data set's own "
                              "CSV files.")
        return list(reader)


def _stem(name: str) -> str:
    """File names without ``.avi``: FileList.csv has them without, VolumeTracings.csv with."""
    return name[:-4] if name.lower().endswith(".avi") else name


def echonet_dynamic(root: str | None = None, height: int = 32, width: int = 32, frames: int = 8,
                    train_clips: int | None = 64, test_clips: int | None = 32,
                    ef_edges: tuple[float, ...] = (40.0, 55.0), scenario: str = "domain-il",
                    seed: int = 0):
    """EchoNet-Dynamic as clips: each clip spans a video from its first traced frame to its
    second (end-diastole and end-systole, whichever comes first), ``frames`` frames spread
    evenly with both traced frames included; those two frames carry the LV mask (class 1), the
    others are ``IGNORE_INDEX``. Tasks are ejection-fraction groups cut at ``ef_edges``, from
    normal to reduced function (default EF >= 55, 40-55, < 40: our choice of a clinical shift,
    domain-il). FileList's Split TRAIN gives the training clips, TEST the test clips (VAL is
    not used); ``train_clips`` / ``test_clips`` keep a seeded draw of at most that many per
    task (null: all), drawn before decoding. Videos with fewer than two traced frames are
    skipped, as EchoNet's code does (counted in ``info``). No first-frame mask is given."""
    if list(ef_edges) != sorted(ef_edges) or len(set(ef_edges)) != len(ef_edges):
        raise ConfigError(f"benchmark.ef_edges={list(ef_edges)} must be increasing; e.g. "
                          "benchmark.ef_edges=[40,55].")
    base = Path(root).expanduser() if root else _default_root("EchoNet-Dynamic")
    if not base.is_dir():
        raise DatasetNotFoundError(
            f"benchmark.root={root!r}: {base} does not exist. EchoNet-Dynamic (Videos/, "
            f"FileList.csv, VolumeTracings.csv) is obtained by requesting access at "
            f"{ECHONET_URL}; unpack it and set benchmark.root to that folder.")
    files = _read_csv(base / "FileList.csv", ("FileName", "EF", "Split"))
    for r in files:
        try:
            r["EF"] = float(r["EF"])
        except ValueError:
            raise ConfigError(f"{base / 'FileList.csv'}: EF of {r['FileName']} is "
                              f"{r['EF']!r}, not a number; give the data set's own "
                              "FileList.csv.") from None
    tracings = _read_csv(base / "VolumeTracings.csv", ("FileName", "X1", "Y1", "X2", "Y2",
                                                        "Frame"))
    traced: dict[str, dict[int, list]] = {}
    for n, row in enumerate(tracings, 2):
        try:
            frame, chord = int(row["Frame"]), [float(row[k]) for k in ("X1", "Y1", "X2", "Y2")]
        except (TypeError, ValueError):
            raise ConfigError(f"{base / 'VolumeTracings.csv'} line {n}: Frame, X1, Y1, X2, Y2 "
                              f"must be numbers; got {dict(row)}. Give the data set's own "
                              "VolumeTracings.csv.") from None
        traced.setdefault(_stem(row["FileName"]), {}).setdefault(frame, []).append(chord)
    edges = [float("-inf"), *map(float, ef_edges), float("inf")][::-1]
    groups = [(edges[k + 1], edges[k]) for k in range(len(edges) - 1)]      # high EF first
    skipped = {"fewer than two traced frames": 0, "traced frame beyond the video": 0}
    parts = []
    for i, (low, high) in enumerate(groups):
        name = ("all EF" if len(groups) == 1 else f"EF>={low:g}" if high == float("inf")
                else f"EF<{high:g}" if low == float("-inf") else f"{low:g}<=EF<{high:g}")
        splits = []
        for split, limit in (("TRAIN", train_clips), ("TEST", test_clips)):
            chosen = [r for r in files if r["Split"].strip().upper() == split
                      and low <= r["EF"] < high
                      and len(traced.get(_stem(r["FileName"]), {})) >= 2]
            skipped["fewer than two traced frames"] += sum(
                1 for r in files if r["Split"].strip().upper() == split
                and low <= r["EF"] < high
                and len(traced.get(_stem(r["FileName"]), {})) < 2)
            if limit is not None and len(chosen) > limit:
                pick = torch.randperm(len(chosen), generator=seeded(seed, i, split == "TEST"))
                chosen = [chosen[k] for k in sorted(pick[:limit].tolist())]
            xs, ys = [], []
            for r in chosen:
                clip = _echonet_clip(base, _stem(r["FileName"]),
                                     traced[_stem(r["FileName"])], height, width, frames)
                if clip is None:
                    skipped["traced frame beyond the video"] += 1
                    continue
                xs.append(clip[0])
                ys.append(clip[1])
            if not xs:
                raise ConfigError(f"benchmark.ef_edges={list(ef_edges)}: the group {name} has "
                                  f"no {split} video with two traced frames in {base}; choose "
                                  "edges that leave videos in every group.")
            splits.append((normalise_clip(torch.stack(xs)[:, :, None]), torch.stack(ys)))
        parts.append((name, splits[0], splits[1]))
    return video_stream("echonet_dynamic", parts, 2, scenario, seed,
                        info={"root": str(base), "ef_edges": list(ef_edges),
                              "skipped": skipped, "labelled_frames": "ED and ES only"},
                        class_names=("background", "left ventricle"))


def _echonet_clip(base: Path, stem: str, traces: dict[int, list], height: int, width: int,
                  frames: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One clip ``x [T, H, W]``, ``y [T, H, W]`` from the video ``stem`` (None when a traced
    frame lies beyond the video)."""
    path = base / "Videos" / f"{stem}.avi"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"benchmark.root: {path} is listed in FileList.csv but missing. Download the full "
            f"EchoNet-Dynamic data set from {ECHONET_URL} (Videos/ holds one AVI per row).")
    video = read_avi(path)
    first, second = sorted(traces)[:1] + sorted(traces)[-1:]
    if second >= video.shape[0]:
        return None
    pick = torch.linspace(first, second, frames).round().long()
    x = _resize(torch.from_numpy(video)[pick], height, width)
    y = torch.full((frames, height, width), IGNORE_INDEX, dtype=torch.long)
    for frame in (first, second):
        mask = tracing_mask(np.asarray(traces[frame]), video.shape[1:], height, width)
        y[pick == frame] = torch.from_numpy(mask).long()
    return x, y


_DATA_SMOKE = {"height": 16, "width": 16, "frames": 4}
camus.task_kind = "segmentation"
camus.ranges = {**{k: v for k, v in VIDEO_RANGES.items() if "clips" not in k},
                "structures": one_of("lv", "all"),
                "test_fraction": between(0, 1, low_open=True, high_open=True),
                "max_patients": at_least(2)}
camus.smoke = {**_DATA_SMOKE, "max_patients": 4}
camus.check_config = lambda node, cfg: _check_views(node["views"])
echonet_dynamic.task_kind = "segmentation"
echonet_dynamic.ranges = {**VIDEO_RANGES}
echonet_dynamic.smoke = {**_DATA_SMOKE, "train_clips": VIDEO_SMOKE["train_clips"],
                         "test_clips": VIDEO_SMOKE["test_clips"]}
