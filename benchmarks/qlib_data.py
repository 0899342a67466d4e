"""A market stream from a user's own Qlib data directory (the layout ``qlib_data`` writes),
read without Qlib itself:

- ``calendars/day.txt``: one trading date per line;
- ``instruments/<market>.txt``: ``SYMBOL<TAB>start<TAB>end`` per line (csi100, csi300, ...);
- ``features/<symbol, lower case>/<field>.day.bin``: little-endian float32, the first value is
  the calendar index of the first day, then one value per calendar day.

Features are Alpha360-style (Qlib's handler; HIST and MTMD use it): for each field over a
window of ``window`` days, ``Ref($field, i) / $close`` (``$volume / ($volume + 1e-12)`` for
volume), i = window - 1 ... 0, feature-major, oldest first (`cl_toolkit.benchmarks.market`
layout). Normalisation: a robust z-score per column fitted on the first period's training days,
clipped to [-3, 3] (Qlib's RobustZScoreNorm with clip_outlier), then NaN -> 0 when ``fillna``
(Qlib's Fillna, on by default here; off, a NaN is refused). Label: ``close(t+1) / close(t) - 1``
as in the HIST/MTMD code; a stock outside its instrument range or without a price is absent
(NaN). Concepts: a CSV ``instrument,<concept 1>,<concept 2>,...`` of weights (our format; HIST
ships a .npy indexed by its own stock ids), one row per instrument of the market.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.validation import at_least, between

from .market import (MARKET_SCENARIO, MarketStream, check_panel, first_train_days,
                     robust_zscore, split_periods)

ALPHA_FIELDS = ("close", "open", "high", "low", "vwap", "volume")
HOW_TO_GET = ("Get it with Qlib: pip install pyqlib && python -m qlib.run.get_data qlib_data "
              "--target_dir ~/.qlib/qlib_data/cn_data --region cn, then set "
              "benchmark.data_dir to that directory.")


def _default_dir() -> Path:
    return Path(os.environ.get("CLTK_DATA", "~/.qlib")).expanduser() / "qlib_data" / "cn_data"


def read_bin(path: Path, n_days: int) -> np.ndarray:
    """One field of one instrument over the whole calendar (NaN outside its data)."""
    raw = np.fromfile(path, dtype="<f4")
    out = np.full(n_days, np.nan, dtype=np.float32)
    if raw.size:
        start = int(raw[0])
        vals = raw[1:][:max(n_days - start, 0)]
        out[start:start + vals.size] = vals
    return out


def read_instruments(root: Path, market: str, calendar: list[str]) -> dict[str, np.ndarray]:
    """``{symbol: mask over the calendar of the days it belongs to the market}``."""
    path = root / "instruments" / f"{market}.txt"
    if not path.exists():
        have = sorted(p.stem for p in (root / "instruments").glob("*.txt"))
        raise ConfigError(f"benchmark.market={market!r}: {path} does not exist; markets in "
                          f"{root}: {', '.join(have) or 'none'}.")
    days = np.array(calendar)
    out: dict[str, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        sym, start, end = line.split("\t")[:3]
        mask = (days >= start) & (days <= end)
        out[sym] = out[sym] | mask if sym in out else mask
    return out


def read_concepts(path: str, symbols: list[str]) -> torch.Tensor:
    lines = [ln.split(",") for ln in Path(path).read_text().splitlines() if ln.strip()]
    rows = {r[0].strip(): [float(v) for v in r[1:]] for r in lines[1:]}
    missing = [s for s in symbols if s not in rows]
    if missing:
        raise ConfigError(f"benchmark.concepts_file={path}: no row for {len(missing)} of the "
                          f"panel's {len(symbols)} stocks (first: {missing[0]}); give one row "
                          "per instrument of benchmark.market.")
    return torch.tensor([rows[s] for s in symbols], dtype=torch.float32)


def qlib_market(data_dir: str | None = None, market: str = "csi300",
                fields: tuple[str, ...] = ALPHA_FIELDS, window: int = 60,
                start: str | None = None, end: str | None = None, num_tasks: int = 4,
                test_fraction: float = 0.3, concepts_file: str | None = None,
                fillna: bool = True, scenario: str = "domain-il", seed: int = 0) -> MarketStream:
    """The stream (see the module doc); periods are equal numbers of trading days."""
    root = Path(data_dir).expanduser() if data_dir else _default_dir()
    cal_path = root / "calendars" / "day.txt"
    if not cal_path.exists():
        raise DatasetNotFoundError(f"benchmark.data_dir: no Qlib data at {root} (looked for "
                                   f"{cal_path}). {HOW_TO_GET}")
    if "close" not in fields:
        raise ConfigError("benchmark.fields must include close (features and label are "
                          "relative to it).")
    calendar = [d.strip() for d in cal_path.read_text().splitlines() if d.strip()]
    members = read_instruments(root, market, calendar)
    symbols = sorted(members)
    n = len(calendar)
    data = {}
    for f in fields:
        cols = []
        for s in symbols:
            p = root / "features" / s.lower() / f"{f}.day.bin"
            if not p.exists():
                raise ConfigError(f"benchmark.fields: {p} is missing (field {f!r} of "
                                  f"instrument {s}); remove {f!r} from benchmark.fields or "
                                  "dump that field.")
            cols.append(read_bin(p, n))
        data[f] = np.stack(cols, 1)                                    # [T, S]
    member = np.stack([members[s] for s in symbols], 1)
    close = np.where(member, data["close"], np.nan)
    lo = 0 if start is None else int(np.searchsorted(np.array(calendar), start))
    hi = n if end is None else int(np.searchsorted(np.array(calendar), end, side="right"))
    if hi - lo < window + 1:
        raise ConfigError(f"benchmark.window={window} is longer than the history "
                          f"({hi - lo} trading days between start and end, one more is needed "
                          "for the label); use a shorter window or a longer range.")
    feats = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for f in fields:
            v = np.where(member, data[f], np.nan)
            den = v + 1e-12 if f == "volume" else close
            cols = [np.roll(v, i, 0) / den for i in range(window - 1, -1, -1)]
            feats.append(np.stack(cols, -1))                            # [T, S, W]
        label = np.roll(close, -1, 0) / close - 1
    x = np.stack(feats, 2)[lo + window - 1:hi - 1]                      # [D, S, F, W]
    y = label[lo + window - 1:hi - 1]
    x[~np.isfinite(x)] = np.nan
    y[~np.isfinite(y)] = np.nan
    x = torch.from_numpy(x.reshape(x.shape[0], x.shape[1], -1).astype(np.float32))
    y = torch.from_numpy(y.astype(np.float32))
    x = robust_zscore(x, first_train_days(x.shape[0], num_tasks, test_fraction))
    concepts = read_concepts(concepts_file, symbols) if concepts_file else None
    x = check_panel(x, y, concepts, num_features=len(fields), window=window, fillna=fillna,
                    names=("benchmark", "benchmark.concepts_file"))
    days = calendar[lo + window - 1:hi - 1]
    edges = [round(i * len(days) / num_tasks) for i in range(num_tasks)]
    tasks = split_periods(x, y, num_tasks, test_fraction, [f"from {days[e]}" for e in edges])
    return MarketStream(f"qlib_{market}", tasks, scenario, 0, tuple(x.shape[1:]), seed,
                        info={"num_features": len(fields), "window": window, "market": market,
                              "fields": list(fields), "first_day": days[0],
                              "last_day": days[-1]},
                        kind="cross_section", concepts=concepts, stocks=tuple(symbols))


qlib_market.task_kind = "cross_section"
qlib_market.ranges = {"window": at_least(1), "num_tasks": at_least(1),
                      "test_fraction": between(0, 1, low_open=True, high_open=True),
                      "scenario": MARKET_SCENARIO}
qlib_market.smoke = {"window": 5, "num_tasks": 2}
