"""Fama-French portfolios as a market stream (optional extra ``market``: linearmodels ships Ken
French's monthly data, 1949-2017, as ``linearmodels.datasets.french``).

Entities: the 12 industry, 9 size-value and 9 size-momentum portfolios (30 "stocks"); a month's
cross-section is a sample; target: the next month's return. Features: each portfolio's own
returns over the last ``window`` months and its return minus the market's (our choice: two
features; the dataset has no prices or volumes), robust z-scored per column on the first era's
training months (`robust_zscore`, our choice, as the Qlib loader does: raw monthly returns are
of size ~0.05; ``normalise=false`` keeps them raw). Concepts (HIST/MTMD's predefined concepts):
the portfolio's group (industry / size-value / size-momentum) and its size, value and momentum
buckets, multi-hot. Tasks: consecutive eras of equal length. A tiny cross-section (30 entities,
strongly correlated): IC figures on it are noisy; read them with that caveat.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.validation import at_least, between

from .market import (MARKET_SCENARIO, MarketStream, check_panel, first_train_days,
                     robust_zscore, split_periods)

INDUSTRIES = ("NoDur", "Durbl", "Manuf", "Enrgy", "Chems", "BusEq", "Telcm", "Utils", "Shops",
              "Hlth", "Money", "Other")
SIZE_VALUE = tuple(f"S{s}V{v}" for s in (1, 3, 5) for v in (1, 3, 5))
SIZE_MOM = tuple(f"S{s}M{m}" for s in (1, 3, 5) for m in (1, 3, 5))
PORTFOLIOS = INDUSTRIES + SIZE_VALUE + SIZE_MOM
CONCEPTS = ("industry", "size_value", "size_momentum", "S1", "S3", "S5", "V1", "V3", "V5",
            "M1", "M3", "M5")


def concept_matrix() -> torch.Tensor:
    """Multi-hot ``[30, 12]``: group, and the size / value / momentum bucket of its name."""
    c = torch.zeros(len(PORTFOLIOS), len(CONCEPTS))
    for i, p in enumerate(PORTFOLIOS):
        group = "industry" if p in INDUSTRIES else "size_value" if p in SIZE_VALUE \
            else "size_momentum"
        c[i, CONCEPTS.index(group)] = 1
        if p not in INDUSTRIES:
            c[i, CONCEPTS.index(p[:2])] = 1
            c[i, CONCEPTS.index(p[2:])] = 1
    return c


def french_panel(columns: dict, dates: list[str], window: int = 12, num_tasks: int = 4,
                 test_fraction: float = 0.3, normalise: bool = True) -> MarketStream:
    """The stream from the dataset's columns (``{name: monthly returns}``, must hold the 30
    portfolios and ``MktRF`` + ``RF``); separate from the download so tests can feed it."""
    missing = [c for c in PORTFOLIOS + ("MktRF", "RF") if c not in columns]
    if missing:
        raise ConfigError(f"benchmark: the French data lack columns {missing}; use "
                          "linearmodels' french dataset (pip install 'cl_toolkit[market]').")
    r = np.stack([np.asarray(columns[c], dtype=np.float64) for c in PORTFOLIOS], 1)  # [T, S]
    mkt = np.asarray(columns["MktRF"], dtype=np.float64) + np.asarray(columns["RF"])
    T = r.shape[0]
    if window >= T:
        raise ConfigError(f"benchmark.window={window} is longer than the history ({T} months, "
                          "one more is needed for the target); use a shorter window.")
    own = np.lib.stride_tricks.sliding_window_view(r, window, 0)[:T - window]     # [D, S, W]
    rel = own - np.lib.stride_tricks.sliding_window_view(mkt, window)[:T - window][:, None]
    x = torch.from_numpy(np.concatenate([own, rel], 2).astype(np.float32))
    y = torch.from_numpy(r[window:].astype(np.float32))
    if normalise:
        x = robust_zscore(x, first_train_days(x.shape[0], num_tasks, test_fraction))
    x = check_panel(x, y, concept_matrix(), num_features=2, window=window, history=T)
    days = dates[window:]
    edges = [round(i * len(days) / num_tasks) for i in range(num_tasks)]
    tasks = split_periods(x, y, num_tasks, test_fraction, [f"from {days[e]}" for e in edges])
    return MarketStream("french_portfolios", tasks, "domain-il", 0, tuple(x.shape[1:]), 0,
                        info={"num_features": 2, "window": window, "frequency": "monthly",
                              "first_month": days[0], "last_month": days[-1]},
                        kind="cross_section", concepts=concept_matrix(), stocks=PORTFOLIOS)


def french_portfolios(window: int = 12, num_tasks: int = 4, test_fraction: float = 0.3,
                      normalise: bool = True, scenario: str = "domain-il",
                      seed: int = 0) -> MarketStream:
    """The stream from the file of ``linearmodels.datasets.french`` (see the module doc). The
    file is read with the standard library, without importing linearmodels (statsmodels and
    pandas cost seconds to import); `french.load()` reads the same CSV."""
    spec = importlib.util.find_spec("linearmodels")  # locates the package, does not import it
    path = None if spec is None or spec.origin is None else \
        Path(spec.origin).parent / "datasets" / "french" / "french.csv.bz2"
    if path is None or not path.exists():
        raise DatasetNotFoundError("benchmark=french_portfolios needs linearmodels, which "
                                   "ships the data: pip install 'cl_toolkit[market]'.")
    with bz2.open(path, "rt", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = rows[0]
    cols = {c: np.array([float(r[i]) for r in rows[1:]]) for i, c in enumerate(header)
            if c != "dates"}
    dates = [r[header.index("dates")][:7] for r in rows[1:]]
    return french_panel(cols, dates, window, num_tasks, test_fraction, normalise)


french_portfolios.task_kind = "cross_section"
french_portfolios.ranges = {"window": at_least(1), "num_tasks": at_least(1),
                            "test_fraction": between(0, 1, low_open=True, high_open=True),
                            "scenario": MARKET_SCENARIO}
french_portfolios.smoke = {"num_tasks": 2}
