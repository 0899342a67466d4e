"""perf/gpu_kernels.py on CPU (--smoke: interpreter, toy sizes): the GPU script runs
rarely and on borrowed time, so its reference and baseline plumbing is checked here."""
import json
import subprocess
import sys


def test_ours_only_run_takes_fla_rows_from_a_reference_and_profiles(tmp_path):
    ref = tmp_path / "ref.json"
    fla_row = {"impl": "fla gdr (chunk)", "size": [2, 64, 2, 16], "fwd_ms": 12345.0,
               "fwdbwd_ms": 54321.0}
    ref.write_text(json.dumps({"timings": [fla_row]}))
    proc = subprocess.run(
        [sys.executable, "-m", "perf.gpu_kernels", "--smoke",
         "--skip-correctness", "--ours-only", "--fla-ref", str(ref),
         "--profile", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_kernels.json").read_text())
    [row] = result["timings"]
    assert row["impl"] == "ours gdr (triton)"
    assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
    table = (tmp_path / "gpu_kernels.md").read_text()
    # fla's reference time over ours gives the speedup column.
    assert f"{12345.0 / row['fwd_ms']:.2f}x" in table
    assert f"{54321.0 / row['fwdbwd_ms']:.2f}x" in table
    profile = (tmp_path / "gpu_profile.txt").read_text()
    assert "ours gdr fwd+bwd" in profile and "ours MoMLayer fwd+bwd" in profile


def test_mom_baseline_is_timed_beside_ours_with_the_same_weights(tmp_path):
    # The baseline here is today's layer file itself, so the two outputs must agree.
    from cl_toolkit.layers import mom
    proc = subprocess.run(
        [sys.executable, "-m", "perf.gpu_kernels", "--smoke",
         "--skip-correctness", "--mom-only", "--ours-only", "--mom-baseline", mom.__file__,
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_kernels_mom.json").read_text())
    assert [r["impl"] for r in result["timings"]] == ["ours MoMLayer",
                                                      "ours MoMLayer, baseline mom.py"]
    [note] = [n for n in result["notes"] if n.startswith("MoM baseline")]
    assert float(note.split("differs from ours by ")[1].split()[0]) < 1e-6


def test_warm_parts_run_the_calls_of_the_checks_and_timings(capsys):
    # gpu_kernels.sh runs these in parallel processes before the main run (kernel builds).
    import torch
    from perf import gpu_kernels
    for part in ("gla-bf16", "sizes"):
        gpu_kernels.warm(part, torch.device("cpu"), smoke=True)
    assert "warmed gla-bf16" in capsys.readouterr().out
