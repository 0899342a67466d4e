"""Ten large S&P 500 stocks as a market stream (optional extra ``market``: river ships the data
offline inside its wheel as ``river.datasets.SP500Stocks``, file ``sp500.csv.gz``).

The file: one row per trading day from 2013-02-11 to 2018-02-07 (1,257 days), columns
``date``, the daily simple returns in percent of AAPL, AMZN, IBM, INTC, JNJ, JPM, KO, MSFT,
WMT and XOM (split-adjusted closes), and ``next_day_return`` (the next day's equal-weighted
return of the ten, river's own target; we do not use it). It holds returns only: no prices,
volumes or market values.

Entities: the ten stocks; a day's cross-section is a sample; target: each stock's return on
the next trading day (in the file). Features (our choice, as for the French portfolios): each
stock's returns over the last ``window`` days and its return minus the ten's equal-weighted
mean, robust z-scored per column on the first period's training days (`robust_zscore`;
``normalise=false`` keeps percent returns). Concepts (HIST/MTMD's predefined concepts): the
stocks' GICS sectors over the period (our assignment, one-hot): information technology (AAPL,
IBM, INTC, MSFT), consumer staples (KO, WMT), consumer discretionary (AMZN), health care (JNJ),
financials (JPM), energy (XOM); equal market values (the file has none). Tasks: consecutive
periods of equal length (about a year each by default). Ten entities is a tiny cross-section:
a day's IC is a correlation over ten points, so IC figures are noisy; read them with that
caveat.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import torch

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.validation import at_least, between

from .market import (MARKET_SCENARIO, MarketStream, check_panel, first_train_days,
                     robust_zscore, split_periods)

SECTORS = {"AAPL": "information_technology", "AMZN": "consumer_discretionary",
           "IBM": "information_technology", "INTC": "information_technology",
           "JNJ": "health_care", "JPM": "financials", "KO": "consumer_staples",
           "MSFT": "information_technology", "WMT": "consumer_staples", "XOM": "energy"}
TICKERS = tuple(SECTORS)
CONCEPTS = tuple(sorted(set(SECTORS.values())))
INSTALL = "pip install 'cl_toolkit[market]' (river ships the file)"


def concept_matrix(tickers: tuple[str, ...] = TICKERS) -> torch.Tensor:
    """One-hot ``[S, C]``: each stock's sector (`SECTORS`), columns in `CONCEPTS` order."""
    c = torch.zeros(len(tickers), len(CONCEPTS))
    for i, t in enumerate(tickers):
        c[i, CONCEPTS.index(SECTORS[t])] = 1
    return c


def read_returns(path: Path) -> tuple[list[str], tuple[str, ...], np.ndarray]:
    """(dates, tickers, returns ``[T, S]`` in percent) from a file in river's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    tickers = tuple(h for h in header if h in SECTORS)
    missing = [t for t in TICKERS if t not in tickers]
    if "date" not in header or missing:
        raise ConfigError(f"benchmark.data_file={path}: expected river's SP500Stocks format "
                          f"(columns date, {', '.join(TICKERS)}, next_day_return); missing "
                          f"{(['date'] if 'date' not in header else []) + missing}. Leave "
                          "benchmark.data_file null to read river's own file.")
    cols = [header.index(t) for t in tickers]
    dates = [r[header.index("date")] for r in rows[1:] if r]
    try:
        ret = np.array([[float(r[c]) for c in cols] for r in rows[1:] if r], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"benchmark.data_file={path}: a row is short or a return is not a "
                          f"number ({exc}); fix or remove that row.") from None
    return dates, tickers, ret


def sp500_panel(dates: list[str], tickers: tuple[str, ...], returns: np.ndarray,
                window: int = 20, num_tasks: int = 5, test_fraction: float = 0.3,
                normalise: bool = True) -> MarketStream:
    """The stream from daily returns ``[T, S]`` (see the module doc); separate from the file so
    tests can feed it."""
    T = returns.shape[0]
    if window >= T:
        raise ConfigError(f"benchmark.window={window} is longer than the history ({T} trading "
                          "days, one more is needed for the target); use a shorter window.")
    own = np.lib.stride_tricks.sliding_window_view(returns, window, 0)[:T - window]  # [D,S,W]
    rel = own - own.mean(1, keepdims=True)
    x = torch.from_numpy(np.concatenate([own, rel], 2).astype(np.float32))
    y = torch.from_numpy(returns[window:].astype(np.float32))   # day d: the window's next day
    if normalise:
        x = robust_zscore(x, first_train_days(x.shape[0], num_tasks, test_fraction))
    concepts = concept_matrix(tickers)
    x = check_panel(x, y, concepts, num_features=2, window=window, history=T)
    days = dates[window:]                                       # each sample's target day
    edges = [round(i * len(days) / num_tasks) for i in range(num_tasks)]
    tasks = split_periods(x, y, num_tasks, test_fraction, [f"from {days[e]}" for e in edges])
    return MarketStream("sp500_stocks", tasks, "domain-il", 0, tuple(x.shape[1:]), 0,
                        info={"num_features": 2, "window": window, "frequency": "daily",
                              "first_day": days[0], "last_day": days[-1]},
                        kind="cross_section", concepts=concepts, stocks=tickers)


def sp500_stocks(window: int = 20, num_tasks: int = 5, test_fraction: float = 0.3,
                 normalise: bool = True, data_file: str | None = None,
                 scenario: str = "domain-il", seed: int = 0) -> MarketStream:
    """The stream from river's ``SP500Stocks`` file, or ``data_file`` (a CSV, optionally
    gzipped, in the same format)."""
    if data_file is None:
        try:
            from river.datasets import SP500Stocks
        except ImportError as exc:
            raise DatasetNotFoundError(f"benchmark=sp500_stocks needs river: {INSTALL}; or "
                                       "set benchmark.data_file to a CSV in its format.") from exc
        path = Path(SP500Stocks().path)
    else:
        path = Path(data_file).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"benchmark.data_file: {path} does not exist; {INSTALL}, "
                                   "or give the path of a CSV in its format.")
    dates, tickers, returns = read_returns(path)
    return sp500_panel(dates, tickers, returns, window, num_tasks, test_fraction, normalise)


sp500_stocks.task_kind = "cross_section"
sp500_stocks.ranges = {"window": at_least(1), "num_tasks": at_least(1),
                       "test_fraction": between(0, 1, low_open=True, high_open=True),
                       "scenario": MARKET_SCENARIO}
sp500_stocks.smoke = {"window": 5, "num_tasks": 2}
