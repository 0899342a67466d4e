"""Market streams (cl_toolkit/benchmarks/market.py) and the cross_section scores they are
judged by: layout, the planted concept signal, IC / rank IC / ICIR / precision@k against scipy
and by hand, bad input, strategy compatibility and the CLI command of the README."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cl_toolkit import validation
from cl_toolkit.benchmarks.market import check_panel, split_periods, synthetic_market
from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import TensorData
from cl_toolkit.task_kinds import CrossSection, precision_at_k

from cltk_subprocess import cltk

SMALL = dict(num_stocks=12, num_concepts=3, num_features=2, window=4, num_tasks=2,
             days_per_task=8)


def test_synthetic_market_shapes_seed_and_window_layout():
    s = synthetic_market(**SMALL, seed=3)
    assert s.kind == "cross_section" and s.scenario == "domain-il" and len(s) == 2
    x = torch.cat([s[0].train.x, s[0].test.x, s[1].train.x, s[1].test.x])
    assert x.shape == (16, 12, 2 * 4)
    # feature-major, oldest day first: day d+1's window is day d's shifted by one
    w = x.reshape(16, 12, 2, 4)
    assert torch.equal(w[1:, :, :, :-1], w[:-1, :, :, 1:])
    assert torch.equal(synthetic_market(**SMALL, seed=3)[1].test.y, s[1].test.y)
    assert not torch.equal(synthetic_market(**SMALL, seed=4)[1].test.y, s[1].test.y)
    assert s.concepts.shape == (12, 3) and s.concepts.sum(1).tolist() == [1.0] * 12
    assert s.describe()["concepts"] == [12, 3]  # the matrix stays out of results.json


def test_concepts_carry_the_signal_and_regimes_change_it():
    """The planted structure, checked from the data alone: the concept mean of the latest
    features predicts the return better than a stock's own features (what HIST/MTMD can use and
    a per-stock model cannot), and the best linear read-out differs between regimes."""
    s = synthetic_market(num_stocks=60, num_concepts=4, num_features=3, window=2, num_tasks=2,
                         days_per_task=150, seed=0)
    W, F_ = 2, 3
    fits = []
    for task in s:
        x, y = task.train.x.reshape(-1, 60, F_, W)[..., -1], task.train.y   # latest day
        group = (s.concepts.t() @ x) / s.concepts.sum(0)[:, None]          # [D, C, F]
        pooled = s.concepts @ group                                          # [D, S, F]
        own = np.linalg.lstsq(x.reshape(-1, F_).numpy(), y.reshape(-1).numpy(), rcond=None)[0]
        pool = np.linalg.lstsq(pooled.reshape(-1, F_).numpy(), y.reshape(-1).numpy(),
                               rcond=None)[0]
        r_own = np.corrcoef(x.reshape(-1, F_).numpy() @ own, y.reshape(-1))[0, 1]
        r_pool = np.corrcoef(pooled.reshape(-1, F_).numpy() @ pool, y.reshape(-1))[0, 1]
        assert r_pool > r_own + 0.1
        fits.append(pool / np.linalg.norm(pool))
    assert abs(float(fits[0] @ fits[1])) < 0.95


def _scipy_scores(pred, y, k):
    ic, ric, prec = [], [], []
    for d in range(y.shape[0]):
        m = ~np.isnan(y[d])
        ic.append(stats.pearsonr(pred[d, m], y[d, m])[0])
        ric.append(stats.spearmanr(pred[d, m], y[d, m])[0])
        top = np.argsort(-pred[d, m])[:k]
        prec.append(np.mean(stats.rankdata(y[d, m])[top] > (m.sum() + 1) / 2))
    return (np.mean(ic), np.mean(ric), np.mean(ic) / np.std(ic, ddof=1),
            np.mean(ric) / np.std(ric, ddof=1), np.mean(prec))


def test_ic_rank_ic_icir_and_precision_match_scipy_with_absent_stocks():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 15, generator=g)
    pred = y + torch.randn(7, 15, generator=g)
    y[0, :3] = float("nan")
    y[4, 5] = float("nan")
    y[2, 1] = y[2, 2]  # a tie
    data = TensorData(torch.zeros(7, 15, 1), y)
    got = CrossSection().score(lambda x, t: pred[:len(x)] if len(x) == 7 else None, data, 7)
    want = _scipy_scores(pred.numpy(), y.numpy(), CrossSection.precision_k)
    for key, w in zip(["ic", "rank_ic", "icir", "rank_icir", "precision_at_k"], want):
        assert got[key] == pytest.approx(w, abs=1e-6), key


def test_precision_at_k_by_hand():
    """Day 0: targets 1..6, prediction ranks stocks 5, 0, 4 top: targets 6, 1, 5; above the
    median (3.5): 6 and 5, so 2/3. Day 1 has 2 stocks: fewer than k, left out."""
    y = torch.tensor([[1.0, 2, 3, 4, 5, 6], [1, 2] + [float("nan")] * 4])
    pred = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.8, 1.0], [0.0] * 6])
    assert precision_at_k(pred, y, 3) == [pytest.approx(2 / 3)]


def test_bad_panels_are_refused_with_the_key_and_the_fix():
    x, y = torch.randn(10, 6, 8), torch.randn(10, 6)
    c = torch.eye(6)
    check_panel(x, y, c, num_features=2, window=4)
    nan = x.clone()
    nan[3, 2, 1] = float("nan")
    with pytest.raises(ConfigError, match="fillna=true"):
        check_panel(nan, y, c, num_features=2, window=4)
    filled = check_panel(nan, y, c, num_features=2, window=4, fillna=True)
    assert filled[3, 2, 1] == 0 and not torch.isnan(filled).any()
    few = y.clone()
    few[4, :2] = float("nan")
    with pytest.raises(ConfigError, match="day 4 has 4 stocks, fewer than k=5"):
        check_panel(x, few, c, num_features=2, window=4)
    with pytest.raises(ConfigError, match="benchmark.concepts.*6 stocks"):
        check_panel(x, y, torch.eye(5), num_features=2, window=4)
    with pytest.raises(ConfigError, match="window=4 is longer than the history"):
        check_panel(x, y, c, num_features=2, window=4, history=3)
    with pytest.raises(ConfigError, match="num_tasks"):
        split_periods(x, y, 9, 0.5)
    with pytest.raises(ConfigError, match="num_concepts"):
        synthetic_market(num_stocks=6, num_concepts=7)


def test_naive_joint_replay_accept_market_streams_and_kcl_is_refused():
    for name in ("naive", "joint", "replay"):
        validation.check_compatible({"strategy": {"name": name},
                                     "benchmark": {"name": "synthetic_market"}})
    with pytest.raises(ConfigError, match="kcl cannot learn cross_section.*naive"):
        validation.check_compatible({"strategy": {"name": "kcl"},
                                     "benchmark": {"name": "synthetic_market"}})


def test_replay_trains_mtmd_by_days():
    from cl_toolkit import runner
    from cl_toolkit.models.market import mtmd
    from cl_toolkit.strategies.replay import Replay
    from cl_toolkit.strategy import RunContext

    s = synthetic_market(**SMALL)
    strategy = Replay(buffer_size=3, epochs=1, batch_size=2, optimizer="adam", lr=1e-3)
    strategy.setup(s, mtmd(s, hidden=8, bank_size=4), RunContext())
    for task in s:
        strategy.learn(task)
    assert len(strategy.buffer) == 3 and strategy.buffer.data.x.shape[1:] == (12, 8)
    scores = runner.evaluate_scores(strategy, s[0], 64, torch.device("cpu"))
    assert list(scores)[:2] == ["ic", "rank_ic"] and np.isfinite(scores["ic"])


def test_cli_runs_the_readme_command_and_refuses_mismatches(tmp_path):
    root = str(tmp_path)
    out = cltk("run", "benchmark=synthetic_market", "model=mtmd", "smoke=true", "quiet=true",
               "threads=1", f"output_root={root}", cwd=root)
    assert "task 2/2" in out.stdout
    bad = cltk("run", "benchmark=split_digits", "model=mtmd", "smoke=true", "quiet=true",
               f"output_root={root}", cwd=root, check=False)
    assert bad.returncode == 2 and "it takes cross_section" in bad.stderr + bad.stdout
