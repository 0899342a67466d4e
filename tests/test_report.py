"""The report on hand-made results: sample std (ddof=1) against the statistics module, one
section per (benchmark, scenario), n/a with its reason, CSV / LaTeX exports, per-cell matrix
statistics, the EXTRA_RENDERERS extension point, and the HTML as a real browser draws it."""
import csv
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import pytest

from cl_toolkit import report
from cl_toolkit.metrics import summary
from cl_toolkit.report import group_runs, summarize, write_report


def fake(strategy, seed, matrix, before, reference=None, bench="b", scenario="task-il",
         extra_cfg=None, **fields):
    return {"status": "done", "config": {"seed": seed, "benchmark": {"name": bench},
                                         "strategy": {"name": strategy, **(extra_cfg or {})}},
            "stream": {"name": bench, "scenario": scenario},
            "matrix": matrix, "before": before, "metrics": summary(matrix, before),
            "memory_bytes": [0, 0], "timings": {"train_s": [1.0, 2.0]},
            "reference": reference or {}, **fields}


def test_mean_sample_std_over_seeds_and_reference_rows_once_per_seed():
    runs = [fake("opcm", 0, [[0.8, 0.1], [0.6, 0.7]], [0.2, 0.4], {"finetuned": {"a": 0.9, "b": 0.7}}),
            fake("opcm", 1, [[0.8, 0.1], [0.4, 0.9]], [0.3, 0.3], {"finetuned": {"a": 1.0, "b": 0.8}}),
            fake("merge_ta", 0, [[0.8, 0.1], [0.5, 0.5]], [0.2, 0.4], {"finetuned": {"a": 0.9, "b": 0.7}})]
    rows = {r["method"]: r for r in summarize(group_runs(runs))}
    opcm = rows["opcm"]
    assert opcm["runs"] == 2
    assert opcm["acc"][0] == pytest.approx((0.65 + 0.65) / 2) and opcm["acc"][1] == pytest.approx(0)
    assert opcm["forgetting"][0] == pytest.approx((0.2 + 0.4) / 2)
    assert opcm["forgetting"][1] == pytest.approx(statistics.stdev([0.2, 0.4]))  # ddof=1
    assert opcm["forgetting"][2] == 2
    assert rows["merge_ta"]["acc"][1] is None  # one run: no spread, no "± 0.00"
    assert report.fmt(rows["merge_ta"]["acc"]) == "50.00"
    ft = rows["finetuned (reference)"]
    assert ft["runs"] == 2  # seed 0 appears under two strategies but counts once
    assert ft["acc"][0] == pytest.approx((0.8 + 0.9) / 2)
    base = rows["base model (reference)"]
    assert base["acc"][0] == pytest.approx(0.3) and base["bwt"] is None


def test_long_sweep_directory_names_are_shortened_uniquely():
    from cl_toolkit.cli import short_dirname, sweep_dirname

    assert short_dirname("seed=0,strategy=naive") == "seed=0,strategy=naive"
    a = short_dirname("x" * 300 + "a")
    b = short_dirname("x" * 300 + "b")
    assert a != b and len(a.encode()) <= 200 and a.startswith("x" * 100)
    assert short_dirname("x" * 300 + "a") == a
    assert short_dirname("") == "defaults"
    # A sweep's directory: every override but the ones that do not change what runs.
    assert sweep_dirname(["seed=0,1", "quiet=true", "strategy=naive,replay"], ["quiet"]) == \
        "seed=0,1,strategy=naive,replay"
    assert sweep_dirname(["benchmark=merging_rotated_fashion_mnist"], []) != \
        sweep_dirname(["benchmark=split_digits"], [])


def write_results(root: Path, runs: list[dict]) -> None:
    for i, r in enumerate(runs):
        d = root / f"run{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))


@pytest.fixture
def mixed(tmp_path):
    """Two benchmarks and scenarios, two seeds of naive on one, a class-il FWT marked n/a."""
    class_il = {"metrics_override": None}
    runs = [fake("naive", 0, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2], bench="split_digits"),
            fake("naive", 1, [[0.7, 0.1], [0.4, 0.9]], [0.1, 0.1], bench="split_digits"),
            fake("replay", 0, [[0.9, 0.0], [0.8, 0.9]], [0.1, 0.1], bench="split_digits",
                 extra_cfg={"buffer_size": 200}),
            fake("naive", 0, [[0.6, 0.2, 0.1], [0.5, 0.6, 0.1], [0.4, 0.5, 0.7]],
                 [0.1, 0.1, 0.1], bench="rotated", scenario="class-il",
                 not_applicable={"fwt": "class-il: the head of an unseen task is untrained"})]
    runs[3]["metrics"]["fwt"] = None
    del class_il
    write_results(tmp_path / "runs", runs)
    return tmp_path / "runs", runs


def test_one_section_per_benchmark_and_scenario_with_na_reasons(mixed, tmp_path):
    root, runs = mixed
    paths = write_report([str(root)], str(tmp_path / "out"))
    assert [p.name for p in paths] == ["report.md", "report.html", "report.csv", "report.tex"]
    md = (tmp_path / "out" / "report.md").read_text()
    first, second = md.index("## rotated · class-il · 3 tasks"), \
        md.index("## split_digits · task-il · 2 tasks")
    rotated, digits = md[first:second], md[second:]
    assert "| naive | 1 |" in rotated and "replay" not in rotated
    assert "| naive | 2 |" in digits and "| replay | 1 |" in digits
    assert digits.index("| naive |") < digits.index("| replay |"), "registry order, not alphabet"
    # naive on split_digits: ACC over seeds 65.0, 65.0 -> "65.00 ± 0.00" is a real sample std.
    accs = [statistics.mean(r["matrix"][-1]) * 100 for r in runs[:2]]
    assert f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" in digits
    assert "n/a [1]" in rotated and "[1] class-il: the head of an unseen task is untrained" in rotated
    assert "ddof=1" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("<section>") == 2 and "class-il: the head of an unseen task" in html
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and r"n/a\textsuperscript{1}" in tex
    assert r"$\pm$" in tex and "ddof=1" in tex
    # Plots per section, never one axis for both.
    assert (tmp_path / "out" / "split_digits_task-il_2__running_acc.png").exists()
    assert (tmp_path / "out" / "rotated_class-il_3__running_acc.png").exists()


def test_csv_has_one_row_per_run_with_every_metric_and_varying_hyperparameter(mixed, tmp_path):
    root, runs = mixed
    write_report([str(root)], str(tmp_path / "out"))
    with open(tmp_path / "out" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs)
    for column in ("acc", "bwt", "fwt", "forgetting", "learning_acc", "seed", "strategy.name",
                   "benchmark.name", "strategy.buffer_size", "fwt_na"):
        assert column in rows[0], column
    by_dir = {Path(r["run_dir"]).name: r for r in rows}
    assert float(by_dir["run0"]["acc"]) == pytest.approx(statistics.mean(runs[0]["matrix"][-1]))
    assert by_dir["run3"]["fwt"] == "" and "class-il" in by_dir["run3"]["fwt_na"]


def test_matrix_cells_show_mean_and_sample_std(mixed, tmp_path):
    root, runs = mixed
    write_report([str(root)], str(tmp_path / "out"))
    html = (tmp_path / "out" / "report.html").read_text()
    cell = [r["matrix"][1][0] * 100 for r in runs[:2]]  # naive, split_digits, R[1, 0]
    assert f"{statistics.mean(cell):.1f} ± {statistics.stdev(cell):.1f}</td>" in html


def fragment(runs, out_dir):
    """A renderer for the extension point: it sees only the runs holding its key."""
    total = sum(r["extras"]["probe_x"]["value"] for r in runs)
    return f"probe_x total {total} over {len(runs)}", f"<p>probe_x html {total}</p>"


def test_extra_renderers_are_called_per_section(tmp_path, monkeypatch):
    runs = [fake("naive", 0, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2], extras={"probe_x": {"value": 3}}),
            fake("naive", 1, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2]),
            fake("naive", 0, [[0.9]], [0.1], bench="other", extras={"probe_x": {"value": 4}})]
    write_results(tmp_path / "runs", runs)
    monkeypatch.setitem(report.EXTRA_RENDERERS, "probe_x", f"{__name__}:fragment")
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "probe_x total 3 over 1" in md and "probe_x total 4 over 1" in md
    assert "<p>probe_x html 3</p>" in (tmp_path / "out" / "report.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(mixed, tmp_path):
    """Draw the page in a real browser: its DOM must hold both sections, their tables and the
    images as decoded pictures, and the screenshot must not be blank."""
    root, _ = mixed
    write_report([str(root)], str(tmp_path / "out"))
    page = (tmp_path / "out" / "report.html").resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="cltk-chromium-")
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}"]
    try:
        dom = subprocess.run(common + ["--dump-dom", page], capture_output=True, text=True,
                             timeout=120).stdout
        shot = tmp_path / "report.png"
        subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,2000", page],
                       capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert dom.count("<section>") == 2 and dom.count('class="results"') == 2
    assert dom.count('class="matrix"') == 3 and "n/a [1]" in dom
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2000)
    assert len(set(image.resize((60, 100)).getdata())) > 20, "the screenshot is blank"
    keep = os.environ.get("CLTK_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
