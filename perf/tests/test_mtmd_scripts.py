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
