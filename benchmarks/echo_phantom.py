"""An echocardiography phantom generated from the seed: the embedded default video stream of
GDKVM (Wang et al., ICCV 2025, arXiv 2512.10252, https://arxiv.org/abs/2512.10252), whose
CAMUS / EchoNet-Dynamic data cannot be shipped.

Each clip shows a left-ventricle-like cavity (an egg: wider at the base, narrower at the apex)
inside a myocardial wall, in an apical view. Over the clip its width, length and wall thickness
follow a cardiac cycle (end-diastole largest, end-systole smallest, random phase and heart
rate per clip). The challenges the paper names are knobs, one value per task (a single value
applies to every task):

- ``speckle`` in [0, 1]: multiplicative Rayleigh noise of mean 1, ``I * ((1 - k) + k R)``
  (independent per pixel: our choice; real speckle is spatially correlated);
- ``blur``: Gaussian blur of the image (sigma in pixels): blurred boundaries;
- ``wall_dropout`` in [0, 1]: the share of the wall's 8 angular segments that return no echo
  (drawn dark like blood, the same segments over a clip): partly missing boundaries;
- ``frame_dropout`` in [0, 1): the chance that a frame is dropped (never the first), shown
  blank (``drop_mode=blank``: a black frame) or as the last shown frame again
  (``drop_mode=repeat``); its mask stays the true shape at that time, so only a model that
  carries the past can get it right;
- ``translate_jitter`` (pixels) and ``scale_jitter`` (fraction): probe motion, drawn per frame;
- ``view``: ``apical4`` or ``apical2``, another tilt of the long axis and another shape;
- ``placement`` (one value for the stream): each clip's ventricle sits within ± placement x
  the image size of the image centre (default 0.06, as an apical view centres it); a larger
  value takes away the position prior a memoryless model can fall back on in a blank frame.

The default stream's four tasks move from clean to speckled to missing walls and frames to the
other view (domain-il). Masks are exact: the generating shape sampled at pixel centres.
Classes: 0 background, 1 LV cavity (K=2, what GDKVM segments on CAMUS and EchoNet-Dynamic, so
scores compare across streams); ``label_myocardium=true`` adds 2 = myocardium (K=3). No
first-frame mask is given to the model (GDKVM's echo setting). Every number of the generator
(sizes, intensities, cycle) is our choice; the paper has no phantom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError
from cl_toolkit.validation import above, at_least, between, one_of

from .video_common import VIDEO_RANGES, VIDEO_SMOKE, per_task, seeded, video_stream

# Shape of each view, as fractions of min(H, W): tilt of the long axis from vertical (degrees,
# apex up, positive to the right), half-width a and half-length b of the cavity at
# end-diastole, egg (how much narrower the apex is than the base), wall thickness.
VIEWS = {
    "apical4": {"tilt": -8.0, "a": 0.17, "b": 0.30, "egg": 0.25, "wall": 0.07},
    "apical2": {"tilt": 22.0, "a": 0.13, "b": 0.34, "egg": 0.5, "wall": 0.06},
}
# Echo intensities before speckle: surrounding tissue, blood (cavity, and walls without echo),
# myocardium; the image is then scaled as (I - MEAN) / SCALE to roughly zero mean, unit scale.
TISSUE, BLOOD, MYOCARDIUM = 0.35, 0.05, 0.85
MEAN, SCALE = 0.3, 0.25
SECTORS = 8
CLASS_NAMES = ("background", "LV cavity", "myocardium")
# Random components, each with its own generator (`seeded`), so one knob never shifts another.
SHAPE, SPECKLE, WALLS, DROP = range(4)


@dataclass
class Geometry:
    """The generating shapes of ``N`` clips of ``T`` frames (pixel units, the image spanning
    [0, H] x [0, W], pixel (i, j) centred at (i + 0.5, j + 0.5)): ``centre [N, T, 2]`` (y, x),
    cavity half-width ``a`` and half-length ``b`` and wall thickness ``wall``, all ``[N, T]``;
    ``tilt [N]`` (radians) and ``egg`` (scalar) per view."""

    centre: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    wall: torch.Tensor
    tilt: torch.Tensor
    egg: float


def draw_geometry(n: int, frames: int, height: int, width: int, view: str,
                  translate_jitter: float, scale_jitter: float, cycle_frames: float,
                  contraction: float, g: torch.Generator, placement: float = 0.06) -> Geometry:
    """Per clip: position (within ``placement`` x the image size of its centre), size (x 0.9-1.1), cycle phase and
    length (x 0.85-1.15 of ``cycle_frames``); per frame: translation and scale jitter. Every
    draw is made whatever the knobs' values, so the knobs only scale them."""
    v = VIEWS[view]
    size = min(height, width)
    offset = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * placement * size
    scale = 0.9 + 0.2 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    phase = torch.rand(n, 1, generator=g, dtype=torch.float64)
    cycle = cycle_frames * (0.85 + 0.3 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    shift = (torch.rand(n, frames, 2, generator=g, dtype=torch.float64) * 2 - 1) * translate_jitter
    zoom = 1 + (torch.rand(n, frames, generator=g, dtype=torch.float64) * 2 - 1) * scale_jitter
    t = torch.arange(frames, dtype=torch.float64)
    systole = (1 - torch.cos(2 * math.pi * (t / cycle + phase))) / 2   # 0 at ED, 1 at ES
    centre = torch.tensor([height / 2, width / 2], dtype=torch.float64) + offset[:, None] + shift
    a = v["a"] * size * scale * (1 - contraction * systole) * zoom
    b = v["b"] * size * scale * (1 - 0.5 * contraction * systole) * zoom
    wall = v["wall"] * size * scale * (1 + 0.5 * contraction * systole) * zoom
    tilt = torch.full((n,), math.radians(v["tilt"]), dtype=torch.float64)
    return Geometry(centre, a, b, wall, tilt, float(v["egg"]))


def shape_fields(geo: Geometry, height: int, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cavity and myocardium masks (bool ``[N, T, H, W]``) and the wall sector of each pixel
    (``[N, T, H, W]`` in 0..7, by its angle around the centre) at the pixel centres. With the
    long-axis coordinate ``v`` (towards the apex) and the across coordinate ``u``, a point is
    in the cavity when ``(u / (a (1 - egg v / b)))^2 + (v / b)^2 <= 1`` (area pi a b), inside
    the wall's outer border with ``a + wall``, ``b + wall``."""
    yy = torch.arange(height, dtype=torch.float64) + 0.5
    xx = torch.arange(width, dtype=torch.float64) + 0.5
    dy = yy[None, None, :, None] - geo.centre[..., 0, None, None]
    dx = xx[None, None, None, :] - geo.centre[..., 1, None, None]
    cos, sin = torch.cos(geo.tilt)[:, None, None, None], torch.sin(geo.tilt)[:, None, None, None]
    v = -dy * cos + dx * sin
    u = dy * sin + dx * cos

    def inside(a, b):
        a, b = a[..., None, None], b[..., None, None]
        half = (a * (1 - geo.egg * v / b)).clamp_min(1e-9)
        return (u / half) ** 2 + (v / b) ** 2 <= 1

    cavity = inside(geo.a, geo.b)
    myocardium = inside(geo.a + geo.wall, geo.b + geo.wall) & ~cavity
    angle = torch.atan2(v, u)
    sector = ((angle + math.pi) / (2 * math.pi) * SECTORS).long().clamp(0, SECTORS - 1)
    return cavity, myocardium, sector


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``img [..., H, W]`` (radius 3 sigma, edges replicated)."""
    if sigma <= 0:
        return img
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=img.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    shape = img.shape
    x = img.reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(shape)


def rayleigh(shape, g: torch.Generator) -> torch.Tensor:
    """Rayleigh draws of mean 1 (sigma = sqrt(2 / pi)) by inversion: sqrt(-2 sigma^2 ln U)."""
    u = 1 - torch.rand(shape, generator=g, dtype=torch.float64)          # (0, 1]
    return torch.sqrt(-4 / math.pi * torch.log(u))


def phantom_clips(n: int, frames: int, height: int, width: int, *, speckle: float = 0.0,
                  blur: float = 0.0, wall_dropout: float = 0.0, frame_dropout: float = 0.0,
                  drop_mode: str = "blank", view: str = "apical4",
                  translate_jitter: float = 1.0, scale_jitter: float = 0.05,
                  cycle_frames: float = 8.0, contraction: float = 0.3,
                  label_myocardium: bool = False, placement: float = 0.06,
                  keys: tuple[int, ...] = (0,)) -> dict:
    """``n`` clips: ``x [N, T, 1, H, W]`` float32 (scaled echo intensities), ``y [N, T, H, W]``
    int64, and what generated them (``geometry``, ``dropped [N, T]`` frames, ``walls_off
    [N, 8]`` sectors without echo). ``keys`` seed the components (`seeded`)."""
    geo = draw_geometry(n, frames, height, width, view, translate_jitter, scale_jitter,
                        cycle_frames, contraction, seeded(*keys, SHAPE), placement)
    cavity, myocardium, sector = shape_fields(geo, height, width)
    order = torch.argsort(torch.rand(n, SECTORS, generator=seeded(*keys, WALLS)), dim=1)
    walls_off = torch.zeros(n, SECTORS, dtype=torch.bool)
    walls_off.scatter_(1, order[:, :round(wall_dropout * SECTORS)], True)
    silent = torch.gather(walls_off[:, None, None, None, :].expand(*sector.shape, SECTORS),
                          -1, sector[..., None])[..., 0]
    img = torch.full(cavity.shape, TISSUE, dtype=torch.float64)
    img[cavity] = BLOOD
    img[myocardium & ~silent] = MYOCARDIUM
    img[myocardium & silent] = BLOOD
    img = gaussian_blur(img, blur)
    img = img * ((1 - speckle) + speckle * rayleigh(img.shape, seeded(*keys, SPECKLE)))
    dropped = torch.rand(n, frames, generator=seeded(*keys, DROP)) < frame_dropout
    dropped[:, 0] = False
    for f in range(1, frames):
        drop = dropped[:, f]
        img[drop, f] = 0.0 if drop_mode == "blank" else img[drop, f - 1]
    y = cavity.long()
    if label_myocardium:
        y[myocardium] = 2
    x = ((img - MEAN) / SCALE).float().unsqueeze(2)
    return {"x": x, "y": y, "geometry": geo, "dropped": dropped, "walls_off": walls_off}


KNOBS = ("speckle", "blur", "wall_dropout", "frame_dropout", "view", "translate_jitter",
         "scale_jitter")


def _task_name(knobs: dict, first: dict) -> str:
    parts = [knobs["view"]]
    for key, label in (("speckle", "speckle"), ("wall_dropout", "walls"),
                       ("frame_dropout", "frames")):
        if knobs[key] > 0:
            parts.append(f"{label}{knobs[key]:g}")
    for key in ("blur", "translate_jitter", "scale_jitter"):
        if knobs[key] != first[key]:
            parts.append(f"{key}{knobs[key]:g}")
    return " ".join(parts)


def echo_phantom(height: int = 32, width: int = 32, frames: int = 8, train_clips: int = 32,
                 test_clips: int = 16,
                 speckle: tuple[float, ...] = (0.0, 0.7, 0.7, 0.7),
                 blur: tuple[float, ...] = (0.5, 0.5, 1.0, 1.0),
                 wall_dropout: tuple[float, ...] = (0.0, 0.0, 0.5, 0.5),
                 frame_dropout: tuple[float, ...] = (0.0, 0.0, 0.25, 0.25),
                 view: tuple[str, ...] = ("apical4", "apical4", "apical4", "apical2"),
                 translate_jitter: tuple[float, ...] = (1.0,),
                 scale_jitter: tuple[float, ...] = (0.05,),
                 drop_mode: str = "blank", cycle_frames: float = 8.0,
                 contraction: float = 0.3, label_myocardium: bool = False,
                 placement: float = 0.06,
                 scenario: str = "domain-il", seed: int = 0):
    """The phantom stream (module doc): one task per entry of the per-task knob lists
    (``speckle`` ... ``scale_jitter``; a one-value list applies to all tasks), ``train_clips``
    and ``test_clips`` clips of ``frames`` frames of ``height x width`` each; ``x [N, T, 1, H,
    W]``, ``y [N, T, H, W]``. Each task and split draws from its own seeds, so the same seed
    gives the same stream and changing one task's knob leaves the other tasks unchanged. No
    first-frame mask is given to the model."""
    knobs = {k: list(v) for k, v in (("speckle", speckle), ("blur", blur),
                                     ("wall_dropout", wall_dropout),
                                     ("frame_dropout", frame_dropout), ("view", view),
                                     ("translate_jitter", translate_jitter),
                                     ("scale_jitter", scale_jitter))}
    _check_views(knobs["view"])
    if drop_mode not in ("blank", "repeat"):
        raise ConfigError(f"benchmark.drop_mode={drop_mode!r}; use blank (a dropped frame is "
                          "black) or repeat (it shows the last frame again).")
    n_tasks = per_task(knobs)
    table = [{k: v[i] if len(v) > 1 else v[0] for k, v in knobs.items()} for i in range(n_tasks)]
    num_classes = 3 if label_myocardium else 2
    parts, names = [], []
    for i, task_knobs in enumerate(table):
        common = dict(drop_mode=drop_mode, cycle_frames=cycle_frames, contraction=contraction,
                      label_myocardium=label_myocardium, placement=placement, **task_knobs)
        train = phantom_clips(train_clips, frames, height, width, keys=(seed, i, 0), **common)
        test = phantom_clips(test_clips, frames, height, width, keys=(seed, i, 1), **common)
        name = _task_name(task_knobs, table[0])
        names.append(name if name not in names else f"{name} #{i}")
        parts.append((names[-1], (train["x"], train["y"]), (test["x"], test["y"])))
    return video_stream("echo_phantom", parts, num_classes, scenario, seed,
                        info={"knobs": table, "drop_mode": drop_mode, "views": VIEWS,
                              "cycle_frames": cycle_frames, "contraction": contraction,
                              "placement": placement,
                              "intensity": {"tissue": TISSUE, "blood": BLOOD,
                                            "myocardium": MYOCARDIUM, "mean": MEAN,
                                            "scale": SCALE}},
                        class_names=CLASS_NAMES[:num_classes])


def _check_views(views) -> None:
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ConfigError(f"benchmark.view has {bad[0]!r}, which is not a view; use "
                          f"{' or '.join(VIEWS)} (one per task, e.g. "
                          "benchmark.view=[apical4,apical2]).")


def _check_config(node: dict, cfg: dict) -> None:
    _check_views(node["view"])
    per_task({k: list(node[k]) for k in KNOBS})


echo_phantom.task_kind = "segmentation"
echo_phantom.ranges = {
    **VIDEO_RANGES,
    "speckle": between(0, 1), "blur": at_least(0), "wall_dropout": between(0, 1),
    "frame_dropout": between(0, 1, high_open=True), "translate_jitter": at_least(0),
    "scale_jitter": between(0, 0.5, high_open=True), "cycle_frames": above(0),
    "contraction": between(0, 0.8), "drop_mode": one_of("blank", "repeat"),
    "placement": between(0, 0.25)}
echo_phantom.smoke = dict(VIDEO_SMOKE)
echo_phantom.check_config = _check_config
