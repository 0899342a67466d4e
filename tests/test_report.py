"""The report on hand-made results: sample std (ddof=1) against the statistics module, one
section per (benchmark, scenario), n/a with its reason, CSV / LaTeX exports, per-cell matrix
statistics, renderers from the registry (built-in table and entry-point plugins), scores other
than accuracy (IC, Dice) named and scaled as the run says, and the HTML as a real browser draws
it."""
import csv
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import pytest

from importlib.metadata import EntryPoint

from cl_toolkit import registry, report
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


def test_renderers_from_the_registry_are_called_per_section(tmp_path, monkeypatch):
    runs = [fake("naive", 0, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2], extras={"probe_x": {"value": 3}}),
            fake("naive", 1, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2]),
            fake("naive", 0, [[0.9]], [0.1], bench="other", extras={"probe_x": {"value": 4}})]
    write_results(tmp_path / "runs", runs)
    monkeypatch.setitem(registry.BUILTINS["renderer"], "probe_x", f"{__name__}:fragment")
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "probe_x total 3 over 1" in md and "probe_x total 4 over 1" in md
    assert "<p>probe_x html 3</p>" in (tmp_path / "out" / "report.html").read_text()


def test_a_renderer_plugin_comes_from_its_entry_point_group(tmp_path, monkeypatch):
    plugin = EntryPoint(name="probe_x", value=f"{__name__}:fragment",
                        group="cl_toolkit.renderers")
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin] if
                        group == "cl_toolkit.renderers" else real(group=group))
    assert "probe_x" in registry.names("renderer") and registry.resolve("renderer", "probe_x") \
        is fragment
    write_results(tmp_path / "runs", [fake("naive", 0, [[0.9]], [0.1],
                                           extras={"probe_x": {"value": 5}})])
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    assert "probe_x total 5 over 1" in (tmp_path / "out" / "report.md").read_text()


def scored(metric, seed, matrix, before, extras=None, bench="market"):
    """A run whose matrix holds ``metric`` (results["metric"] as the runner writes it)."""
    r = fake("naive", seed, matrix, before, bench=bench, scenario="domain-il")
    r["metric"] = metric
    if extras:
        r["extras"] = extras
    return r


IC = {"key": "ic", "label": "IC", "higher_is_better": True, "percent": False}
DICE = {"key": "dice", "label": "Dice", "higher_is_better": True, "percent": True}


def test_ic_is_shown_as_it_is_and_named_everywhere(tmp_path):
    runs = [scored(IC, 0, [[0.05, 0.01], [0.03, 0.06]], [0.0, 0.01],
                   {"rank_ic": {"before": [0.0, 0.0], "matrix": [[0.04, 0.0], [0.02, 0.05]]}}),
            scored(IC, 1, [[0.07, 0.02], [0.05, 0.04]], [0.01, 0.0],
                   {"rank_ic": {"before": [0.0, 0.0], "matrix": [[0.06, 0.0], [0.04, 0.07]]}})]
    runs[0]["extra_metrics"] = [{"key": "rank_ic", "label": "rank IC", "percent": False}]
    write_results(tmp_path / "runs", runs)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "## market · domain-il · 2 tasks · IC" in md
    assert "| Method | n | Avg IC | BWT | FWT | Forgetting (max) | Transient forgetting | Learning IC |" in md
    acc = [statistics.mean(r["matrix"][-1]) for r in runs]  # 0.045, 0.045
    assert f"| naive | 2 | {statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} |" in md
    assert "Score: IC, higher is better, shown as it is (not in %)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table and not any("%" in line or "4.50" in line for line in table)
    # the extra score of the kind: its last row, mean over runs, as it is
    assert "### Rank IC per task after the last task" in md
    assert "| naive | 2 | 0.045 ± 0.014 | 0.030 ± 0.014 | 0.060 ± 0.014 |" in md
    page = (out / "report.html").read_text()
    assert "<h3>IC matrices</h3>" in page and "R[i, j] = IC, mean ± sample std over 2" in page
    assert "0.040 ± 0.014</td>" in page  # R[1, 0]: 0.03 and 0.05
    section = page[page.index("<section>"):]
    assert "Accuracy" not in section and "accuracy" not in section
    tex = (out / "report.tex").read_text()
    assert "Avg IC" in tex and r"Metrics in \%" not in tex
    with open(out / "report.csv") as f:
        row = next(csv.DictReader(f))
    assert row["metric"] == "ic" and float(row["acc"]) == pytest.approx(0.045)
    assert (out / "market_domain-il_2_ic__running_acc.png").exists()


def test_dice_is_in_percent_and_never_shares_a_section_with_accuracy(tmp_path):
    runs = [scored(DICE, 0, [[0.8, 0.2], [0.7, 0.9]], [0.1, 0.1], bench="echo"),
            fake("naive", 0, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2], bench="echo",
                 scenario="domain-il")]
    write_results(tmp_path / "runs", runs)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    cut = md.index("## echo · domain-il · 2 tasks · Dice")
    dice, accuracy = md[cut:], md[md.index("## echo · domain-il · 2 tasks\n"):cut]
    assert "| Method | n | Avg Dice | BWT | FWT | Forgetting (max) | Transient forgetting | Learning Dice |" in dice
    assert "| naive | 1 | 80.00 |" in dice and "shown in %" in dice
    assert "| Method | n | ACC | BWT |" in accuracy and "| naive | 1 | 65.00 |" in accuracy
    assert "one per (benchmark, scenario, tasks, score)" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h3>Dice matrices</h3>" in page and "<h3>Accuracy matrices</h3>" in page
    assert "R[i, j] = Dice in %" in page


def test_results_without_a_metric_are_accuracy():
    assert report.metric_of({}) == report.metric_of({"metric": {
        "key": "accuracy", "label": "accuracy", "higher_is_better": True, "percent": True}})
    assert report.metric_of({"metric": IC}).percent is False


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def draw_in_chromium(page_file: Path, shot: Path, size: tuple[int, int]) -> str:
    """The page's DOM after a headless Chromium loaded it, and its screenshot at ``size``."""
    page = page_file.resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="cltk-chromium-")
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", f"--user-data-dir={profile}"]
    try:
        dom = subprocess.run(common + ["--dump-dom", page], capture_output=True, text=True,
                             timeout=120, check=False).stdout
        subprocess.run(common + [f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}",
                                 page], capture_output=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return dom


def assert_drawn(shot: Path, size: tuple[int, int], keep_env: str) -> None:
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == size
    assert len(set(image.resize((60, 100)).getdata())) > 20, "the screenshot is blank"
    keep = os.environ.get(keep_env)
    if keep:
        shutil.copy(shot, keep)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(mixed, tmp_path):
    """Draw the page in a real browser: its DOM must hold both sections, their tables and the
    images as decoded pictures, and the screenshot must not be blank."""
    root, _ = mixed
    write_report([str(root)], str(tmp_path / "out"))
    shot = tmp_path / "report.png"
    dom = draw_in_chromium(tmp_path / "out" / "report.html", shot, (1200, 2000))
    assert dom.count("<section>") == 2 and dom.count('class="results"') == 2
    assert dom.count('class="matrix"') == 3 and "n/a [1]" in dom
    assert_drawn(shot, (1200, 2000), "CLTK_KEEP_SCREENSHOT")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_token_stream_report_renders_in_headless_chromium(tmp_path):
    """A model sweep over the README's two MQAR presets plus a proactive-interference run, as
    a browser draws it: a section per preset with its own probe points, short row labels, the
    legend table, the renderers' tables and pictures (CLTK_KEEP_TOKEN_SCREENSHOT=FILE keeps
    the screenshot)."""
    from test_report_sections import MQAR_LONG, kv_extra, model_sweep, mqar_run, write

    runs = model_sweep() + [mqar_run(m, s, MQAR_LONG, acc) for s in (0, 1)
                            for m, acc in (("mom_lm", [0.9, 0.7, 0.5, 0.3]),
                                           ("gdn_lm", [0.8, 0.5, 0.3, 0.1]))]
    for model, acc in (("gdn_lm", [1.0, 0.95, 0.9, 0.7]), ("mom_lm", [1.0, 0.9, 0.8, 0.75])):
        r = mqar_run(model, 0, MQAR_LONG, [0.5] * 4)
        r["config"]["benchmark"] = {"name": "kv_interference", "num_keys": 2}
        r["stream"]["name"] = "kv_interference"
        r["extras"] = {"kv_interference": kv_extra([1, 2, 4, 8], acc, [2, 4], acc[:2])}
        runs.append(r)
    write(tmp_path / "runs", runs)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    shot, size = tmp_path / "tokens.png", (1400, 4200)
    dom = draw_in_chromium(tmp_path / "out" / "report.html", shot, size)
    assert dom.count("<section>") == 3 and dom.count('class="results"') == 3
    assert dom.count('class="legend"') == 3 and "gdn_lm · naive (lr=0.003)" in dom
    assert "<th>12 pairs</th>" in dom and "<th>6 pairs</th>" in dom and "<th>U=8</th>" in dom
    assert dom.count('alt="mqar_accuracy.png"') == 2 and 'alt="kv_interference.png"' in dom
    assert_drawn(shot, size, "CLTK_KEEP_TOKEN_SCREENSHOT")


def test_transient_forgetting_shows_a_task_that_fell_to_chance_and_came_back(tmp_path):
    """Task 0 falls from 1.0 to 0.5 after task 2 and is back at 0.9 at the end: final-row
    forgetting says 0.1, the report must also show the fall (hand-computed: largest drop of
    task 0 = 0.5, of task 1 = 0.2, of task 2 = 0.05; transient forgetting = their mean)."""
    R = [[1.0, 0.0, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0.5, 0.8, 1.0, 0.0],
         [0.9, 0.9, 0.95, 1.0]]
    write_results(tmp_path / "runs", [fake("naive", 0, R, [0.0] * 4)])
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| Method | n |"))
    row = next(line for line in md.splitlines() if line.startswith("| naive | 1 |"))
    cells = dict(zip(head.split(" | "), row.split(" | ")))
    assert cells["Forgetting (max)"] == "8.33"  # mean(0.1, 0.1, 0.05): only the final row
    assert cells["Transient forgetting"] == "25.00"  # mean(0.5, 0.2, 0.05)
    per_task = md.split("largest drop from an earlier peak")[1]
    assert "| naive | 50.00 / 50.00 | 80.00 / 20.00 | 95.00 / 5.00 | 100.00 / 0.00 |" in per_task
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Transient forgetting" in page and "50.00 / 50.00" in page
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert abs(float(rows[0]["transient_forgetting"]) - 0.75 / 3) < 1e-9


def test_results_written_before_transient_forgetting_say_so():
    r = fake("naive", 0, [[0.9, 0.1], [0.5, 0.8]], [0.1, 0.2])
    del r["metrics"]["transient_forgetting"]
    row = summarize({"naive": [r]})[0]
    assert row["transient_forgetting"] is None
    assert "written before" in row["n_a"]["transient_forgetting"]


def test_next_task_score_is_a_column_where_the_score_asks_for_it(tmp_path):
    """The IC as the runner describes it (Metric.next_task) gets a "Next-task IC" column:
    mean_{j>0} R[j-1, j], hand-computed: seed 0 (0.01 + 0.02) / 2, seed 1 (0.03 + 0.01) / 2."""
    from cl_toolkit.task_kinds import CrossSection

    ic = CrossSection.metric.describe()
    runs = [scored(ic, 0, [[0.05, 0.01, 0.0], [0.03, 0.06, 0.02], [0.0, 0.0, 0.04]], [0.0] * 3),
            scored(ic, 1, [[0.05, 0.03, 0.0], [0.03, 0.06, 0.01], [0.0, 0.0, 0.04]], [0.0] * 3)]
    write_results(tmp_path / "runs", runs)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| Method | n |"))
    row = next(line for line in md.splitlines() if line.startswith("| naive | 2 |"))
    cells = dict(zip(head.split(" | "), row.split(" | ")))
    assert cells["Next-task IC"] == "0.018 ± 0.004"  # mean(0.015, 0.02), sample std 0.0035
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert sorted(round(float(r["next_task"]), 6) for r in rows) == [0.015, 0.02]
    assert "Next-task IC" in (tmp_path / "out" / "report.tex").read_text()
