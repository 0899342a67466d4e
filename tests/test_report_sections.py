"""Report sections and rows on hand-made results (issue 22, items 2 and 6): a section is one set
of stream settings, token-stream tables take the union of probe points (no value under another
point's header), rows are labelled by what tells them apart, long labels go to a legend table,
legends stay outside the axes and plots with nothing to draw are left out."""
import csv
import json
import re
from pathlib import Path

import pytest

from cl_toolkit import report
from cl_toolkit.metrics import summary
from cl_toolkit.renderers.tokens import render_kv_interference, render_mqar
from cl_toolkit.report import write_report
from cl_toolkit.runs import describe_groups, distinguishing_keys, stream_settings

MQAR_CPU = {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_pairs": [2, 4, 8],
            "split": "mixture", "train_size": 28800, "probe_pairs": [2, 4, 6, 8],
            "scenario": "domain-il"}
MQAR_LONG = {**MQAR_CPU, "vocab_size": 128, "seq_len": 64, "num_pairs": [4, 8, 16],
             "train_size": 57600, "probe_pairs": [4, 8, 12, 16]}
MODELS = {"mom_lm": {"hidden_size": 64, "num_memories": 4, "topk": 2, "mlp_ratio": 2.0,
                     "aux_loss_weight": 0.01, "memory_type": "gated_delta"},
          "gdn_lm": {"hidden_size": 64, "mlp_ratio": 4.9375}}


def mqar_run(model, seed, bench, accuracy, strategy=None, matrix=None):
    """A results.json of one MQAR run: one task, the accuracy at the benchmark's probe_pairs."""
    matrix = matrix or [[sum(accuracy) / len(accuracy)]]
    before = [0.0] * len(matrix[0])
    return {"status": "done",
            "config": {"seed": seed, "benchmark": dict(bench),
                       "model": {"name": model, **MODELS[model]},
                       "strategy": {"name": "naive", "epochs": 1, "batch_size": 32,
                                    **(strategy or {})}},
            "stream": {"name": "mqar", "scenario": "domain-il"},
            "matrix": matrix, "before": before, "metrics": summary(matrix, before),
            "memory_bytes": [0] * len(matrix), "timings": {"train_s": [1.0] * len(matrix)},
            "extras": {"mqar": {"after_task": 0, "num_pairs": list(bench["probe_pairs"]),
                                "accuracy": list(accuracy)}}}


def write(root: Path, runs: list[dict]) -> Path:
    for i, r in enumerate(runs):
        (root / f"run{i}").mkdir(parents=True)
        (root / f"run{i}" / "results.json").write_text(json.dumps(r))
    return root


def table(md: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {first cell: cells}) of the markdown table right after ``title``."""
    lines = md[md.index(title):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split(" | ")])
    return rows[0], {r[0]: r for r in rows[2:]}


def two_presets():
    """The README's mqar_cpu and mqar_cpu_long sweeps over two models, two seeds each."""
    runs = []
    for seed in (0, 1):
        runs.append(mqar_run("mom_lm", seed, MQAR_CPU, [1.0, 0.9, 0.8, 0.7]))
        runs.append(mqar_run("gdn_lm", seed, MQAR_CPU, [1.0, 0.8, 0.6, 0.4]))
        runs.append(mqar_run("mom_lm", seed, MQAR_LONG, [0.5, 0.4, 0.3, 0.2]))
        runs.append(mqar_run("gdn_lm", seed, MQAR_LONG, [0.6, 0.5, 0.35, 0.1]))
    return runs


def test_two_presets_are_two_sections_each_with_its_own_probe_points(tmp_path):
    write(tmp_path / "runs", two_presets())
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    titles = re.findall(r"^## (.*)$", md, flags=re.MULTILINE)
    assert titles == ["mqar · domain-il · 1 tasks · num_pairs=[2, 4, 8]",
                      "mqar · domain-il · 1 tasks · num_pairs=[4, 8, 16]"]
    short, long_ = md.split("## mqar · domain-il · 1 tasks · num_pairs=[4, 8, 16]")
    head, rows = table(short, "### Associative recall")
    assert head == ["run", "n", "2 pairs", "4 pairs", "6 pairs", "8 pairs"]
    assert rows["mom_lm"] == ["mom_lm", "2", "100.0 ± 0.0", "90.0 ± 0.0", "80.0 ± 0.0",
                              "70.0 ± 0.0"]
    head, rows = table(long_, "### Associative recall")
    assert head == ["run", "n", "4 pairs", "8 pairs", "12 pairs", "16 pairs"]
    assert rows["gdn_lm"][2:] == ["60.0 ± 0.0", "50.0 ± 0.0", "35.0 ± 0.0", "10.0 ± 0.0"]
    assert "Stream settings: " in long_ and "probe_pairs=[4, 8, 12, 16]" in long_
    # Each section's figures, the renderer's too, in files of their own.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(set(links)) and all((tmp_path / "out" / f).exists() for f in links)
    assert sum("mqar_accuracy.png" in f for f in links) == 2
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<section>") == 2


def test_mqar_table_header_is_the_union_of_probe_points_with_blanks(tmp_path):
    """The renderer alone, on runs of two probe sets: no value under another point's header."""
    md, _ = render_mqar([mqar_run("mom_lm", 0, MQAR_CPU, [1.0, 0.9, 0.8, 0.7]),
                         mqar_run("gdn_lm", 0, MQAR_LONG, [0.5, 0.4, 0.3, 0.2])], tmp_path)
    head, rows = table(md, "### Associative recall")
    assert head == ["run", "n"] + [f"{p} pairs" for p in (2, 4, 6, 8, 12, 16)]
    assert rows["mom_lm"][2:] == ["100.0", "90.0", "80.0", "70.0", "", ""]
    assert rows["gdn_lm"][2:] == ["", "50.0", "", "40.0", "30.0", "20.0"]


def kv_extra(updates, acc_u, keys, acc_k, num_keys=2, trained=(1, 2, 4), total=32):
    n = len(updates)
    return {"num_keys": num_keys, "train_updates": list(trained), "split": "mixture",
            "updates": list(updates), "keys": list(keys), "total_updates": total,
            "by_updates": {"accuracy": list(acc_u), "stale": [1 - a for a in acc_u],
                           "other_key": [0.0] * n, "no_value": [0.0] * n,
                           "stale_by_update": [[0.0] for _ in updates]},
            "by_keys": {"accuracy": list(acc_k)}, "auc_log_updates": 0.5}


def kv_run(model, extra):
    return {"config": {"seed": 0, "model": {"name": model}, "strategy": {"name": "naive"},
                       "benchmark": {"name": "kv_interference"}},
            "extras": {"kv_interference": extra}}


def test_kv_interference_tables_take_the_union_of_u_and_k_and_show_each_rows_k(tmp_path):
    runs = [kv_run("gdn_lm", kv_extra([1, 2, 4], [1.0, 0.9, 0.8], [2, 4], [0.9, 0.7])),
            kv_run("gla_lm", kv_extra([2, 8], [0.6, 0.3], [4, 8], [0.5, 0.2], num_keys=8,
                                      trained=(1, 2), total=64))]
    md, _ = render_kv_interference(runs, tmp_path)
    head, rows = table(md, "### Proactive interference")
    assert "K as in each row" in md
    assert head == ["run", "n", "K", "trained on U", "AUC log U", "U=1", "U=2", "U=4", "U=8"]
    assert rows["gdn_lm"][2:4] == ["2", "[1, 2, 4]"]
    assert rows["gdn_lm"][5:] == ["100.0", "90.0", "80.0", ""]
    assert rows["gla_lm"][2] == "8" and rows["gla_lm"][5:] == ["", "60.0", "", "30.0"]
    head, rows = table(md, "### Accuracy (%) against the number of keys K")
    assert head == ["run", "n", "K x U", "K=2", "K=4", "K=8"]
    assert rows["gdn_lm"][2:] == ["32", "90.0", "70.0", ""]
    assert rows["gla_lm"][2:] == ["64", "", "50.0", "20.0"]
    head, rows = table(md, "### Errors at each row's largest U")
    assert rows["gdn_lm"][1:3] == ["4", "20.0"] and rows["gla_lm"][1:3] == ["8", "70.0"]
    assert (tmp_path / "kv_interference.png").stat().st_size > 1000


def test_sections_are_keyed_by_stream_settings_without_seeds_or_data_location():
    a = {"config": {"benchmark": {"name": "split_digits", "n_tasks": 5, "class_order_seed": 1,
                                  "root": "/a", "download": True}}}
    b = {"config": {"benchmark": {"name": "split_digits", "n_tasks": 5, "class_order_seed": 2,
                                  "root": "/b", "download": False}}}
    assert stream_settings(a) == stream_settings(b) == {"n_tasks": 5}
    assert stream_settings({"config": {}}) == {}


def sweep_flat(model, **extra):
    return {"model.name": model, "strategy.name": "naive", **extra}


def test_distinguishing_keys_are_the_fewest_that_tell_rows_apart():
    flats = [sweep_flat("m", **{"strategy.lr": lr, "strategy.epochs": ep, "model.hidden": 8})
             for lr in (0.1, 0.01) for ep in (1, 2)]
    assert distinguishing_keys(flats) == ["strategy.epochs", "strategy.lr"]
    same_lr = [sweep_flat("m", **{"strategy.lr": 0.1, "model.hidden": h, "model.heads": h // 8})
               for h in (8, 16)]
    assert distinguishing_keys(same_lr) == ["model.heads"]  # one key is enough


def model_sweep():
    """A model x learning-rate sweep with the models' own keys (the 300-character labels)."""
    runs = []
    for m, model in enumerate(("mom_lm", "gdn_lm")):
        for i, lr in enumerate((0.003, 0.01)):
            for seed in (0, 1):
                drop = 0.05 * (m + 2 * i) + 0.02 * seed
                runs.append(mqar_run(model, seed, MQAR_CPU,
                                     [round(a - drop * j, 3) for j, a in enumerate([1.0] * 4)],
                                     strategy={"lr": lr}))
    return runs


def test_model_sweep_rows_are_labelled_by_model_strategy_and_the_keys_that_differ():
    groups = describe_groups(model_sweep())
    labels = [g["label"] for g in groups]
    assert labels == ["gdn_lm · naive (lr=0.003)", "gdn_lm · naive (lr=0.01)",
                      "mom_lm · naive (lr=0.003)", "mom_lm · naive (lr=0.01)"]
    assert [g["id"] for g in groups] == ["R1", "R2", "R3", "R4"]
    assert groups[2]["settings"]["model.num_memories"] == "4"
    assert groups[0]["settings"]["model.num_memories"] == "—"  # gdn_lm has no such key
    assert all(len(g["runs"]) == 2 for g in groups)


def test_long_labels_become_ids_with_a_legend_table_and_short_captions(tmp_path):
    runs = [mqar_run("gdn_lm", 0, MQAR_CPU, [0.9, 0.8, 0.7, 0.6], strategy={"optimizer": opt})
            for opt in ("adamw_with_a_very_long_optimizer_name", "sgd_with_momentum_too")]
    runs.append(mqar_run("mom_lm", 0, MQAR_CPU, [0.9, 0.8, 0.7, 0.6]))
    write(tmp_path / "runs", runs)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    head, rows = table(md, "| Method |")
    assert set(rows) == {"R1", "R2", "mom_lm · naive"}
    head, legend = table(md, "Rows (seeds and task orders are repeats of a row)")
    assert head == ["Row", "Label", "n", "Settings that differ between the rows"]
    assert legend["R1"][1] == "gdn_lm · naive (optimizer=adamw_with_a_very_long_optimizer_name)"
    assert "strategy.optimizer=sgd_with_momentum_too" in legend["R2"][3]
    assert "model.num_memories=4" in legend["R3"][3] and legend["R3"][1] == "mom_lm · naive"
    page = (tmp_path / "out" / "report.html").read_text()
    captions = re.findall(r'<table class="matrix"><caption>(.*?)</caption>', page)
    assert len(captions) == 3 and all(len(c) < 80 for c in captions)
    assert "| R1 | 1 |" in md.split("### Associative recall")[1]  # the renderer's rows too
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert "R1: gdn\\_lm $\\cdot$ naive (optimizer=adamw" in tex


def test_every_label_is_short_for_the_readme_model_sweep(tmp_path):
    write(tmp_path / "runs", model_sweep())
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    _, rows = table(md, "| Method |")
    assert list(rows) == ["gdn_lm · naive (lr=0.003)", "gdn_lm · naive (lr=0.01)",
                          "mom_lm · naive (lr=0.003)", "mom_lm · naive (lr=0.01)"]
    # the matrices, one file each (long labels used to collide once cut to 80 characters)
    assert len(list((tmp_path / "out").glob("*__matrix_*.png"))) == 4
    with open(tmp_path / "out" / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted({r["row"] for r in csv_rows}) == list(rows) and len(csv_rows) == 8


def capture_figures(monkeypatch):
    shown = {}

    def keep(fig):
        shown[len(shown)] = fig
        return b"png"

    monkeypatch.setattr(report, "_png", keep)
    return shown


def test_legends_are_outside_the_axes(monkeypatch):
    groups = {f"R{i}": [mqar_run("gdn_lm", 0, MQAR_CPU, [0.5] * 4,
                                 matrix=[[0.9, 0.1, 0.1], [0.5, 0.8, 0.1], [0.4, 0.6, 0.9]])]
              for i in range(6)}
    shown = capture_figures(monkeypatch)
    report._figures(groups, "s")
    assert len(shown) == 2  # running accuracy and forgetting; no memory kept: no such plot
    for fig in shown.values():
        fig.canvas.draw()
        ax, legend = fig.axes[0], fig.axes[0].get_legend()
        renderer = fig.canvas.get_renderer()
        assert legend is not None
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_a_one_task_stream_draws_no_forgetting_or_one_point_running_accuracy(tmp_path):
    write(tmp_path / "runs", [mqar_run("gdn_lm", s, MQAR_CPU, [0.5] * 4) for s in (0, 1)])
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*forgetting*"))
    assert not list((tmp_path / "out").glob("*running_acc*"))
    assert "forgetting" not in (tmp_path / "out" / "report.md").read_text().split("|")[-1]
    assert list((tmp_path / "out").glob("*__matrix_*.png"))  # the matrix is still drawn


@pytest.mark.parametrize("damage,words", [
    (lambda r: r.pop("matrix"), ["no 'matrix'"]),
    (lambda r: r.pop("config"), ["no 'config'"]),
    (lambda r: r.update(extras=[1, 2]), ["'extras' is a list"]),
    (lambda r: r["extras"]["mqar"].pop("num_pairs"), ["extras['mqar'] is malformed",
                                                     "no 'num_pairs' list"]),
    (lambda r: r.update(extras={"exact_match": {"before": [0.1], "matrix": [0.5]}}),
     ["extras['exact_match'] is malformed", "matrix row 0"]),
    (lambda r: r.update(extras={"rank_ic": {"before": [0.1], "matrix": "x"}}),
     ["extras['rank_ic']['matrix'] is a str"]),
    (lambda r: r.update(extras={"retention": {"before": [], "points": [{"k": 1}]}}),
     ["extras['retention'] is malformed", "points[0] lacks"]),
    (lambda r: r.update(matrix=[[0.5, "high"]]), ["holds 'high'"]),
])
def test_damaged_results_are_refused_before_anything_is_written(tmp_path, damage, words):
    r = mqar_run("gdn_lm", 0, MQAR_CPU, [0.5] * 4)
    damage(r)
    write(tmp_path / "runs", [mqar_run("gdn_lm", 1, MQAR_CPU, [0.5] * 4), r])
    with pytest.raises(report.UsageError) as info:
        write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    message = str(info.value)
    assert "run1" in message and "leave it out" in message
    for word in words:
        assert word in message
    assert not (tmp_path / "out").exists()
