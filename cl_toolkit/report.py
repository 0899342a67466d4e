"""``cltk report``: aggregate runs into ``report.md``, a self-contained ``report.html``,
``report.csv`` (one row per run) and ``report.tex`` (one LaTeX table per section).

One section per (benchmark, scenario, number of tasks): rows of different benchmarks or
scenarios never share a table, a plot or an axis. Inside a section runs are grouped by everything
in their config except the seed, so a sweep over seeds (or task orders) becomes one row: mean ±
sample standard deviation (ddof=1) with n, the number of runs; a one-run row shows its value
alone. Means are over the finished runs of a cell (over its partial runs only when none
finished, marked so). Metrics a run marks as not applicable (``results["metrics"][k] is None``
with the reason in ``results["not_applicable"][k]``) show as ``n/a`` with the reason as a
footnote. A sweep directory's ``sweep_index.json`` adds every run's status and error.

Extension point: ``EXTRA_RENDERERS`` maps a key of ``results["extras"]`` to ``"module:function"``;
each section calls ``function(runs, out_dir) -> (markdown, html)`` for every key its runs hold.
"""
from __future__ import annotations

import base64
import csv
import html
import importlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UsageError
from .store import RESULTS, read_json

COLUMNS = [("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting (max)"),
           ("learning_acc", "Learning acc")]
GROUP_EXCLUDE = {"seed", "resume", "overwrite", "quiet", "output_root", "tensorboard", "threads",
                 "mlflow", "mlflow_uri", "csv", "wandb", "wandb_project", "wandb_mode",
                 "log_every"}
STATISTIC = "mean ± sample std (ddof=1) over n runs (seeds / task orders); n = 1: the value"
# results["extras"] key -> "module:function(runs, out_dir) -> (markdown, html)".
EXTRA_RENDERERS: dict[str, str] = {
    "exact_match": "cl_toolkit.token_report:render_exact_match",
    "mqar": "cl_toolkit.token_report:render_mqar",
    "kv_interference": "cl_toolkit.token_report:render_kv_interference",
    "retention": "cl_toolkit.retention:render",
}


def find_results(paths, allow_empty: bool = False) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RESULTS)))
        else:
            raise UsageError(f"{p} does not exist; pass run or sweep directories (searched "
                             "recursively) or results.json files, e.g. cltk report runs/multirun.")
    if not found and not allow_empty:
        raise UsageError(f"No {RESULTS} under {', '.join(map(str, paths))}: no run has finished a "
                         "task there yet. Start one with cltk run, or pass the directory that "
                         "holds the runs.")
    return found


def flatten_config(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"a.b": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flat(r: dict) -> dict:
    return {k: v for k, v in flatten_config(r["config"]).items()
            if k.split(".")[0] not in GROUP_EXCLUDE}


def section_of(r: dict) -> tuple[str, str, int]:
    """(benchmark, scenario, number of tasks) of a run."""
    stream = r.get("stream") or {}
    bench = r["config"].get("benchmark", {}).get("name") or stream.get("name") or "?"
    scenario = stream.get("scenario") or r["config"].get("benchmark", {}).get("scenario") or "?"
    tasks = len(r.get("before") or []) or len(r.get("matrix") or [])
    return str(bench), str(scenario), int(tasks)


def section_title(key: tuple) -> str:
    return f"{key[0]} · {key[1]} · {key[2]} tasks"


def _strategy_rank(name: str) -> tuple:
    from .registry import BUILTINS

    order = list(BUILTINS["strategy"])
    return (order.index(name) if name in order else len(order), name)


def group_runs(results: list[dict]) -> dict[str, list[dict]]:
    """Group the runs of one section by config minus the seed; label each group by its strategy
    and the config values that tell it apart from other groups of the same strategy. Ordered
    as the registry lists strategies (baselines first), then by label."""
    keyed, flats = defaultdict(list), {}
    for r in results:
        flat = _flat(r)
        key = json.dumps(flat, sort_keys=True, default=str)
        keyed[key].append(r)
        flats[key] = flat
    family = defaultdict(list)
    for flat in flats.values():
        family[flat.get("strategy.name")].append(flat)
    groups = {}
    for key, runs in keyed.items():
        flat = flats[key]
        siblings = family[flat.get("strategy.name")]
        varying = sorted(k for k in flat if len({json.dumps(g.get(k), default=str)
                                                 for g in siblings}) > 1)
        extra = ", ".join(f"{k}={flat.get(k)}" for k in varying)
        groups[str(flat.get("strategy.name")) + (f" ({extra})" if extra else "")] = runs
    return dict(sorted(groups.items(), key=lambda kv: (
        _strategy_rank(str(kv[1][0]["config"]["strategy"]["name"])), kv[0])))


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


def load_indexes(paths) -> dict[str, dict]:
    """Index entries of the sweeps under ``paths``, keyed by their run directory."""
    from .sweep import INDEX, read_index

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
    if all(r["metrics"].get(key) is None for r in runs):
        return "not defined for these runs (e.g. a stream of one task)"
    return None


def summarize(groups: dict[str, list[dict]]) -> list[dict]:
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
        for key, _ in COLUMNS:
            row[key] = mean_std([r["metrics"].get(key) for r in runs])
            if row[key] is None:
                reason = _not_applicable(runs, key)
                if reason:
                    row["n_a"][key] = reason
        row["memory_mb"] = mean_std([r["memory_bytes"][-1] / 2**20 if r.get("memory_bytes")
                                     else 0 for r in runs])
        row["train_s"] = mean_std([sum(r["timings"]["train_s"]) for r in runs])
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
               "n_a": {k: "a reference model, not a continual run" for k, _ in COLUMNS[1:]}}
        row.update({key: None for key, _ in COLUMNS})
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


def _cells(r: dict, notes: dict) -> list[str]:
    cells = [r["method"], _runs_cell(r)]
    for key, _ in COLUMNS:
        cells.append(f"n/a [{notes[r['n_a'][key]]}]" if r[key] is None and key in r["n_a"]
                     else fmt(r[key]))
    return cells + [fmt(r["memory_mb"], 1.0), fmt(r["train_s"], 1.0, 1)]


HEAD = ["Method", "n"] + [name for _, name in COLUMNS] + ["Memory (MiB)", "Train (s)"]


def _markdown_table(rows: list[dict], notes: dict) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, notes)) + " |"
              for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict], notes: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEAD)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, notes))
                   + "</tr>" for r in rows)
    return f'<table class="results"><tr>{head}</tr>{body}</table>'


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#",
        "{": r"\{", "}": r"\}", "$": r"\$", "±": r"$\pm$", "·": r"$\cdot$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def _latex_table(title: str, rows: list[dict], notes: dict, lines: list[str]) -> str:
    """A booktabs table of one section; n/a cells carry their footnote number."""
    def cell(c: str) -> str:
        m = re.fullmatch(r"n/a \[(\d+)\]", c)
        return rf"n/a\textsuperscript{{{m.group(1)}}}" if m else _tex(c)

    caption = _tex(f"{title}: {STATISTIC}. Metrics in %. " + " ".join(lines))
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{l" + "r" * (len(HEAD) - 1) + "}", r"\toprule",
           " & ".join(_tex(h) for h in HEAD) + r" \\", r"\midrule"]
    out += [" & ".join(cell(c) for c in _cells(r, notes)) + r" \\" for r in rows]
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


def _figures(groups: dict[str, list[dict]], slug: str) -> dict[str, bytes]:
    """PNG bytes of a section's plots, keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, runs in groups.items():
        curves = [r["metrics"]["running_acc"] for r in runs if r["metrics"].get("running_acc")]
        if not curves:
            continue
        k = min(map(len, curves))
        arr = np.asarray([c[:k] for c in curves]) * 100
        x = np.arange(1, k + 1)
        ax.plot(x, arr.mean(0), marker="o", label=label)
        if len(arr) > 1:
            sd = arr.std(0, ddof=1)
            ax.fill_between(x, arr.mean(0) - sd, arr.mean(0) + sd, alpha=0.2)
    ax.set(xlabel="tasks learned", ylabel="running ACC (%)",
           title="Running accuracy (band: ± sample std)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    figs[f"{slug}__running_acc.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / max(len(groups), 1)
    for i, (label, runs) in enumerate(groups.items()):
        per = [r["metrics"].get("forgetting_per_task") or [] for r in runs]
        k = min(map(len, per))
        if k == 0:
            continue
        arr = np.asarray([p[:k] for p in per]) * 100
        offset = (i - (len(groups) - 1) / 2) * width
        ax.bar(np.arange(k) + offset, arr.mean(0), width,
               yerr=arr.std(0, ddof=1) if len(arr) > 1 else None, label=label)
    ax.set(xlabel="task", ylabel="forgetting (%, max-based)",
           title="Forgetting per task (bars: ± sample std)")
    longest = max((len(r["metrics"].get("forgetting_per_task") or []) for runs in
                   groups.values() for r in runs), default=0)
    ax.set_xticks(range(longest))
    ax.legend(fontsize=7, loc="best")
    figs[f"{slug}__forgetting.png"] = _png(fig)

    points = {label: [(r["memory_bytes"][-1], r["metrics"]["acc"] * 100) for r in runs
                      if r.get("memory_bytes") and r.get("status") == "done"]
              for label, runs in groups.items()}
    if any(b > 0 for pts in points.values() for b, _ in pts):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, pts in points.items():
            if pts:
                b, a = np.asarray(pts).T
                ax.errorbar(max(b.mean(), 1.0), a.mean(),
                            yerr=a.std(ddof=1) if len(a) > 1 else None, fmt="o", label=label)
        ax.set_xscale("log")
        ax.set(xlabel="memory kept besides the model (bytes; 0 is drawn at 1)", ylabel="ACC (%)",
               title="Accuracy against memory")
        ax.legend(fontsize=7, loc="best")
        figs[f"{slug}__acc_vs_memory.png"] = _png(fig)
    return figs


def matrix_stats(runs: list[dict]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-cell mean and sample std (None for one run) of the accuracy matrices, in %."""
    mats = [np.asarray(r["matrix"], dtype=float) for r in runs if r.get("matrix")]
    k = min(m.shape[0] for m in mats)
    stack = np.stack([m[:k] for m in mats]) * 100
    return stack.mean(0), (stack.std(0, ddof=1) if len(stack) > 1 else None), len(stack)


def _matrix_png(mean: np.ndarray, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.5 * mean.shape[1] + 2.5, 0.5 * mean.shape[0] + 1.8))
    im = ax.imshow(mean, vmin=0, vmax=100, cmap="viridis")
    if mean.size <= 400:
        for (a, b), v in np.ndenumerate(mean):
            ax.text(b, a, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
    ax.set(xlabel="evaluated on task j", ylabel="after learning task i", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _matrix_html(label: str, runs: list[dict]) -> str:
    """The mean accuracy matrix as an HTML table, each cell 'mean ± std', shaded by the mean."""
    mean, std, n = matrix_stats(runs)
    head = "".join(f"<th>task {j}</th>" for j in range(mean.shape[1]))
    body = []
    for i in range(mean.shape[0]):
        cells = []
        for j in range(mean.shape[1]):
            v = mean[i, j]
            text = f"{v:.1f}" if std is None else f"{v:.1f} ± {std[i, j]:.1f}"
            light = int(255 - 1.4 * max(min(v, 100), 0))
            cells.append(f'<td style="background:rgb({light},{max(light, 120)},255)">'
                         f"{text}</td>")
        body.append(f"<tr><th>after task {i}</th>{''.join(cells)}</tr>")
    return (f'<table class="matrix"><caption>{html.escape(label)}: R[i, j] in %, '
            f"{'mean ± sample std over ' + str(n) + ' runs' if std is not None else 'one run'}"
            f"</caption><tr><th></th>{head}</tr>{''.join(body)}</table>")


def render_extras(runs: list[dict], out_dir: Path) -> list[tuple[str, str]]:
    """(markdown, html) of every extra renderer whose key a run of this section holds."""
    present = {k for r in runs for k in (r.get("extras") or {})}
    out = []
    for key in sorted(present & set(EXTRA_RENDERERS)):
        module, _, attr = EXTRA_RENDERERS[key].partition(":")
        fn = getattr(importlib.import_module(module), attr)
        out.append(fn([r for r in runs if key in (r.get("extras") or {})], out_dir))
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
    flats = [_flat(r) for r in results]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    rows = []
    for r, flat in zip(results, flats):
        bench, scenario, tasks = section_of(r)
        row = {"benchmark": bench, "scenario": scenario, "tasks": tasks,
               "strategy": r["config"]["strategy"]["name"], "seed": r["config"].get("seed"),
               "status": _run_status(r), "run_dir": r.get("_dir", "")}
        for key, _ in COLUMNS:
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
section{border-top:2px solid #888;margin-top:2em}p.note{font-size:.9em;color:#444}"""


def write_report(paths, out: str | None = None) -> list[Path]:
    """Write report.md, report.html, report.csv and report.tex; return their paths."""
    entries = load_indexes(paths)
    files = find_results(paths, allow_empty=bool(entries))
    results = []
    for f in files:
        r = read_json(f)
        entry = entries.get(str(f.parent.resolve()), {})
        r["_sweep_status"], r["_sweep_error"] = entry.get("status"), entry.get("error")
        r["_dir"] = str(f.parent)
        results.append(r)
    out_dir = Path(out) if out else (Path(paths[0]) if Path(paths[0]).is_dir()
                                      else Path(paths[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = defaultdict(list)
    for r in results:
        sections[section_of(r)].append(r)
    md = ["# cl_toolkit report", "",
          f"{len(results)} run(s) from {len(files)} results file(s) in {len(sections)} "
          f"section(s), one per (benchmark, scenario, tasks). Metrics in %; each cell is the "
          f"{STATISTIC}. Forgetting is max-based (Chaudhry et al. 2018): mean over j < T-1 of "
          "max_(j<=l<T-1) R[l, j] - R[T-1, j]. n/a [k]: the metric does not apply, for reason "
          "[k] below the table.", ""]
    page = [f"<h1>cl_toolkit report</h1><p>{len(results)} run(s) in {len(sections)} section(s). "
            f"Metrics in %; each cell is the {html.escape(STATISTIC)}. Forgetting is max-based "
            "(Chaudhry et al. 2018: max over the rows from the task's own on)."
            "</p>"]
    tex = ["% cl_toolkit report: \\usepackage{booktabs}", ""]
    for key in sorted(sections, key=lambda k: (k[0], k[1], k[2])):
        title, slug = section_title(key), _slug(f"{key[0]}_{key[1]}_{key[2]}")
        groups = group_runs(sections[key])
        rows = summarize(groups)
        notes, note_lines = _footnotes(rows)
        figs = _figures(groups, slug)
        for i, (label, runs) in enumerate(groups.items()):
            if any(r.get("matrix") for r in runs):
                figs[f"{slug}__matrix_{_slug(label)}.png"] = _matrix_png(
                    matrix_stats(runs)[0], label)
        for name, data in figs.items():
            (out_dir / name).write_bytes(data)
        extras = render_extras(sections[key], out_dir)

        md += [f"## {title}", "", _markdown_table(rows, notes), ""]
        md += [f"{line}  " for line in note_lines] + ([""] if note_lines else [])
        md += [f"![{name.split('__', 1)[1][:-4]}]({name})" for name in figs] + [""]
        md += [m for m, _ in extras]
        imgs = "".join(
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">' for name, data in figs.items()
            if "__matrix_" not in name)
        matrices = "".join(_matrix_html(label, runs) for label, runs in groups.items()
                           if any(r.get("matrix") for r in runs))
        notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in note_lines)
        page.append(f"<section><h2>{html.escape(title)}</h2>{_html_table(rows, notes)}"
                    f"{notes_html}{imgs}<h3>Accuracy matrices</h3>{matrices}"
                    f"{''.join(h for _, h in extras)}</section>")
        tex.append(_latex_table(title, rows, notes, note_lines))
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

