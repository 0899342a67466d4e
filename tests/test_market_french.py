"""The Fama-French portfolio stream (cl_toolkit/benchmarks/french.py) on generated columns,
and on the real data when linearmodels (optional extra ``market``) is installed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_toolkit.benchmarks.french import CONCEPTS, PORTFOLIOS, french_panel
from cl_toolkit.errors import ConfigError


def columns(T=60, seed=0):
    rng = np.random.default_rng(seed)
    cols = {c: rng.normal(0, 5, T) for c in PORTFOLIOS}
    cols["MktRF"], cols["RF"] = rng.normal(0, 4, T), np.full(T, 0.3)
    return cols


def test_panel_layout_targets_and_concepts():
    cols = columns()
    dates = [f"{1950 + m // 12}-{m % 12 + 1:02d}" for m in range(60)]
    s = french_panel(cols, dates, window=6, num_tasks=2, test_fraction=0.25, normalise=False)
    x = torch.cat([torch.cat([t.train.x, t.test.x]) for t in s])
    y = torch.cat([torch.cat([t.train.y, t.test.y]) for t in s])
    assert x.shape == (54, 30, 12) and s.info["first_month"] == "1950-07"
    i = PORTFOLIOS.index("S1V3")
    # month d: own returns of months d..d+5 (oldest first), then minus the market; target d+6
    assert np.allclose(x[10, i, :6].numpy(), cols["S1V3"][10:16], atol=1e-4)
    mkt = cols["MktRF"] + cols["RF"]
    assert np.allclose(x[10, i, 6:].numpy(), cols["S1V3"][10:16] - mkt[10:16], atol=1e-4)
    assert y[10, i] == pytest.approx(cols["S1V3"][16], abs=1e-4)
    row = dict(zip(CONCEPTS, s.concepts[i].tolist()))
    assert {k for k, v in row.items() if v} == {"size_value", "S1", "V3"}
    assert {k for k, v in zip(CONCEPTS, s.concepts[PORTFOLIOS.index("Hlth")]) if v} == \
        {"industry"}


def test_bad_input():
    cols = columns(T=10)
    with pytest.raises(ConfigError, match="window=12 is longer than the history"):
        french_panel(cols, [str(m) for m in range(10)], window=12)
    del cols["S5M5"]
    with pytest.raises(ConfigError, match="S5M5"):
        french_panel(cols, [str(m) for m in range(10)], window=3)


def test_real_french_file_matches_linearmodels_own_loader():
    """We read linearmodels' file without importing it; its own `french.load()` is the oracle
    of the targets (month 12 on) and of the first month."""
    pytest.importorskip("linearmodels", reason="optional extra: pip install 'cl_toolkit[market]'")
    from linearmodels.datasets import french

    from cl_toolkit.benchmarks.french import french_portfolios

    assert french_portfolios().input_shape == (30, 24)
    df = french.load()
    s = french_portfolios(normalise=False)
    assert len(s) == 4
    y = torch.cat([torch.cat([t.train.y, t.test.y]) for t in s]).double().numpy()
    assert np.allclose(y, df[list(PORTFOLIOS)].to_numpy()[12:], atol=1e-6)
    assert s.info["first_month"] == str(df["dates"].iloc[12])[:7] == "1950-01"
