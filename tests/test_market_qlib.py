"""The Qlib-format loader (cl_toolkit/benchmarks/qlib_data.py) on files this test writes in
Qlib's layout: binary reading, labels against the written prices, feature order, concepts and
the bad directories."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cl_toolkit.benchmarks.qlib_data import qlib_market, read_bin
from cl_toolkit.errors import ConfigError, DatasetNotFoundError

DAYS = [f"2020-01-{d:02d}" for d in range(1, 31)] + [f"2020-02-{d:02d}" for d in range(1, 21)]
SYMS = [f"SH6000{i:02d}" for i in range(8)]


def write_qlib(root, fields=("close", "open", "volume"), late=2):
    """8 instruments over 50 days; SYMS[late] joins the market on day 10 (its data too)."""
    rng = np.random.default_rng(0)
    (root / "calendars").mkdir(parents=True)
    (root / "calendars" / "day.txt").write_text("\n".join(DAYS) + "\n")
    (root / "instruments").mkdir()
    lines = [f"{s}\t{DAYS[10] if i == late else DAYS[0]}\t{DAYS[-1]}" for i, s in enumerate(SYMS)]
    (root / "instruments" / "csi_test.txt").write_text("\n".join(lines) + "\n")
    prices = {}
    for i, s in enumerate(SYMS):
        first = 10 if i == late else 0
        d = root / "features" / s.lower()
        d.mkdir(parents=True)
        for f in fields:
            v = np.exp(np.cumsum(rng.normal(0, 0.02, len(DAYS) - first))).astype("<f4") * 10
            prices[s, f] = np.concatenate([np.full(first, np.nan, "<f4"), v])
            np.concatenate([[np.float32(first)], v]).astype("<f4").tofile(d / f"{f}.day.bin")
    return prices


def test_read_bin_places_values_at_their_calendar_index(tmp_path):
    np.array([3, 1.5, 2.5], dtype="<f4").tofile(tmp_path / "x.day.bin")
    got = read_bin(tmp_path / "x.day.bin", 6)
    assert np.isnan(got[:3]).all() and got[3:5].tolist() == [1.5, 2.5] and np.isnan(got[5])


def test_loader_labels_features_and_absent_stocks(tmp_path):
    prices = write_qlib(tmp_path)
    s = qlib_market(str(tmp_path), "csi_test", ("close", "open", "volume"), window=5,
                    num_tasks=2, test_fraction=0.25)
    assert s.kind == "cross_section" and s.input_shape == (8, 15) and s.stocks == tuple(SYMS)
    x = torch.cat([torch.cat([t.train.x, t.test.x]) for t in s])
    y = torch.cat([torch.cat([t.train.y, t.test.y]) for t in s])
    assert x.shape == (50 - 5, 8, 15) and not torch.isnan(x).any()       # Fillna
    close = np.stack([prices[sym, "close"] for sym in SYMS], 1)
    # day d of the panel is calendar day d + 4; label = close(t+1) / close(t) - 1
    want = close[5:] / close[4:-1] - 1
    assert np.allclose(y.numpy(), want, equal_nan=True, atol=1e-6)
    assert torch.isnan(y[:6, 2]).all() and not torch.isnan(y[6:, 2]).any()  # joined on day 10
    # column "close, 1 day back" is a monotone map of close(t-1) / close(t) on every day
    ratio = close[3:-2] / close[4:-1]
    for d in range(10, 20):
        assert stats.spearmanr(x[d, :, 3].numpy(), ratio[d])[0] == pytest.approx(1.0)


def test_loader_concepts_and_bad_directories(tmp_path):
    write_qlib(tmp_path)
    csv = tmp_path / "concepts.csv"
    csv.write_text("instrument,bank,tech\n" + "".join(f"{s},{i % 2},{1 - i % 2}\n"
                                                      for i, s in enumerate(SYMS)))
    s = qlib_market(str(tmp_path), "csi_test", ("close", "open"), window=5, num_tasks=2,
                    concepts_file=str(csv))
    assert s.concepts[:, 0].tolist() == [float(i % 2) for i in range(8)]
    csv.write_text("instrument,bank\n" + "".join(f"{s},1\n" for s in SYMS[:-1]))
    with pytest.raises(ConfigError, match="concepts_file.*SH600007"):
        qlib_market(str(tmp_path), "csi_test", ("close",), window=5, concepts_file=str(csv))
    with pytest.raises(DatasetNotFoundError, match="get_data"):
        qlib_market(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="benchmark.market='csi300'.*csi_test"):
        qlib_market(str(tmp_path), "csi300")
    with pytest.raises(ConfigError, match="benchmark.fields.*vwap"):
        qlib_market(str(tmp_path), "csi_test", ("close", "vwap"), window=5)
    with pytest.raises(ConfigError, match="window=60 is longer than the history"):
        qlib_market(str(tmp_path), "csi_test", ("close",), window=60)
    with pytest.raises(ConfigError, match="fillna=true"):
        qlib_market(str(tmp_path), "csi_test", ("close",), window=5, fillna=False)
