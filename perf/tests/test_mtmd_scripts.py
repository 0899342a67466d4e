"""The issue-24 perf scripts run at tiny sizes and report what they say they report."""
from __future__ import annotations

import json

from perf import mtmd_evidence, mtmd_speed


def test_speed_script_times_both_models(tmp_path):
    out = mtmd_speed.main(["--stocks", "12", "--window", "4", "--hidden", "8", "--days", "2",
                           "--repeats", "1", "--json", str(tmp_path / "s.json")])
    assert set(out["epoch_s"]) == {"hist", "mtmd"} and out["mtmd_over_hist"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["stocks"] == 12


def test_evidence_table_has_mean_and_ci_over_seeds(tmp_path):
    def run(seed, acc, model="mtmd", **opts):
        d = tmp_path / f"{model}{seed}{len(opts)}"
        d.mkdir()
        R = [[acc, 0.1], [0.0, acc]]
        (d / "results.json").write_text(json.dumps({
            "status": "done", "stream": {"kind": "cross_section"},
            "config": {"model": {"name": model, **opts}}, "matrix": R,
            "metrics": {"acc": acc / 2, "bwt": -acc, "forgetting": acc},
            "memory_bytes": [0, 64]}))
    for seed, acc in enumerate([0.1, 0.2, 0.3]):
        run(seed, acc)
        run(seed, acc, memory_tasks="frozen")
    text = mtmd_evidence.table([str(tmp_path)])
    # mean 0.2, 95% CI half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248
    assert "| mtmd | 3 | 0.100 ± 0.124 | 0.200 ± 0.248 | 0.100 ± 0.000 |" in text
    assert "| mtmd (memory_tasks=frozen) | 3 |" in text


def test_day_level_interval_by_hand():
    """Two periods: ICs 0.1 and 0.3 with ICIR 0.5 and 1.0 (daily std 0.2 and 0.3) over 16 and
    9 test days: SE = sqrt(0.2^2 / 16 + 0.3^2 / 9) / 2 = sqrt(0.0025 + 0.01) / 2."""
    r = {"matrix": [[0.5, 0.0], [0.1, 0.3]], "stream": {"tasks": [{"test": 16}, {"test": 9}]},
         "extras": {"icir": {"matrix": [[1.0, 0.0], [0.5, 1.0]]}}}
    assert abs(mtmd_evidence.day_half_width(r) - 1.96 * 0.0125 ** 0.5 / 2) < 1e-12
    r["extras"]["icir"]["matrix"][1][0] = 0.0  # std unrecoverable
    assert mtmd_evidence.day_half_width(r) != mtmd_evidence.day_half_width(r)  # NaN


def test_paired_differences_match_seeds(tmp_path):
    """Final IC (acc): mtmd 0.3, 0.1, 0.2 for seeds 0, 1, 2; hist's files in the same order
    hold seeds 2, 1, 0. Paired by seed the differences are 0.3, -0.1, 0.1: mean 0.1, half-width
    t(0.975, 2) x sd 0.2 / sqrt(3) = 0.497 (paired by file order they would be 0.2, -0.1, 0.2:
    half-width 0.430)."""
    for model, accs in (("mtmd", [0.3, 0.1, 0.2]), ("hist", [0.1, 0.2, 0.0])):
        for seed, acc in enumerate(accs):
            d = tmp_path / f"{model}{seed}"
            d.mkdir()
            (d / "results.json").write_text(json.dumps({
                "status": "done", "stream": {"kind": "cross_section"},
                "config": {"model": {"name": model}, "seed": 2 - seed if model == "hist"
                           else seed}, "matrix": [[acc]],
                "metrics": {"acc": acc, "bwt": 0.0, "forgetting": 0.0}}))
    text = mtmd_evidence.paired([str(tmp_path)], ["mtmd:hist"])
    assert "| mtmd − hist | 3 | +0.100 ± 0.497 |" in text
