"""Segmentation scores on hand-made masks: Dice per clip, HD95 against a brute-force distance
oracle, the temporal error, and the contour examples the report draws."""
import math

import numpy as np
import pytest
import torch

from cl_toolkit.renderers import segmentation as seg
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.task_kinds import IGNORE_INDEX, Segmentation, change_error, hd95


def square(h, w, top, left, side, value=1):
    m = torch.zeros(h, w, dtype=torch.long)
    m[top:top + side, left:left + side] = value
    return m


def brute_hd95(p: np.ndarray, g: np.ndarray) -> float:
    """Every boundary pixel (4-neighbour outside the mask or the frame) against every other."""
    def boundary(m):
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~inner)

    bp, bg = boundary(p), boundary(g)
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_hd95_single_pixels_and_identity_by_hand():
    a, b = square(9, 9, 1, 1, 1), square(9, 9, 4, 5, 1)       # distance sqrt(9 + 16) = 5
    assert hd95(a[None], b[None], 2) == [[pytest.approx(5.0)]]
    assert hd95(a[None], a[None], 2) == [[0.0]]


@pytest.mark.parametrize("shift", [(0, 0), (2, 1), (0, 5), (3, 3)])
def test_hd95_matches_brute_force(shift):
    g = square(20, 20, 4, 4, 7)
    g[5:8, 12:15] = 1                                          # an irregular shape
    p = torch.roll(g, shifts=shift, dims=(0, 1))
    p[10, 2] = 1                                               # a stray pixel
    assert hd95(p[None], g[None], 2)[0][0] == pytest.approx(
        brute_hd95(p.bool().numpy(), g.bool().numpy()))


def test_hd95_missing_class_costs_the_diagonal_and_absent_is_skipped():
    g = square(6, 8, 1, 1, 2)
    empty = torch.zeros(6, 8, dtype=torch.long)
    out = hd95(torch.stack([empty, empty]), torch.stack([g, empty]), 2)[0]
    assert out[0] == pytest.approx(10.0) and math.isnan(out[1])


def test_change_error_by_hand():
    y = torch.stack([square(4, 4, 0, 0, 2), square(4, 4, 0, 0, 2), square(4, 4, 1, 1, 2)])[None]
    # truth: no change, then 6 of 16 pixels change; prediction frozen: 0 then 0 -> |0-0|, |0-6|
    frozen = y[:, :1].expand_as(y)
    assert change_error(frozen, y) == [0.0, pytest.approx(6 / 16)]
    flicker = y.clone()
    flicker[0, 1] = 0          # 4 px go off (truth: none), then 4 come on (truth: 6 change)
    assert change_error(flicker, y) == [pytest.approx(4 / 16), pytest.approx(2 / 16)]
    unlabelled = y.clone()
    unlabelled[0, 1] = IGNORE_INDEX                             # both pairs touch frame 1
    assert change_error(frozen, unlabelled) == []


def clip_stream():
    g = torch.Generator().manual_seed(0)
    y = torch.stack([torch.stack([square(8, 8, t, 1 + c, 3) for t in range(3)])
                     for c in range(4)])                        # [4 clips, 3 frames, 8, 8]
    x = (y[:, :, None].float() + 0.1 * torch.randn(4, 3, 1, 8, 8, generator=g))
    tasks = [Task(i, f"t{i}", TensorData(x, y), TensorData(x, y), classes=()) for i in range(2)]
    return TaskStream("clips", tasks, "domain-il", 2, (3, 1, 8, 8), kind="segmentation")


def onehot_logits(pred):                                        # [N, T, H, W] -> [N, T, 2, H, W]
    return torch.stack([(pred == 0).float(), (pred == 1).float()], 2)


def test_dice_is_a_mean_over_clips_of_their_frame_means():
    stream = clip_stream()
    y = stream[0].test.y
    pred = y.clone()
    pred[0, 0] = 0                                              # clip 0 frame 0 missed: Dice 0
    pred[1, :, 0, 0] = 1                                        # clip 1: one extra px a frame
    scores = Segmentation().score(lambda x, t: onehot_logits(pred), stream[0].test, 4)
    clip1 = 2 * 9 / (9 + 10)
    assert scores["dice"] == pytest.approx(((0 + 1 + 1) / 3 + clip1 + 1 + 1) / 4)
    assert scores["hd95"] > 0 and scores["fps"] > 0
    # prediction and truth change alike but between clip 0's missed frame 0 and frame 1: 9 px
    # appear in the prediction, 6 change in the truth (the square moves down a row: one row
    # of 3 leaves, one arrives), |9 - 6| / 64; clip 1's extra pixel never changes. 8 pairs.
    assert scores["temporal_error"] == pytest.approx((9 - 6) / 64 / 8)


def test_examples_keep_frames_and_render(tmp_path):
    stream = clip_stream()
    analyse = seg.examples_analysis(stream.tasks, frames=2)
    out = analyse(lambda x: x[:, :, 0].round().long())          # threshold the image
    seg.check(out)
    e = out["tasks"][0]
    assert e["frames"] == [0, 2] and e["height"] == e["width"] == 8
    assert e["truth"][0] == "".join(str(v) for v in stream[0].test.y[0, 0].flatten().tolist())
    md, html = seg.render([{"_row": "gdkvm", "extras": {"segmentation_examples": out}}],
                          tmp_path)
    assert (tmp_path / "segmentation_examples_0.png").stat().st_size > 1000
    assert "segmentation_examples_0.png" in md and "base64" in html
    bad = {"tasks": [{**e, "pred": e["pred"][:1]}]}
    with pytest.raises(ValueError, match="pred"):
        seg.check(bad)
