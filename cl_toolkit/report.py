"""``cltk report``: aggregate runs into ``report.md``, a self-contained ``report.html``,
``report.csv`` (one row per run) and ``report.tex`` (one LaTeX table per section).

One section per (benchmark, scenario, number of tasks, score) and stream settings (the
benchmark's config without its seeds and data location, `cl_toolkit.runs.stream_settings`): rows
of different streams (MQAR at 8 pairs in 32 tokens and at 16 in 64) or scores never share a
table, a plot or an axis; sections of one benchmark are titled by the settings that differ. The score is the one the matrix
holds, ``results["metric"]`` (``{"key", "label", "higher_is_better", "percent"}``, accuracy for
results written before it): tables, captions and plots name it, and only a ``percent`` score is
shown x100 with a % sign (an IC of 0.05 stays 0.050). Inside a section runs are grouped by
everything in their config except the seed, so a sweep over seeds (or task orders) becomes one
row, labelled by what tells it apart (the model's name where models differ, the strategy's name,
then the fewest config keys that differ, `cl_toolkit.runs.describe_groups`; a label longer
than `LONG` is shown by its id R1, R2, ... and a legend table maps every row to the settings
that differ between the rows): mean ± sample standard deviation (ddof=1) with n, the number of runs; a one-run row shows
its value alone. Means are over the finished runs of a cell (over its partial runs only when
none finished, marked so). Metrics a run marks as not applicable (``results["metrics"][k] is None``
with the reason in ``results["not_applicable"][k]``) show as ``n/a`` with the reason as a
footnote. A sweep directory's ``sweep_index.json`` adds every run's status and error. Plots
keep their legends outside the axes; a plot with nothing to draw is left out. A results.json
without its config or score matrix, or with malformed extras, is refused before anything is
written (`check_results`; the matrix is never rebuilt from the metrics).

Extension point: renderers, the registry kind ``renderer`` (entry-point group
``cl_toolkit.renderers``, see `cl_toolkit.renderers`), named by the key of ``results["extras"]``
they draw; each section calls ``render(runs, out_dir) -> (markdown, html)`` for every key its
runs hold (in a folder of the section's own when another section holds the key too, so their
files never overwrite each other). An extra score of the task kind (``results["extras"][key] =
{"before", "matrix"}``, described in ``results["extra_metrics"]`` when the run says how to show
it) without a renderer of its own gets a table of its last row.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import registry
from .errors import UsageError
from .renderers import legend_outside
from .runs import (
    ABSENT,
    INDEX,
    describe_groups,
    distinguishing_keys,
    find_results,
    flat_config,
    group_runs,
    read_index,
    show,
    stream_settings,
)
from .store import read_json
from .task_kinds import Metric

COLUMNS = [("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting (max)"),
           ("transient_forgetting", "Transient forgetting"), ("learning_acc", "Learning acc")]
NEXT_TASK = ("next_task", "Next-task")  # shown for scores that ask for it (Metric.next_task)
STATISTIC = "mean ± sample std (ddof=1) over n runs (seeds / task orders); n = 1: the value"
ACCURACY = Metric("accuracy", "accuracy")


def metric_of(r: dict, key: str | None = None) -> Metric:
    """How the run's matrix is scored (``results["metric"]``; accuracy when absent, as in
    results written before scores were named). With ``key``: the extra score
    ``results["extras"][key]`` as ``results["extra_metrics"]`` describes it (shown as it is
    when undescribed)."""
    if key is None:
        node = r.get("metric")
        default = ACCURACY
    else:
        node = next((m for m in r.get("extra_metrics") or [] if m.get("key") == key), None)
        default = Metric(key, key.replace("_", " "), percent=False)
    if not node:
        return default
    name = str(node.get("key", default.key))
    return Metric(name, str(node.get("label", name)), bool(node.get("higher_is_better", True)),
                  bool(node.get("percent", default.percent)), bool(node.get("next_task", False)))


def _scale(metric: Metric) -> tuple[float, int, str]:
    """(factor, digits, unit suffix) a score is shown with: x100 and % for percent scores."""
    return (100.0, 2, " (%)") if metric.percent else (1.0, 3, "")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def columns(metric: Metric) -> list[tuple[str, str]]:
    """(metrics key, header) of the table's score columns, named after the score."""
    cols = COLUMNS[:1] + ([NEXT_TASK] if metric.next_task else []) + COLUMNS[1:]
    if metric.key == ACCURACY.key:
        return cols
    named = {"acc": f"Avg {metric.label}", "learning_acc": f"Learning {metric.label}",
             "next_task": f"Next-task {metric.label}"}
    return [(key, named.get(key, name)) for key, name in cols]


def section_of(r: dict) -> tuple[str, str, int, str, str]:
    """(benchmark, scenario, number of tasks, score key, stream settings) of a run; the stream
    settings (`cl_toolkit.runs.stream_settings`: the benchmark node minus its name, seeds and
    data location) as JSON, so two streams of one benchmark (MQAR at 8 pairs in 32 tokens and
    at 16 in 64) never share a section."""
    stream = r.get("stream") or {}
    bench = r["config"].get("benchmark", {}).get("name") or stream.get("name") or "?"
    scenario = stream.get("scenario") or r["config"].get("benchmark", {}).get("scenario") or "?"
    tasks = len(r.get("before") or []) or len(r.get("matrix") or [])
    settings = json.dumps(stream_settings(r), sort_keys=True, default=str)
    return str(bench), str(scenario), int(tasks), metric_of(r).key, settings


def section_title(key: tuple, metric: Metric = ACCURACY, settings: str = "") -> str:
    """``benchmark · scenario · T tasks[ · score][ · settings]``; ``settings``: the stream
    settings that tell the section apart from another of the same benchmark, scenario, tasks
    and score (`_section_names`)."""
    score = "" if metric.key == ACCURACY.key else f" · {metric.label}"
    return f"{key[0]} · {key[1]} · {key[2]} tasks{score}" + (f" · {settings}" if settings
                                                             else "")


def _section_names(keys) -> dict[tuple, tuple[str, str]]:
    """``{section key: (distinguishing stream settings, file-name slug)}``: sections that share
    benchmark, scenario, tasks and score are told apart by the fewest stream settings that
    differ between them; the slugs are unique."""
    by_base = defaultdict(list)
    for key in keys:
        by_base[key[:4]].append(key)
    out, slugs = {}, set()
    for base, members in sorted(by_base.items()):
        flats = {key: json.loads(key[4]) for key in members}
        shown = distinguishing_keys(list(flats.values())) if len(members) > 1 else []
        for key in sorted(members):
            text = ", ".join(f"{k}={show(flats[key].get(k, ABSENT))}" for k in shown)
            scored = "" if base[3] == ACCURACY.key else f"_{base[3]}"
            slug = _slug(f"{base[0]}_{base[1]}_{base[2]}{scored}" + (f"_{text}" if text else ""))
            stem, n = slug, 2
            while slug in slugs:
                slug, n = f"{stem}_{n}", n + 1
            slugs.add(slug)
            out[key] = (text, slug)
    return out


def _score_note(metric: Metric) -> str:
    """What a section's numbers are, for a score other than accuracy ('' for accuracy)."""
    if metric.key == ACCURACY.key:
        return ""
    better = "higher" if metric.higher_is_better else "lower"
    unit = "in %" if metric.percent else "as it is (not in %)"
    sign = "" if metric.higher_is_better else (" BWT, FWT and forgetting are computed on the "
                                               "negated score, so their signs read as usual.")
    return (f"Score: {metric.label}, {better} is better, shown {unit}. Avg {metric.label} = "
            f"mean over tasks after the last task; Learning {metric.label} = mean of R[j, j]."
            + sign)


def mean_std(values) -> tuple[float, float | None, int] | None:
    """(mean, sample std with ddof=1 or None for one value, n) of the values that exist."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return float(np.mean(vals)), std, len(vals)


def fmt(ms, scale: float = 100.0, digits: int = 2) -> str:
    if ms is None:
        return "n/a"
    mean, std, _ = ms
    if std is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _bad_run(path, problem: str) -> UsageError:
    return UsageError(
        f"{path} cannot be reported: {problem}. cltk run writes every results.json with its "
        "config, score matrix and metrics (the report never rebuilds a matrix from the "
        "metrics), so this one was damaged or written by other code: rerun that run (cltk run "
        "... resume=true continues it) or restore the file, or leave it out by passing the other "
        "run or sweep directories to cltk report.")


def _is_number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_scores(value, where: str) -> str | None:
    """Why ``value`` is not a score matrix ``{"before": [...], "matrix": [[...], ...]}`` (None:
    it is one)."""
    if not isinstance(value, dict):
        return f"{where} is a {type(value).__name__}, not a mapping"
    for name, depth in (("before", 1), ("matrix", 2)):
        rows = value.get(name)
        if not isinstance(rows, list):
            return f"{where} has no {name!r} list" if rows is None else \
                f"{where}[{name!r}] is a {type(rows).__name__}, not a list"
        cells = rows if depth == 1 else []
        if depth == 2:
            for i, row in enumerate(rows):
                if not isinstance(row, list):
                    return f"{where}[{name!r}][{i}] is {row!r}, not a row of scores"
                cells += row
        if not all(_is_number(v) for v in cells):
            bad = next(v for v in cells if not _is_number(v))
            return f"{where}[{name!r}] holds {bad!r}, not a score"
    return None


def check_results(r, path) -> None:
    """Refuse (UsageError, exit 2) a results.json the report cannot read truthfully: no config
    (with the strategy's name), no score matrix (a row per finished task), no metrics, or
    extras that are not a mapping or that the renderer of their key refuses (a renderer may
    carry a ``check(extra)`` function that raises ValueError or TypeError naming what is wrong; built-in
    score extras ``{"before", "matrix"}`` are checked as score matrices)."""
    if not isinstance(r, dict):
        raise _bad_run(path, f"it holds a {type(r).__name__}, not a run's results")
    config = r.get("config")
    if not isinstance(config, dict):
        raise _bad_run(path, "it has no 'config' (the run's settings, which name its rows and "
                             "sections)" if config is None else
                       f"its 'config' is a {type(config).__name__}, not a mapping")
    strategy = config.get("strategy")
    if not isinstance(strategy, dict) or not strategy.get("name"):
        raise _bad_run(path, "its config has no strategy name (config['strategy']['name'])")
    if not isinstance(config.get("benchmark", {}), dict):
        raise _bad_run(path, "its config['benchmark'] is not a mapping")
    if "matrix" not in r:
        raise _bad_run(path, "it has no 'matrix' (the score matrix R[i][j], one row per "
                             "finished task)")
    problem = _check_scores({"before": r.get("before"), "matrix": r["matrix"]}, "results")
    if problem is None and not r["matrix"]:
        problem = "its 'matrix' is empty (no finished task)"
    if problem:
        raise _bad_run(path, problem)
    if not isinstance(r.get("metrics"), dict):
        raise _bad_run(path, "it has no 'metrics' mapping")
    extras = r.get("extras", {})
    if not isinstance(extras, dict):
        raise _bad_run(path, f"its 'extras' is a {type(extras).__name__}, not a mapping of "
                             "extras key to measurements")
    renderers = set(registry.names("renderer"))
    for key, extra in extras.items():
        where = f"extras[{key!r}]"
        check = getattr(registry.resolve("renderer", key), "check", None) \
            if key in renderers else None
        if check is not None:
            try:
                check(extra)
            except (ValueError, TypeError, KeyError) as exc:
                raise _bad_run(path, f"its {where} is malformed ({exc}), so the {key!r} "
                                     "renderer cannot draw it") from None
        elif isinstance(extra, dict) and ("matrix" in extra or "before" in extra):
            problem = _check_scores(extra, where)
            if problem:
                raise _bad_run(path, f"its {problem}")


def load_indexes(paths) -> dict[str, dict]:
    """Index entries of the sweeps under ``paths``, keyed by their run directory."""
    entries = {}
    for p in map(Path, paths):
        indexes = [p / INDEX] if (p / INDEX).is_file() else \
            sorted(p.rglob(INDEX)) if p.is_dir() else []
        for index in indexes:
            for key, entry in read_index(index.parent)["runs"].items():
                run_dir = str(Path(entry.get("dir") or index.parent / key).resolve())
                entries[run_dir] = {**entry, "key": key, "sweep": str(index.parent)}
    return entries


def _run_status(r: dict) -> str:
    if r.get("_sweep_status") == "failed":
        return "failed"
    return "done" if r.get("status") == "done" else "partial"


def _not_applicable(runs: list[dict], key: str) -> str | None:
    """The reason a metric does not apply to these runs , or a generic one when
    it is missing in every run without a reason."""
    reasons = {(r.get("not_applicable") or {}).get(key) for r in runs
               if r["metrics"].get(key) is None}
    reasons.discard(None)
    if reasons:
        return "; ".join(sorted(reasons))
    if all(key not in r["metrics"] for r in runs):
        return ("not in these results: written before cl_toolkit computed it; rerun the runs "
                "to get it")
    if all(r["metrics"].get(key) is None for r in runs):
        return "not defined for these runs (e.g. a stream of one task)"
    return None


def per_task_after_learning(groups: dict[str, list[dict]], metric: Metric = ACCURACY
                            ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the transient-forgetting table: for every row and task j, the mean
    over runs of task j's worst score once it was learned and of its largest drop from an
    earlier peak (`cl_toolkit.metrics.worst_after_learning`, `largest_drop_per_task`); the final
    row of the matrix can hide a task that fell to chance mid-stream and came back, these
    cannot. Empty when no run has more than one task."""
    scale, digits, _ = _scale(metric)
    table = {}
    for label, runs in groups.items():
        worst = [r["metrics"].get("worst_after_learning") or [] for r in runs]
        drop = [r["metrics"].get("largest_drop_per_task") or [] for r in runs]
        k = min(map(len, worst + drop), default=0)
        if k > 1:
            table[label] = [
                f"{fmt(mean_std([w[j] for w in worst]), scale, digits)} / "
                f"{fmt(mean_std([d[j] for d in drop]), scale, digits)}" for j in range(k)]
    if not table:
        return [], []
    tasks = max(map(len, table.values()))
    header = ["Method"] + [f"task {j}" for j in range(tasks)]
    return header, [[label] + cells + [""] * (tasks - len(cells))
                    for label, cells in table.items()]


def summarize(groups: dict[str, list[dict]]) -> list[dict]:
    """One row per group: mean ± std of every scalar metric, memory and training time, then the
    reference rows (`reference_rows`)."""
    rows = []
    for label, all_runs in groups.items():
        status = [_run_status(r) for r in all_runs]
        done = [r for r, s in zip(all_runs, status) if s == "done"]
        runs = done or all_runs  # never average an ACC after 2 tasks with one after 5
        row = {"method": label, "runs": len(all_runs), "done": len(done),
               "partial": status.count("partial"), "failed": status.count("failed"),
               "errors": [r.get("_sweep_error") for r, s in zip(all_runs, status)
                          if s == "failed"],
               "only_partial": not done, "n_a": {}, "group": runs}
        for key, _ in COLUMNS + [NEXT_TASK]:
            row[key] = mean_std([r["metrics"].get(key) for r in runs])
            if row[key] is None:
                reason = _not_applicable(runs, key)
                if reason:
                    row["n_a"][key] = reason
        row["memory_mb"] = mean_std([r["memory_bytes"][-1] / 2**20 if r.get("memory_bytes")
                                     else 0 for r in runs])
        row["train_s"] = mean_std([sum((r.get("timings") or {}).get("train_s") or [])
                                   for r in runs])
        rows.append(row)
    return rows + reference_rows(groups)


def reference_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """Rows for the references strategies report (merging: every fine-tuned model on its own
    task, and the base model theta_0, i.e. the row before any task). ACC of a reference = mean
    over tasks; the other columns do not apply."""
    refs: dict[str, dict] = {}  # label -> {seed: acc}; strategies sharing a seed share them
    for runs in groups.values():
        for r in runs:
            if not r.get("reference") or _run_status(r) != "done":
                continue
            seed = r["config"].get("seed")
            for name, per_task in r["reference"].items():
                refs.setdefault(f"{name} (reference)", {})[seed] = float(
                    np.mean(list(per_task.values())))
            refs.setdefault("base model (reference)", {})[seed] = float(np.mean(r["before"]))
    rows = []
    for label, by_seed in refs.items():
        accs = list(by_seed.values())
        row = {"method": label, "runs": len(accs), "done": len(accs), "partial": 0,
               "failed": 0, "errors": [], "only_partial": False, "memory_mb": None,
               "train_s": None, "group": [],
               "n_a": {k: "a reference model, not a continual run"
                       for k, _ in COLUMNS[1:] + [NEXT_TASK]}}
        row.update({key: None for key, _ in COLUMNS + [NEXT_TASK]})
        row["acc"] = mean_std(accs)
        rows.append(row)
    return rows


def _runs_cell(r: dict) -> str:
    notes = [f"{r[k]} {k}" for k in ("partial", "failed") if r[k]]
    if r["only_partial"] and r["runs"]:
        notes.append("metrics of unfinished runs")
    return f"{r['runs']}" + (f" ({', '.join(notes)})" if notes else "")


def _footnotes(rows: list[dict]) -> tuple[dict, list[str]]:
    """Number each distinct n/a reason once per section."""
    numbers: dict[str, int] = {}
    for r in rows:
        for reason in r["n_a"].values():
            numbers.setdefault(reason, len(numbers) + 1)
    return numbers, [f"[{n}] {reason}" for reason, n in numbers.items()]


def _cells(r: dict, notes: dict, metric: Metric = ACCURACY) -> list[str]:
    scale, digits, _ = _scale(metric)
    cells = [r["method"], _runs_cell(r)]
    for key, _ in columns(metric):
        cells.append(f"n/a [{notes[r['n_a'][key]]}]" if r[key] is None and key in r["n_a"]
                     else fmt(r[key], scale, digits))
    return cells + [fmt(r["memory_mb"], 1.0), fmt(r["train_s"], 1.0, 1)]


def _head(metric: Metric = ACCURACY) -> list[str]:
    return ["Method", "n"] + [name for _, name in columns(metric)] + ["Memory (MiB)",
                                                                      "Train (s, excl. start-up)"]


def _markdown_table(rows: list[dict], notes: dict, metric: Metric = ACCURACY) -> str:
    cols = _head(metric)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, notes, metric)) + " |"
              for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict], notes: dict, metric: Metric = ACCURACY) -> str:
    head_ = "".join(f"<th>{html.escape(h)}</th>" for h in _head(metric))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>"
                                    for c in _cells(r, notes, metric))
                   + "</tr>" for r in rows)
    return f'<table class="results"><tr>{head_}</tr>{body}</table>'


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#",
        "{": r"\{", "}": r"\}", "$": r"\$", "±": r"$\pm$", "·": r"$\cdot$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def _latex_table(title: str, rows: list[dict], notes: dict, lines: list[str],
                 metric: Metric = ACCURACY) -> str:
    """A booktabs table of one section; n/a cells carry their footnote number."""
    def cell(c: str) -> str:
        m = re.fullmatch(r"n/a \[(\d+)\]", c)
        return rf"n/a\textsuperscript{{{m.group(1)}}}" if m else _tex(c)

    units = "Metrics in %." if metric.key == ACCURACY.key else _score_note(metric)
    caption = _tex(f"{title}: {STATISTIC}. {units} " + " ".join(lines))
    cols = _head(metric)
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
           " & ".join(_tex(h) for h in cols) + r" \\", r"\midrule"]
    out += [" & ".join(cell(c) for c in _cells(r, notes, metric)) + r" \\" for r in rows]
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}", ""]
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80] or "x"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figures(groups: dict[str, list[dict]], slug: str,
             metric: Metric = ACCURACY) -> dict[str, bytes]:
    """PNG bytes of a section's plots, keyed by file name; a plot with nothing to draw (a
    running accuracy of one point and no forgetting in a stream of one task, no memory kept)
    is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, _, unit = _scale(metric)
    acc_name = columns(metric)[0][1]
    figs = {}
    curves = {label: [r["metrics"]["running_acc"] for r in runs
                      if r["metrics"].get("running_acc")] for label, runs in groups.items()}
    if any(len(c) > 1 for runs in curves.values() for c in runs):  # a curve, not one point
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, runs in curves.items():
            if not runs:
                continue
            k = min(map(len, runs))
            arr = np.asarray([c[:k] for c in runs], dtype=float) * scale
            x = np.arange(1, k + 1)
            ax.plot(x, arr.mean(0), marker="o", label=label)
            if len(arr) > 1:
                sd = arr.std(0, ddof=1)
                ax.fill_between(x, arr.mean(0) - sd, arr.mean(0) + sd, alpha=0.2)
        ax.set(xlabel="tasks learned", ylabel=f"running {acc_name}{unit}",
               title=f"Running {metric.label} (band: ± sample std)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        legend_outside(ax)
        figs[f"{slug}__running_acc.png"] = _png(fig)

    bars = {}
    for label, runs in groups.items():
        per = [r["metrics"].get("forgetting_per_task") or [] for r in runs]
        k = min(map(len, per), default=0)
        if k:
            bars[label] = np.asarray([p[:k] for p in per], dtype=float) * scale
    if bars:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        width = 0.8 / len(bars)
        for i, (label, arr) in enumerate(bars.items()):
            offset = (i - (len(bars) - 1) / 2) * width
            ax.bar(np.arange(arr.shape[1]) + offset, arr.mean(0), width,
                   yerr=arr.std(0, ddof=1) if len(arr) > 1 else None, label=label)
        ax.set(xlabel="task", ylabel=f"forgetting ({'%' if metric.percent else metric.label}, "
                                     "max-based)",
               title="Forgetting per task (bars: ± sample std)")
        ax.set_xticks(range(max(arr.shape[1] for arr in bars.values())))
        legend_outside(ax)
        figs[f"{slug}__forgetting.png"] = _png(fig)

    points = {label: [(r["memory_bytes"][-1], r["metrics"]["acc"] * scale) for r in runs
                      if r.get("memory_bytes") and r.get("status") == "done"
                      and r["metrics"].get("acc") is not None]
              for label, runs in groups.items()}
    if any(b > 0 for pts in points.values() for b, _ in pts):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, pts in points.items():
            if pts:
                b, a = np.asarray(pts).T
                ax.errorbar(max(b.mean(), 1.0), a.mean(),
                            yerr=a.std(ddof=1) if len(a) > 1 else None, fmt="o", label=label)
        ax.set_xscale("log")
        ax.set(xlabel="memory kept besides the model (bytes; 0 is drawn at 1)",
               ylabel=f"{acc_name}{unit}", title=f"{_capital(metric.label)} against memory")
        legend_outside(ax)
        figs[f"{slug}__acc_vs_memory.png"] = _png(fig)
    return figs


def matrix_stats(runs: list[dict], scale: float = 100.0
                 ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-cell mean and sample std (None for one run) of the score matrices, times ``scale``
    (100: in %)."""
    mats = [np.asarray(r["matrix"], dtype=float) for r in runs if r.get("matrix")]
    k = min(m.shape[0] for m in mats)
    stack = np.stack([m[:k] for m in mats]) * scale
    return stack.mean(0), (stack.std(0, ddof=1) if len(stack) > 1 else None), len(stack)


def _colour_range(mean: np.ndarray, metric: Metric) -> tuple[float, float]:
    """Colour scale limits: 0-100 for percent scores, the values' own range otherwise."""
    if metric.percent:
        return 0.0, 100.0
    lo, hi = float(np.nanmin(mean)), float(np.nanmax(mean))
    return (lo, hi) if hi > lo else (lo - 1.0, hi + 1.0)


def _matrix_png(mean: np.ndarray, title: str, metric: Metric = ACCURACY) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = _colour_range(mean, metric)
    text = "{:.0f}" if metric.percent else "{:.2f}"
    fig, ax = plt.subplots(figsize=(0.5 * mean.shape[1] + 2.5, 0.5 * mean.shape[0] + 1.8))
    im = ax.imshow(mean, vmin=lo, vmax=hi, cmap="viridis")
    if mean.size <= 400:
        for (a, b), v in np.ndenumerate(mean):
            ax.text(b, a, text.format(v), ha="center", va="center", fontsize=7,
                    color="white" if v < lo + 0.6 * (hi - lo) else "black")
    ax.set(xlabel="evaluated on task j", ylabel="after learning task i", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _matrix_html(label: str, runs: list[dict], metric: Metric = ACCURACY) -> str:
    """The mean score matrix as an HTML table, each cell 'mean ± std', shaded by the mean."""
    scale, digits, _ = _scale(metric)
    mean, std, n = matrix_stats(runs, scale)
    lo, hi = _colour_range(mean, metric)
    d = 1 if metric.percent else digits
    head_ = "".join(f"<th>task {j}</th>" for j in range(mean.shape[1]))
    body = []
    for i in range(mean.shape[0]):
        cells = []
        for j in range(mean.shape[1]):
            v = mean[i, j]
            text = f"{v:.{d}f}" if std is None else f"{v:.{d}f} ± {std[i, j]:.{d}f}"
            shade = v if metric.percent else 100 * (v - lo) / (hi - lo)
            light = int(255 - 1.4 * max(min(shade, 100), 0))
            cells.append(f'<td style="background:rgb({light},{max(light, 120)},255)">'
                         f"{text}</td>")
        body.append(f"<tr><th>after task {i}</th>{''.join(cells)}</tr>")
    what = "R[i, j] in %" if metric.key == ACCURACY.key else \
        f"R[i, j] = {metric.label}{' in %' if metric.percent else ''}"
    return (f'<table class="matrix"><caption>{html.escape(label)}: {html.escape(what)}, '
            f"{'mean ± sample std over ' + str(n) + ' runs' if std is not None else 'one run'}"
            f"</caption><tr><th></th>{head_}</tr>{''.join(body)}</table>")


def _is_score_matrix(extra) -> bool:
    return isinstance(extra, dict) and "matrix" in extra and "before" in extra


def render_extra_score(key: str, runs: list[dict]) -> tuple[str, str]:
    """(markdown, html) table of an extra score of the task kind (``results["extras"][key] =
    {"before", "matrix"}``): per group, every task's score after the last task and their mean,
    mean ± sample std over the group's runs."""
    metric = metric_of(next((r for r in runs if r.get("extra_metrics")), runs[0]), key)
    scale, digits, unit = _scale(metric)
    rows, width = [], 0
    for label, group in group_runs(runs).items():
        label = group[0].get("_row") or label
        last = [r["extras"][key]["matrix"][-1] for r in group if r["extras"][key]["matrix"]]
        if not last:
            continue
        k = min(map(len, last))
        width = max(width, k)
        cols = [mean_std([v[j] for v in last]) for j in range(k)]
        rows.append([label, str(len(last)), fmt(mean_std([np.mean(v[:k]) for v in last]),
                                                  scale, digits)]
                    + [fmt(c, scale, digits) for c in cols])
    if not rows:
        return "", ""
    cols = ["run", "n", "mean"] + [f"task {j}" for j in range(width)]
    title = f"{_capital(metric.label)}{unit} per task after the last task"
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r + [""] * (len(cols) - len(r))) + " |" for r in rows]
    head_ = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return (f"### {title}\n\n" + "\n".join(md) + "\n",
            f"<h3>{html.escape(title)}</h3><table><tr>{head_}</tr>{body}</table>")


def _relink(markdown: str, folder: str) -> str:
    """Markdown image links to relative files, moved into ``folder``."""
    return re.sub(r"(!\[[^\]]*\]\()(?![A-Za-z][A-Za-z0-9+.-]*:|/|#)([^)\s]+)\)",
                  lambda m: f"{m.group(1)}{folder}/{m.group(2)})", markdown)


def render_extras(runs: list[dict], out_dir: Path, folder: str | None = None,
                  apart=frozenset()) -> list[tuple[str, str]]:
    """(markdown, html) of every ``results["extras"]`` key a run of this section holds: by the
    renderer registered under the key (registry kind ``renderer``), else, for an extra score of
    the task kind, by `render_extra_score`; other keys are not drawn. The renderers of the keys
    in ``apart`` (keys that other sections hold too, whose files would overwrite each other)
    write into ``out_dir/folder``, and their markdown links are moved there."""
    present = {k for r in runs for k in (r.get("extras") or {})}
    renderers = set(registry.names("renderer"))
    out = []
    for key in sorted(present):
        holding = [r for r in runs if key in (r.get("extras") or {})]
        if key in renderers:
            where = out_dir / folder if folder and key in apart else out_dir
            md, page = registry.resolve("renderer", key)(holding, where)
            out.append((_relink(md, folder) if where != out_dir else md, page))
        elif all(_is_score_matrix(r["extras"][key]) for r in holding):
            out.append(render_extra_score(key, holding))
    return out


def _sweep_lines(entries: dict[str, dict]) -> list[str]:
    """Markdown lines: status counts and every run that is not done (or reused other code's
    results), with its error or note."""
    if not entries:
        return []
    counts = {s: sum(e.get("status") == s for e in entries.values())
              for s in ("done", "running", "pending", "failed")}
    lines = ["## Sweep status", "",
             f"{len(entries)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    open_runs = sorted((e["key"], e) for e in entries.values()
                       if e.get("status") != "done" or e.get("note"))
    if open_runs:
        lines += ["| Run | Status | Error / note |", "|---|---|---|"]
        for key, e in open_runs:
            detail = (e.get("error") or e.get("note") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | {e.get('status')} | {detail} |")
        lines.append("")
    return lines


def _html_sweep(entries: dict[str, dict]) -> str:
    lines = _sweep_lines(entries)
    if not lines:
        return ""
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| Run |")]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>"
                                    for c in ln.strip("|").split(" | ")) + "</tr>" for ln in rows)
    table = (f"<table><tr><th>Run</th><th>Status</th><th>Error / note</th></tr>{body}</table>"
             if rows else "")
    return f"<h2>Sweep status</h2><p>{html.escape(lines[2])}</p>{table}"


def _csv_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per run: section, method, status, every metric (blank where it does not apply,
    with the reason), memory, time, code commit, and every config key whose value varies."""
    flats = [flat_config(r) for r in results]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    named = any(metric_of(r).key != ACCURACY.key for r in results)
    rows = []
    for r, flat in zip(results, flats):
        bench, scenario, tasks, score, _ = section_of(r)
        row = {"benchmark": bench, "scenario": scenario, "tasks": tasks,
               **({"metric": score} if named else {}),
               "strategy": r["config"]["strategy"]["name"], "row": r.get("_row", ""),
               "seed": r["config"].get("seed"),
               "status": _run_status(r), "run_dir": r.get("_dir", "")}
        for key, _ in COLUMNS + [NEXT_TASK]:
            value = r["metrics"].get(key)
            row[key] = "" if value is None else value
            row[f"{key}_na"] = (r.get("not_applicable") or {}).get(key, "") if value is None \
                else ""
        row["memory_bytes"] = r["memory_bytes"][-1] if r.get("memory_bytes") else 0
        row["train_s"] = sum(r.get("timings", {}).get("train_s", []))
        row["git_commit"] = (r.get("code") or {}).get("git_commit") or ""
        row.update({k: json.dumps(flat.get(k)) if isinstance(flat.get(k), (list, dict))
                    else flat.get(k) for k in varying})
        rows.append(row)
    head = list(rows[0]) if rows else []
    return head, rows


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child{text-align:left}caption{text-align:left;font-size:.9em;padding:2px}
table.matrix td{font-size:.85em}img{max-width:48%;margin:.5em 0;vertical-align:top}
table.matrix{display:inline-table;margin-right:1.5em;vertical-align:top}
table.matrix caption,table.legend caption{white-space:nowrap}
table.legend td{text-align:left}table.legend td:last-child{max-width:60em}
section{border-top:2px solid #888;margin-top:2em}p.note{font-size:.9em;color:#444}"""


LONG = 40  # a row label longer than this is shown by its id (R1, R2, ...) and the legend


def load_results(paths) -> tuple[dict, list[Path], list[dict]]:
    """(sweep index entries, results files, checked results) under ``paths``; a results.json
    the report cannot read truthfully is refused (`check_results`) before anything is
    written."""
    entries = load_indexes(paths)
    files = find_results(paths, allow_empty=bool(entries))
    results = []
    for f in files:
        r = read_json(f)
        check_results(r, f)
        entry = entries.get(str(f.parent.resolve()), {})
        r["_sweep_status"], r["_sweep_error"] = entry.get("status"), entry.get("error")
        r["_dir"] = str(f.parent)
        results.append(r)
    return entries, files, results


def row_groups(runs: list[dict]) -> list[dict]:
    """`cl_toolkit.runs.describe_groups` of a section's runs plus ``name``, how its row is
    shown: the label, or the id where the label is longer than `LONG`. Every run gets
    ``r["_row"] = name``, so renderers name the rows as the section's table does."""
    groups = describe_groups(runs)
    for g in groups:
        g["name"] = g["label"] if len(g["label"]) <= LONG else g["id"]
        for r in g["runs"]:
            r["_row"] = g["name"]
    return groups


def _settings_text(g: dict) -> str:
    keys = [k for k, v in g["settings"].items()
            if v != ABSENT and k not in ("model.name", "strategy.name")]
    return ", ".join(f"{k}={g['settings'][k]}" for k in keys)


def _legend(groups: list[dict]) -> tuple[str, str, list[str]]:
    """(markdown, html, LaTeX caption lines) of the table that maps each row (its id) to its
    label and to every config key that differs between the section's rows; empty when the
    section has one row or its labels say it all."""
    texts = [_settings_text(g) for g in groups]
    if all(g["name"] == g["label"] for g in groups) and (len(groups) < 2 or not any(texts)):
        return "", "", []
    head = ["Row", "Label", "n", "Settings that differ between the rows"]
    rows = [[g["id"], g["label"], str(len(g["runs"])), t] for g, t in zip(groups, texts)]
    md = ["Rows (seeds and task orders are repeats of a row):", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    page = ('<table class="legend"><caption>Rows (seeds and task orders are repeats of a row)'
            "</caption><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                      for r in rows) + "</table>")
    tex = [f"{g['id']}: {g['label']}." for g in groups if g["name"] != g["label"]]
    return "\n".join(md), page, tex


def _stream_line(key: tuple) -> str:
    settings = json.loads(key[4])
    return ("Stream settings: " + ", ".join(f"{k}={show(v)}" for k, v in settings.items())
            if settings else "")


def write_report(paths, out: str | None = None) -> list[Path]:
    """Write report.md, report.html, report.csv and report.tex; return their paths."""
    entries, files, results = load_results(paths)
    out_dir = Path(out) if out else (Path(paths[0]) if Path(paths[0]).is_dir()
                                      else Path(paths[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = defaultdict(list)
    for r in results:
        sections[section_of(r)].append(r)
    names = _section_names(sections)
    holders = defaultdict(int)  # extras key -> sections holding it
    for runs in sections.values():
        for k in {k for r in runs for k in (r.get("extras") or {})}:
            holders[k] += 1
    apart = frozenset(k for k, n in holders.items() if n > 1)
    if all(key[3] == ACCURACY.key for key in sections):
        per, units = "(benchmark, scenario, tasks)", "Metrics in %"
    else:
        per = "(benchmark, scenario, tasks, score)"
        units = ("Scores as each section names them (accuracy where it names none); percent "
                 "scores in %, others as they are")
    md = ["# cl_toolkit report", "",
          f"{len(results)} run(s) from {len(files)} results file(s) in {len(sections)} "
          f"section(s), one per {per} and stream settings (the benchmark's config without its "
          f"seeds). {units}; each cell is the "
          f"{STATISTIC}. Forgetting is max-based (Chaudhry et al. 2018): mean over j < T-1 of "
          "max_(j<=l<T-1) R[l, j] - R[T-1, j]; transient forgetting is the mean over j < T-1 "
          "of task j's largest drop after it was learned, max_(j<=m<=l<T) R[m, j] - R[l, j] "
          "(per task below each table, with the lowest score after learning). n/a [k]: the "
          "metric does not apply, for reason [k] below the table.", ""]
    page = [f"<h1>cl_toolkit report</h1><p>{len(results)} run(s) in {len(sections)} section(s). "
            f"{html.escape(units)}; each cell is the {html.escape(STATISTIC)}. Forgetting is "
            "max-based (Chaudhry et al. 2018: max over the rows from the task's own on); "
            "transient forgetting is each task's largest drop after it was learned, averaged "
            "(per task below each table).</p>"]
    tex = ["% cl_toolkit report: \\usepackage{booktabs}", ""]
    for key in sorted(sections, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        metric = metric_of(sections[key][0])
        settings, slug = names[key]
        title = section_title(key, metric, settings)
        described = row_groups(sections[key])
        groups = {g["name"]: g["runs"] for g in described}
        rows = summarize(groups)
        notes, note_lines = _footnotes(rows)
        legend_md, legend_html, legend_tex = _legend(described)
        figs = _figures(groups, slug, metric)
        for g in described:
            if any(r.get("matrix") for r in g["runs"]):
                name = f"{slug}__matrix_{_slug(g['name'])}.png"
                if name in figs:
                    name = f"{slug}__matrix_{g['id']}.png"
                figs[name] = _matrix_png(matrix_stats(g["runs"], _scale(metric)[0])[0],
                                         g["name"], metric)
        for name, data in figs.items():
            (out_dir / name).write_bytes(data)
        extras = render_extras(sections[key], out_dir, slug, apart)
        note = _score_note(metric)
        stream = _stream_line(key)

        md += [f"## {title}", ""] + ([stream, ""] if stream else []) + \
            ([note, ""] if note else [])
        md += [_markdown_table(rows, notes, metric), ""]
        md += [f"{line}  " for line in note_lines] + ([""] if note_lines else [])
        md += [legend_md, ""] if legend_md else []
        drop_head, drop_rows = per_task_after_learning(groups, metric)
        drop_title = (f"Per task after it was learned: lowest {metric.label} / largest drop "
                      f"from an earlier peak (transient forgetting; {STATISTIC})")
        if drop_rows:
            md += [drop_title + ":", "", "| " + " | ".join(drop_head) + " |",
                   "|" + "---|" * len(drop_head)]
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                   for r in drop_rows] + [""]
        md += [f"![{name.split('__', 1)[1][:-4]}]({name})" for name in figs] + [""]
        md += [m for m, _ in extras]
        imgs = "".join(
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">' for name, data in figs.items()
            if "__matrix_" not in name)
        matrices = "".join(_matrix_html(g["name"], g["runs"], metric) for g in described
                           if any(r.get("matrix") for r in g["runs"]))
        notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in note_lines)
        score_html = f"<p>{html.escape(note)}</p>" if note else ""
        stream_html = f'<p class="note">{html.escape(stream)}</p>' if stream else ""
        drops_html = "" if not drop_rows else (
            f'<table class="drops"><caption>{html.escape(drop_title)}</caption><tr>'
            + "".join(f"<th>{html.escape(h)}</th>" for h in drop_head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                      for r in drop_rows) + "</table>")
        page.append(f"<section><h2>{html.escape(title)}</h2>{stream_html}{score_html}"
                    f"{_html_table(rows, notes, metric)}{notes_html}{legend_html}{drops_html}"
                    f"{imgs}"
                    f"<h3>{html.escape(_capital(metric.label))} matrices</h3>{matrices}"
                    f"{''.join(h for _, h in extras)}</section>")
        tex.append(_latex_table(title, rows, notes, note_lines + legend_tex, metric))
    md += _sweep_lines(entries)
    page.append(_html_sweep(entries))

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    csv_path, tex_path = out_dir / "report.csv", out_dir / "report.tex"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>cl_toolkit '
                         f"report</title><style>{CSS}</style></head><body>{''.join(page)}"
                         "</body></html>\n")
    head, rows = _csv_rows(results)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=head)
        writer.writeheader()
        writer.writerows(rows)
    tex_path.write_text("\n".join(tex) + "\n")
    return [md_path, html_path, csv_path, tex_path]
