"""The CAMUS and EchoNet-Dynamic loaders (benchmarks/echo_data.py) on files these tests write in
the data sets' own formats: NIfTI-1 half sequences packed here by hand from the header layout,
AVI videos written by OpenCV with FileList.csv / VolumeTracings.csv; masks and frame choices
checked against hand-computed pixels, and the errors for missing files and bad data."""
from __future__ import annotations

import csv
import gzip
import struct

import numpy as np
import pytest
import torch
from cl_toolkit.benchmarks import echo_data
from cl_toolkit.benchmarks.echo_data import camus, echonet_dynamic, read_nifti

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.task_kinds import IGNORE_INDEX


def write_nifti(path, volume_whc: np.ndarray, *, order="<", slope=0.0, inter=0.0):
    """A single-file NIfTI-1 (magic n+1, data at byte 352) of ``volume`` indexed [x, y, t]."""
    codes = {np.dtype("uint8"): (2, 8), np.dtype("int16"): (4, 16),
             np.dtype("float32"): (16, 32)}
    datatype, bitpix = codes[volume_whc.dtype]
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    dims = [volume_whc.ndim, *volume_whc.shape] + [1] * (7 - volume_whc.ndim)
    struct.pack_into(order + "8h", header, 40, *dims)
    struct.pack_into(order + "hh", header, 70, datatype, bitpix)
    struct.pack_into(order + "f", header, 108, 352.0)
    struct.pack_into(order + "ff", header, 112, slope, inter)
    header[344:348] = b"n+1\0"
    # NIfTI stores the first index fastest: Fortran order.
    body = volume_whc.astype(volume_whc.dtype.newbyteorder(order)).tobytes(order="F")
    data = bytes(header) + b"\0" * 4 + body
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_nifti_reverses_the_axes_and_scales(tmp_path, order):
    w, h, t = 5, 4, 3
    vol = np.zeros((w, h, t), dtype=np.int16)
    for x in range(w):
        for y in range(h):
            for f in range(t):
                vol[x, y, f] = 100 * f + 10 * y + x
    write_nifti(tmp_path / "a.nii.gz", vol, order=order)
    got = read_nifti(tmp_path / "a.nii.gz")
    assert got.shape == (t, h, w) and got[2, 3, 4] == 234 and got[1, 0, 2] == 102
    write_nifti(tmp_path / "b.nii", vol, order=order, slope=0.5, inter=1.0)
    assert read_nifti(tmp_path / "b.nii")[2, 3, 4] == 118.0
    (tmp_path / "c.nii").write_bytes((tmp_path / "b.nii").read_bytes()[:360])
    with pytest.raises(ConfigError, match="is truncated"):
        read_nifti(tmp_path / "c.nii")
    (tmp_path / "d.nii").write_bytes(b"\0" * 400)
    with pytest.raises(ConfigError, match="is not a NIfTI-1 file"):
        read_nifti(tmp_path / "d.nii")


# CAMUS: 4 patients, 2 views, images 24 x 20 (rows x columns), half sequences of 5-7 frames;
# every frame's grey level is constant, 10 * (frame + 1); the LV is a rectangle whose width
# depends on the patient, the myocardium a band above it, the atrium a block below.
H0, W0 = 24, 20


def _camus_gt(patient: int, frames: int) -> np.ndarray:
    gt = np.zeros((frames, H0, W0), dtype=np.uint8)
    gt[:, 4:14, 4:6 + 2 * patient] = 1
    gt[:, 1:3, 4:16] = 2
    gt[:, 16:22, 4:12] = 3
    return gt


def make_camus(root, patients=6):
    for p in range(1, patients + 1):
        folder = root / f"patient{p:04d}"
        folder.mkdir(parents=True)
        for v, view in enumerate(("2CH", "4CH")):
            frames = 5 + (p + v) % 3
            img = np.broadcast_to(10 * (np.arange(frames) + 1.0)[:, None, None],
                                  (frames, H0, W0)).astype(np.uint8)
            stem = folder / f"patient{p:04d}_{view}_half_sequence"
            write_nifti(f"{stem}.nii.gz", np.ascontiguousarray(img.transpose(2, 1, 0)))
            write_nifti(f"{stem}_gt.nii.gz",
                        np.ascontiguousarray(_camus_gt(p, frames).transpose(2, 1, 0)))


def test_camus_clips_tasks_and_masks(tmp_path):
    make_camus(tmp_path / "database_nifti")
    s = camus(root=str(tmp_path), height=12, width=10, frames=4, test_fraction=0.5, seed=1)
    assert [t.name for t in s] == ["2CH", "4CH"] and s.num_classes == 2
    assert s.kind == "segmentation" and s.info["first_mask_given"] is False
    assert [len(t.train) for t in s] == [3, 3] and [len(t.test) for t in s] == [3, 3]
    for task in s:
        for data in (task.train, task.test):
            assert data.x.shape[1:] == (4, 1, 12, 10)
            for x, y in zip(data.x, data.y):
                # Frames spread over the half sequence, ED first, ES last: grey levels
                # 10 (f + 1) at f = round(linspace(0, F - 1, 4)), then standardised per clip.
                width = int((y[0, 4] == 1).sum())      # LV columns at half resolution
                patient = width - 1
                frames = 5 + (patient + task.index) % 3
                level = 10 * (torch.linspace(0, frames - 1, 4).round() + 1).double()
                got = x[:, 0].double().mean((1, 2))
                full = level[:, None].expand(4, 120)
                want = (level - full.mean()) / full.std()
                assert torch.allclose(got, want, atol=1e-4)
                # Masks: nearest pixel centre (rows 1, 3, ..., columns 1, 3, ...), LV = 1.
                lv = torch.from_numpy(_camus_gt(patient, 1)[0][1::2, 1::2] == 1).long()
                assert torch.equal(y, lv.expand(4, 12, 10))
    # The same test patients in both views (the split is by patient).
    assert torch.equal(s[0].test.y[:, 0], s[1].test.y[:, 0])
    full = camus(root=str(tmp_path / "database_nifti"), structures="all", height=12, width=10,
                 frames=4, test_fraction=0.5, seed=1)
    assert full.num_classes == 4
    p = int((full[0].test.y[0, 0, 4] == 1).sum()) - 1
    assert torch.equal(full[0].test.y[0, 0], torch.from_numpy(
        _camus_gt(p, 1)[0][1::2, 1::2].astype(np.int64)))


def test_camus_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"creatis.insa-lyon.fr/Challenge/camus"):
        camus(root=str(tmp_path / "nowhere"))
    make_camus(tmp_path, patients=2)
    with pytest.raises(ConfigError, match=r"benchmark.views=\['3CH'\]"):
        camus(root=str(tmp_path), views=["3CH"])
    with pytest.raises(ConfigError, match="test_fraction=0.1 leaves 0 of 2 patients"):
        camus(root=str(tmp_path), test_fraction=0.1)
    gt = tmp_path / "patient0002" / "patient0002_4CH_half_sequence_gt.nii.gz"
    vol = _camus_gt(2, 5).transpose(2, 1, 0).copy()
    vol[0, 0, 0] = 7
    write_nifti(gt, vol)
    with pytest.raises(ConfigError, match=r"patient0002_4CH_half_sequence_gt.nii.gz: mask "
                                          r"values \[7\] lie outside the class set"):
        camus(root=str(tmp_path), test_fraction=0.5)
    write_nifti(gt, vol[:, :, :3])
    with pytest.raises(ConfigError, match=r"does not match its image"):
        camus(root=str(tmp_path), test_fraction=0.5)
    gt.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"patient0002_4CH_half_sequence_gt.nii.gz is "
                                                   r"missing.*Challenge/camus"):
        camus(root=str(tmp_path), test_fraction=0.5)
    assert len(camus(root=str(tmp_path), views=["2CH"], test_fraction=0.5, height=8, width=8,
                     frames=2)) == 1


# EchoNet-Dynamic: 32 x 32 videos of 12 frames, each frame one grey level (20 + 15 t); traced
# frames 2 (ED) and 8 (ES). The ED outline is a rectangle of chords: x from 3.3 to 12.7, y from
# 2.2 to 9.7 (pixel centres inside: rows 3-9, columns 4-12; no centre on the outline); the ES
# outline a trapezoid.
S0 = 32


def _chords(x1, x2, y_top, y_bottom, widen=0.0, n=9):
    """The long axis, then n chords from (x1, y) to (x2 + widen (y - y_top), y)."""
    rows = [[(x1 + x2) / 2, y_top, (x1 + x2) / 2, y_bottom]]
    rows += [[x1, y, x2 + widen * (y - y_top), y] for y in np.linspace(y_top, y_bottom, n)]
    return rows


def make_echonet(root, efs=(60.0, 62.0, 45.0, 50.0, 30.0, 20.0)):
    cv2 = pytest.importorskip("cv2", reason="AVI writing needs pip install 'cl_toolkit[video]'")
    (root / "Videos").mkdir(parents=True)
    files, traces = [], []
    for k, ef in enumerate(efs):
        name = f"0X{k:04d}"
        writer = cv2.VideoWriter(str(root / "Videos" / f"{name}.avi"),
                                 cv2.VideoWriter_fourcc(*"MJPG"), 50, (S0, S0))
        for t in range(12):
            writer.write(np.full((S0, S0, 3), 20 + 15 * t, np.uint8))
        writer.release()
        files.append([name, ef, 30.0, 60.0, S0, S0, 50, 12, "TRAIN" if k % 2 == 0 else "TEST"])
        for frame, rows in ((8, _chords(5.3, 7.5, 4.3, 7.7, widen=1.0)),
                            (2, _chords(3.3, 12.7, 2.2, 9.7))):
            traces += [[f"{name}.avi", *r, frame] for r in rows]
    with open(root / "FileList.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS",
                    "NumberOfFrames", "Split"])
        w.writerows(files)
    with open(root / "VolumeTracings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "X1", "Y1", "X2", "Y2", "Frame"])
        w.writerows(traces)


def _rect(h, w, rows, cols):
    m = torch.zeros(h, w, dtype=torch.long)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = 1
    return m


def test_echonet_clips_masks_and_ef_tasks(tmp_path):
    make_echonet(tmp_path)
    s = echonet_dynamic(root=str(tmp_path), height=32, width=32, frames=4)
    assert [t.name for t in s] == ["EF>=55", "40<=EF<55", "EF<40"]
    assert [(len(t.train), len(t.test)) for t in s] == [(1, 1)] * 3
    assert s.info["first_mask_given"] is False and s.num_classes == 2
    ed = _rect(32, 32, (3, 9), (4, 12))
    # ES: x1 = 5.3, x2 = 7.5 + (y - 4.3) = y + 3.2 for y in (4.3, 7.7): rows 5-7 reach columns
    # 8, 9, 10 (a trapezoid, so the chords' second ends must be taken in reverse order).
    es = torch.zeros(32, 32, dtype=torch.long)
    for row, last in ((5, 8), (6, 9), (7, 10)):
        es[row, 6:last + 1] = 1
    for task in s:
        y, x = task.train.y[0], task.train.x[0, :, 0].double()
        # frames round(linspace(2, 8, 4)) = 2, 4, 6, 8: ED first, ES last, the rest unlabelled
        assert torch.equal(y[0], ed) and torch.equal(y[3], es)
        assert (y[1:3] == IGNORE_INDEX).all()
        level = 20 + 15 * torch.tensor([2.0, 4.0, 6.0, 8.0], dtype=torch.float64)
        full = level[:, None].expand(4, 32 * 32)
        assert torch.allclose(x.mean((1, 2)), (level - full.mean()) / full.std(), atol=0.05)
    # At half size the outline is mapped to the new pixel grid, not the mask resized:
    # x 3.3 -> 1.4, 12.7 -> 6.1, y 2.2 -> 0.85, 9.7 -> 4.6 (pixel centres aligned: y / 2
    # would put the top at 1.1 and lose row 1).
    half = echonet_dynamic(root=str(tmp_path), height=16, width=16, frames=7)
    assert torch.equal(half[0].test.y[0, 0], _rect(16, 16, (1, 4), (2, 6)))
    assert (half[0].test.y[0, 1:6] == IGNORE_INDEX).all() and (half[0].test.y[0, 6] >= 0).all()
    one = echonet_dynamic(root=str(tmp_path), ef_edges=[], frames=2, train_clips=2,
                          test_clips=1)
    assert [(len(t.train), len(t.test)) for t in one] == [(2, 1)]


def test_echonet_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"echonet.github.io/dynamic"):
        echonet_dynamic(root=str(tmp_path / "nowhere"))
    make_echonet(tmp_path)
    with pytest.raises(ConfigError, match=r"ef_edges=\[55.0, 40.0\] must be increasing"):
        echonet_dynamic(root=str(tmp_path), ef_edges=[55.0, 40.0])
    with pytest.raises(ConfigError, match=r"the group 40<=EF<50 has no TEST video"):
        echonet_dynamic(root=str(tmp_path), ef_edges=[40.0, 50.0])
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"pip install 'cl_toolkit\[video\]'"):
        echonet_dynamic(root=str(tmp_path))
    monkeypatch.undo()
    listing = (tmp_path / "FileList.csv").read_text()
    (tmp_path / "FileList.csv").write_text(listing.replace(",60.0,", ",n/a,"))
    with pytest.raises(ConfigError, match=r"EF of 0X0000 is 'n/a', not a number"):
        echonet_dynamic(root=str(tmp_path))
    (tmp_path / "FileList.csv").write_text(listing)
    (tmp_path / "Videos" / "0X0003.avi").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"0X0003.avi is listed in FileList.csv but "
                                                   r"missing"):
        echonet_dynamic(root=str(tmp_path))
    (tmp_path / "VolumeTracings.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"VolumeTracings.csv is missing.*"
                                                   r"echonet.github.io"):
        echonet_dynamic(root=str(tmp_path))
    assert echo_data.ECHONET_URL == "https://echonet.github.io/dynamic/"
