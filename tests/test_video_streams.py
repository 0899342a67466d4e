"""Video segmentation streams (benchmarks/echo_phantom.py, moving_fashion_mnist.py,
video_common.py): the phantom's masks against a per-pixel float64 loop and the egg's area
(pi a b), each knob against what it is meant to change, seeds, the documented tasks; moving
Fashion-MNIST's masks and canvas against a loop over objects; the bad-input gate."""
from __future__ import annotations

import math

import pytest
import torch
from cl_toolkit.benchmarks import echo_phantom as ep
from cl_toolkit.benchmarks import moving_fashion_mnist as mfm
from cl_toolkit.benchmarks.video_common import check_clips

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.stream import TensorData
from cl_toolkit.task_kinds import IGNORE_INDEX

SMALL = dict(height=16, width=16, frames=4, train_clips=3, test_clips=2)


def _loop_masks(geo, n, t, height, width):
    """Cavity / myocardium of clip n, frame t, one pixel at a time with math's float64."""
    cy, cx = geo.centre[n, t].tolist()
    a, b, wall = geo.a[n, t].item(), geo.b[n, t].item(), geo.wall[n, t].item()
    th, egg = geo.tilt[n].item(), geo.egg
    def inside(along, across, aa, bb):
        half = max(aa * (1 - egg * along / bb), 1e-9)
        return (across / half) ** 2 + (along / bb) ** 2 <= 1

    cav = [[False] * width for _ in range(height)]
    myo = [[False] * width for _ in range(height)]
    for i in range(height):
        for j in range(width):
            py, px = i + 0.5 - cy, j + 0.5 - cx
            along = -py * math.cos(th) + px * math.sin(th)       # towards the apex
            across = py * math.sin(th) + px * math.cos(th)
            cav[i][j] = inside(along, across, a, b)
            myo[i][j] = inside(along, across, a + wall, b + wall) and not cav[i][j]
    return torch.tensor(cav), torch.tensor(myo)


def test_phantom_masks_are_the_generating_shape():
    out = ep.phantom_clips(2, 3, 20, 24, view="apical2", label_myocardium=True, keys=(5,))
    geo = out["geometry"]
    for n in range(2):
        for t in range(3):
            cav, myo = _loop_masks(geo, n, t, 20, 24)
            want = cav.long() + 2 * myo.long()
            assert torch.equal(out["y"][n, t], want), (n, t)
    assert out["x"].shape == (2, 3, 1, 20, 24) and out["x"].dtype == torch.float32
    assert out["y"].dtype == torch.int64 and set(out["y"].unique().tolist()) == {0, 1, 2}


def test_cavity_area_is_pi_a_b_and_follows_the_cardiac_cycle():
    """The egg's area is pi a b whatever its asymmetry (the odd term integrates to zero); the
    pixel count at 96 x 96 matches it within 2 %, and over a cycle of 8 frames the area is
    largest at end-diastole and shrinks by (1 - c)(1 - c / 2) at end-systole."""
    out = ep.phantom_clips(1, 8, 96, 96, translate_jitter=0.0, scale_jitter=0.0,
                           contraction=0.3, keys=(2,))
    geo, area = out["geometry"], (out["y"][0] == 1).sum((1, 2)).double()
    expected = math.pi * geo.a[0] * geo.b[0]
    assert torch.allclose(area, expected, rtol=0.02)
    ratio = (geo.a[0] * geo.b[0]).min() / (geo.a[0] * geo.b[0]).max()
    assert 0.7 * 0.85 - 0.03 <= ratio <= 1.0     # at most the full ED -> ES change
    assert area.max() / area.min() > 1.1          # the cycle is visible in one clip


def _pair(**knob):
    base = dict(blur=0.0, speckle=0.0, label_myocardium=True, keys=(3,))
    return ep.phantom_clips(4, 5, 24, 24, **base), ep.phantom_clips(4, 5, 24, 24, **{**base,
                                                                                       **knob})


def _intensity(x):
    return x.double() * ep.SCALE + ep.MEAN


def test_speckle_is_rayleigh_and_changes_only_the_pixels():
    clean, noisy = _pair(speckle=0.7)
    assert torch.equal(clean["y"], noisy["y"])
    ratio = _intensity(noisy["x"]) / _intensity(clean["x"])
    # (1 - k) + k R with R Rayleigh of mean 1: mean 1, std k sqrt((4 - pi) / pi)
    assert abs(ratio.mean().item() - 1) < 0.03
    assert abs(ratio.std().item() - 0.7 * math.sqrt((4 - math.pi) / math.pi)) < 0.03
    assert ratio.min() >= 0.3 - 1e-6
    # Each task and split has its own noise (keys: seed, task, split).
    other = ep.phantom_clips(4, 5, 24, 24, blur=0.0, speckle=0.7, label_myocardium=True,
                             keys=(3, 1))
    base = ep.phantom_clips(4, 5, 24, 24, blur=0.0, speckle=0.0, label_myocardium=True,
                            keys=(3, 1))
    assert not torch.allclose(_intensity(other["x"]) / _intensity(base["x"]), ratio)


def test_wall_dropout_silences_wall_segments_only():
    clean, off = _pair(wall_dropout=0.5)
    assert torch.equal(clean["y"], off["y"])
    assert off["walls_off"].sum(1).tolist() == [4] * 4
    changed = (clean["x"] != off["x"])[:, :, 0]
    assert changed.any() and not (changed & (clean["y"] != 2)).any()
    assert torch.allclose(_intensity(off["x"])[:, :, 0][changed],
                          torch.tensor(ep.BLOOD, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["blank", "repeat"])
def test_frame_dropout_drops_whole_frames_but_keeps_their_masks(mode):
    clean, drop = _pair(frame_dropout=0.5, drop_mode=mode)
    assert torch.equal(clean["y"], drop["y"])
    d = drop["dropped"]
    assert not d[:, 0].any() and d.any() and not d.all()
    x, x0 = drop["x"], clean["x"]
    for n in range(4):
        shown = x0[n, 0]
        for t in range(5):
            if not d[n, t]:
                assert torch.equal(x[n, t], x0[n, t])
                shown = x0[n, t]
            elif mode == "blank":
                assert torch.allclose(x[n, t], torch.full_like(x[n, t], -ep.MEAN / ep.SCALE))
            else:
                assert torch.equal(x[n, t], shown)


def test_blur_smooths_without_moving_the_shape():
    sharp, soft = _pair(blur=1.0)
    assert torch.equal(sharp["y"], soft["y"])
    step = lambda x: (x[..., 1:] - x[..., :-1]).abs().sum()
    assert step(soft["x"]) < 0.7 * step(sharp["x"])
    assert soft["x"].min() >= sharp["x"].min() - 1e-5
    assert soft["x"].max() <= sharp["x"].max() + 1e-5


def test_view_and_jitter_change_the_shape():
    a4, a2 = _pair(view="apical2")
    assert not torch.equal(a4["y"], a2["y"])
    assert a2["geometry"].tilt[0] != a4["geometry"].tilt[0]
    still = ep.phantom_clips(3, 5, 24, 24, translate_jitter=0.0, scale_jitter=0.0, keys=(4,))
    shaky = ep.phantom_clips(3, 5, 24, 24, translate_jitter=2.0, scale_jitter=0.1, keys=(4,))
    c0, c1 = still["geometry"].centre, shaky["geometry"].centre
    assert torch.equal(c0, c0[:, :1].expand_as(c0))              # no jitter: fixed centre
    move = (c1 - c0).abs()
    assert move.max() <= 2.0 and move.max() > 0.5
    zoom = shaky["geometry"].a / still["geometry"].a
    assert ((zoom - 1).abs() <= 0.1 + 1e-9).all() and (zoom != 1).any()
    for part in ("b", "wall"):          # the whole shape scales, not only its width
        ratio = getattr(shaky["geometry"], part) / getattr(still["geometry"], part)
        assert torch.allclose(ratio, zoom)


def test_placement_spreads_the_clip_centres_and_nothing_else():
    near = ep.phantom_clips(64, 2, 32, 32, translate_jitter=0.0, keys=(5,))
    far = ep.phantom_clips(64, 2, 32, 32, translate_jitter=0.0, placement=0.25, keys=(5,))
    off_near = near["geometry"].centre[:, 0] - 16
    off_far = far["geometry"].centre[:, 0] - 16
    assert off_near.abs().max() <= 0.06 * 32 and off_far.abs().max() <= 0.25 * 32
    assert torch.allclose(off_far, off_near * 0.25 / 0.06)       # same draws, scaled
    assert torch.equal(near["geometry"].a, far["geometry"].a)


def test_phantom_stream_seeds_and_documented_tasks():
    s = ep.echo_phantom(**SMALL, seed=7)
    assert s.kind == "segmentation" and s.scenario == "domain-il" and s.num_classes == 2
    assert s.info["first_mask_given"] is False and s.input_shape == (4, 1, 16, 16)
    assert callable(s.analyses["segmentation_examples"])      # the report's contour figure
    assert [t.name for t in s] == ["apical4", "apical4 speckle0.7",
                                   "apical4 speckle0.7 walls0.5 frames0.25 blur1",
                                   "apical2 speckle0.7 walls0.5 frames0.25 blur1"]
    assert [k["view"] for k in s.info["knobs"]] == ["apical4"] * 3 + ["apical2"]
    again = ep.echo_phantom(**SMALL, seed=7)
    other = ep.echo_phantom(**SMALL, seed=8)
    for i in range(4):
        assert torch.equal(s[i].train.x, again[i].train.x)
        assert torch.equal(s[i].test.y, again[i].test.y)
        assert not torch.equal(s[i].train.y, other[i].train.y)
    # Changing task 1's speckle leaves the other tasks as they were.
    changed = ep.echo_phantom(**SMALL, seed=7, speckle=[0.0, 0.3, 0.7, 0.7])
    assert torch.equal(changed[0].train.x, s[0].train.x)
    assert torch.equal(changed[2].train.x, s[2].train.x)
    assert not torch.equal(changed[1].train.x, s[1].train.x)
    assert torch.equal(changed[1].train.y, s[1].train.y)
    # Train and test clips are different draws (as many of each here).
    even = ep.echo_phantom(**{**SMALL, "test_clips": 3}, seed=7)
    assert not torch.equal(even[0].train.y, even[0].test.y)
    three = ep.echo_phantom(**SMALL, label_myocardium=True, speckle=[0.0], blur=[0.0],
                            wall_dropout=[0.0], frame_dropout=[0.0], view=["apical2"])
    assert len(three) == 1 and three.num_classes == 3 and int(three[0].train.y.max()) == 2


def test_phantom_config_errors():
    with pytest.raises(ConfigError, match=r"per-task lists disagree.*speckle: 3"):
        ep.echo_phantom(**SMALL, speckle=[0.0, 0.1, 0.2])
    with pytest.raises(ConfigError, match=r"benchmark.view has 'apical3'.*apical4 or apical2"):
        ep.echo_phantom(**SMALL, view=["apical3"])
    with pytest.raises(ConfigError, match=r"benchmark.drop_mode='skip'"):
        ep.echo_phantom(**SMALL, drop_mode="skip")
    with pytest.raises(ConfigError, match=r"scenario='class-il'.*domain-il"):
        ep.echo_phantom(**SMALL, scenario="class-il")
    from cl_toolkit import validation

    cfg = {"benchmark": {"name": "echo_phantom", "speckle": [0.5, 1.5]},
           "model": {"name": "mlp"}, "strategy": {"name": "naive"}}
    with pytest.raises(ConfigError, match=r"benchmark.speckle must be >= 0 and <= 1"):
        validation.check_node("stream", "benchmark", cfg["benchmark"], cfg)


def _objects(m=6, s=6):
    """Objects whose pixels are distinct (so the maximum compositing can be checked)."""
    g = torch.Generator().manual_seed(0)
    obj = torch.rand(m, s, s, generator=g)
    obj[:, 0] = 0.0                                     # a row below any threshold
    return obj


def test_moving_clips_masks_and_canvas_against_a_loop():
    obj = _objects()
    out = mfm.moving_clips(obj, 3, 6, 20, 18, num_objects=2, speed=3.0, noise=0.0,
                           mask_threshold=0.3, g=torch.Generator().manual_seed(1))
    canvas = out["x"][:, :, 0].double() * mfm.SCALE + mfm.MEAN
    for n in range(3):
        for t in range(6):
            want_mask = torch.zeros(20, 18, dtype=torch.bool)
            want_img = torch.zeros(20, 18, dtype=torch.float64)
            for k in range(2):
                r, c = out["top_left"][n, k, t].tolist()
                assert 0 <= r <= 20 - 6 and 0 <= c <= 18 - 6
                piece = obj[out["index"][n, k]].double()
                for i in range(6):
                    for j in range(6):
                        want_img[r + i, c + j] = max(want_img[r + i, c + j].item(),
                                                     piece[i, j].item())
                        want_mask[r + i, c + j] |= bool(piece[i, j] > 0.3)
            assert torch.equal(out["y"][n, t], want_mask.long())
            assert torch.allclose(canvas[n, t], want_img, atol=1e-6)
    # Straight lines at the given speed, up to rounding and bounces off the edges.
    step = (out["top_left"][:, :, 1:] - out["top_left"][:, :, :-1]).double().norm(dim=-1)
    assert step.max() <= 3.0 + 1.5 and (step > 1).all()


def test_moving_clips_noise_and_size_errors():
    obj = _objects()
    noisy = mfm.moving_clips(obj, 4, 4, 16, 16, noise=0.2, g=torch.Generator().manual_seed(0))
    clean = mfm.moving_clips(obj, 4, 4, 16, 16, noise=0.0, g=torch.Generator().manual_seed(0))
    diff = (noisy["x"] - clean["x"]) * mfm.SCALE
    assert torch.equal(noisy["y"], clean["y"]) and abs(diff.std().item() - 0.2) < 0.02
    with pytest.raises(ConfigError, match="object_size=6 does not fit the 5 x 16 canvas"):
        mfm.moving_clips(obj, 1, 2, 5, 16, g=torch.Generator())


def test_moving_fashion_mnist_tasks_are_class_groups(monkeypatch):
    """Each task's objects come from its class group only: fake images carry their class in
    their grey level (the real files are read by fashion_mnist's loader, tested there)."""
    def fake(root, download):
        y = torch.arange(10).repeat(4)
        x = ((y + 1).float() / 10)[:, None, None, None].expand(40, 1, 28, 28).clone()
        return TensorData(x, y), TensorData(x.clone(), y.clone())

    monkeypatch.setattr(mfm, "load_fashion_mnist", fake)
    s = mfm.moving_fashion_mnist(height=24, width=24, frames=3, train_clips=4, test_clips=2,
                                 n_tasks=5, object_size=8, noise=0.0, mask_threshold=0.05)
    assert s.kind == "segmentation" and s.num_classes == 2 and len(s) == 5
    assert s.info["first_mask_given"] is False and s[1].name == "Pullover+Dress"
    for i, task in enumerate(s):
        levels = (task.train.x.double() * mfm.SCALE + mfm.MEAN)[task.train.y[:, :, None] == 1]
        classes = set((levels * 10).round().long().sub(1).tolist())
        assert classes <= {2 * i, 2 * i + 1}, (i, classes)
    again = mfm.moving_fashion_mnist(height=24, width=24, frames=3, train_clips=4,
                                     test_clips=2, n_tasks=5, object_size=8)
    assert torch.equal(again[4].test.y, mfm.moving_fashion_mnist(
        height=24, width=24, frames=3, train_clips=4, test_clips=2, n_tasks=5,
        object_size=8)[4].test.y)
    with pytest.raises(ConfigError, match="n_tasks=3"):
        mfm.moving_fashion_mnist(n_tasks=3)


def test_moving_fashion_mnist_missing_data_is_fashion_mnists_error(tmp_path):
    from cl_toolkit.benchmarks.fashion_mnist import load_fashion_mnist

    with pytest.raises(DatasetNotFoundError) as theirs:
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as ours:
        mfm.moving_fashion_mnist(root=str(tmp_path))
    assert str(ours.value) == str(theirs.value) and "dataset-fashion-mnist" in str(ours.value)


def test_check_clips_refuses_bad_clips_and_accepts_unlabelled_pixels():
    x = torch.zeros(2, 3, 1, 8, 8)
    y = torch.zeros(2, 3, 8, 8, dtype=torch.long)
    y[0, 1] = IGNORE_INDEX
    y[1, 2, 2:4, 2:4] = 2
    check_clips(x, y, 3, "benchmark")
    with pytest.raises(ConfigError, match=r"benchmark: masks y \(2, 3, 8, 6\) do not match"):
        check_clips(x, y[..., :6], 3, "benchmark")
    with pytest.raises(ConfigError, match=r"benchmark.root: mask values \[2\] lie outside the "
                                          r"class set 0..1"):
        check_clips(x, y, 2, "benchmark.root")
    with pytest.raises(ConfigError, match="zero frames"):
        check_clips(x[:, :0], y[:, :0], 3, "benchmark.frames")
    with pytest.raises(ConfigError, match="no clips"):
        check_clips(x[:0], y[:0], 3, "benchmark.train_clips")
    bad = x.clone()
    bad[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"1 pixel values are NaN or infinite \(first: clip 1, "
                                          r"frame 2\)"):
        check_clips(bad, y, 3, "benchmark")
    with pytest.raises(ConfigError, match="masks must be integer class ids"):
        check_clips(x, y.float(), 3, "benchmark")
    with pytest.raises(ConfigError, match=r"float frames x \[N, T, C, H, W\]"):
        check_clips(x[:, 0], y, 3, "benchmark")
