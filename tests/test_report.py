"""Report aggregation on hand-made results (mean ± std over seeds, reference rows) and the
naming of sweep run directories."""
import pytest

from cl_toolkit.metrics import summary
from cl_toolkit.report import group_runs, summarize


def fake(strategy, seed, matrix, before, reference=None):
    return {"status": "done", "config": {"seed": seed, "benchmark": {"name": "b"},
                                         "strategy": {"name": strategy}},
            "matrix": matrix, "before": before, "metrics": summary(matrix, before),
            "memory_bytes": [0, 0], "timings": {"train_s": [1.0, 2.0]},
            "reference": reference or {}}


def test_mean_std_over_seeds_and_reference_rows_once_per_seed():
    runs = [fake("opcm", 0, [[0.8, 0.1], [0.6, 0.7]], [0.2, 0.4], {"finetuned": {"a": 0.9, "b": 0.7}}),
            fake("opcm", 1, [[0.8, 0.1], [0.4, 0.9]], [0.3, 0.3], {"finetuned": {"a": 1.0, "b": 0.8}}),
            fake("merge_ta", 0, [[0.8, 0.1], [0.5, 0.5]], [0.2, 0.4], {"finetuned": {"a": 0.9, "b": 0.7}})]
    rows = {r["method"]: r for r in summarize(group_runs(runs))}
    opcm = rows["opcm @ b"]
    assert opcm["runs"] == 2
    assert opcm["acc"][0] == pytest.approx((0.65 + 0.65) / 2) and opcm["acc"][1] == pytest.approx(0)
    assert opcm["forgetting"][0] == pytest.approx((0.2 + 0.4) / 2)
    assert opcm["forgetting"][1] == pytest.approx(0.1)
    ft = rows["finetuned (reference) @ b"]
    assert ft["runs"] == 2  # seed 0 appears under two strategies but counts once
    assert ft["acc"][0] == pytest.approx((0.8 + 0.9) / 2)
    base = rows["base model (reference) @ b"]
    assert base["acc"][0] == pytest.approx(0.3) and base["bwt"] is None


def test_long_sweep_directory_names_are_shortened_uniquely():
    from cl_toolkit.cli import short_dirname

    assert short_dirname("seed=0,strategy=naive") == "seed=0,strategy=naive"
    a = short_dirname("x" * 300 + "a")
    b = short_dirname("x" * 300 + "b")
    assert a != b and len(a.encode()) <= 200 and a.startswith("x" * 100)
    assert short_dirname("x" * 300 + "a") == a
