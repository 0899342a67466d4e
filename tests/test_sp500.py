"""The SP500Stocks stream (cl_toolkit/benchmarks/sp500.py): on a file the test writes in river's
format (runs without river), and on river's own file when the optional extra is installed,
where river's own target (the next day's equal-weighted return) is the oracle of our targets."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from cl_toolkit.benchmarks.sp500 import CONCEPTS, TICKERS, sp500_stocks
from cl_toolkit.errors import ConfigError, DatasetNotFoundError

T = 40


def write_file(path, returns, header=None):
    header = header or ["date", *TICKERS, "next_day_return"]
    with gzip.open(path, "wt") as f:
        f.write(",".join(header) + "\n")
        for d, r in enumerate(returns):
            nxt = returns[d + 1].mean() if d + 1 < len(returns) else 0.0
            f.write(",".join([f"2013-01-{d + 1:02d}" if d < 31 else f"2013-02-{d - 30:02d}",
                              *[f"{v:.6f}" for v in r], f"{nxt:.6f}"]) + "\n")


@pytest.fixture()
def generated(tmp_path):
    returns = np.round(np.random.default_rng(0).normal(0, 1.5, (T, 10)), 6)
    path = tmp_path / "sp500.csv.gz"
    write_file(path, returns)
    return path, returns


def test_layout_targets_and_sector_concepts(generated):
    path, r = generated
    W = 4
    s = sp500_stocks(window=W, num_tasks=2, test_fraction=0.25, normalise=False,
                     data_file=str(path))
    x = torch.cat([torch.cat([t.train.x, t.test.x]) for t in s]).double().numpy()
    y = torch.cat([torch.cat([t.train.y, t.test.y]) for t in s]).double().numpy()
    assert x.shape == (T - W, 10, 2 * W) and s.input_shape == (10, 2 * W)
    i = TICKERS.index("JPM")
    # sample d: returns of days d..d+W-1 (oldest first), then minus the ten's mean; target d+W
    assert np.allclose(x[7, i, :W], r[7:7 + W, i], atol=1e-4)
    assert np.allclose(x[7, i, W:], r[7:7 + W, i] - r[7:7 + W].mean(1), atol=1e-4)
    assert y[7, i] == pytest.approx(r[7 + W, i], abs=1e-4)
    assert [t.name for t in s] == ["from 2013-01-05", "from 2013-01-23"]
    sector = lambda t: CONCEPTS[int(s.concepts[TICKERS.index(t)].argmax())]  # noqa: E731
    assert s.concepts.sum(1).tolist() == [1.0] * 10
    assert {t for t in TICKERS if sector(t) == "information_technology"} == \
        {"AAPL", "IBM", "INTC", "MSFT"}
    assert sector("KO") == sector("WMT") == "consumer_staples" and sector("XOM") == "energy"


def test_features_are_robust_zscored_on_the_first_training_days_only(generated):
    """Oracle: numpy's pooled median and MAD (float64) of the raw features over the first
    period's training days (the first 14 of 36 samples: 18 per period, round(3.6) = 4 of them
    test)."""
    path, _ = generated
    kw = dict(window=4, num_tasks=2, test_fraction=0.2, data_file=str(path))
    raw = sp500_stocks(normalise=False, **kw)
    norm = sp500_stocks(normalise=True, **kw)
    xr = torch.cat([torch.cat([t.train.x, t.test.x]) for t in raw]).double().numpy()
    xn = torch.cat([torch.cat([t.train.x, t.test.x]) for t in norm]).double().numpy()
    assert len(raw[0].train) == 14
    fit = xr[:14].reshape(-1, 8)
    med = np.median(fit, 0)
    mad = np.median(np.abs(fit - med), 0) * 1.4826
    assert np.allclose(xn, np.clip((xr - med) / mad, -3, 3), atol=1e-5)
    assert torch.equal(raw[1].test.y, norm[1].test.y)  # targets stay raw returns


def test_bad_input(tmp_path, generated):
    path, r = generated
    with pytest.raises(ConfigError, match="window=40 is longer than the history"):
        sp500_stocks(window=40, data_file=str(path))
    bad = tmp_path / "bad.csv.gz"
    write_file(bad, r[:, :9], header=["date", *TICKERS[:9], "next_day_return"])
    with pytest.raises(ConfigError, match="data_file.*missing.*XOM"):
        sp500_stocks(data_file=str(bad))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        sp500_stocks(data_file=str(tmp_path / "nowhere.csv"))


def test_real_river_file_targets_match_rivers_own():
    river = pytest.importorskip("river", reason="optional extra: pip install 'cl_toolkit[market]'")
    from river.datasets import SP500Stocks

    W = 20
    s = sp500_stocks(window=W, normalise=False)
    assert s.input_shape == (10, 2 * W) and len(s) == 5
    y = torch.cat([torch.cat([t.train.y, t.test.y]) for t in s]).double().numpy()
    rows = list(SP500Stocks())       # river's own reader: (returns of the day, next-day target)
    assert len(rows) == 1257 and y.shape == (1257 - W, 10) and river
    # the day a window ends on (row d + W - 1): river's target is the mean of our ten targets
    theirs = np.array([target for _, target in rows[W - 1:-1]])
    assert np.allclose(y.mean(1), theirs, atol=1e-4)
    assert np.allclose(y[0], [rows[W][0][t] for t in TICKERS], atol=1e-5)
