"""``cltk report``: aggregate runs into ``report.md`` and a self-contained ``report.html``.

Runs are grouped by everything in their config except the seed, so a sweep over seeds (or task
orders) becomes one row with mean ± std and the number of runs. Means are over the finished
runs of a cell (over its partial runs only when none finished, marked so), so the report of a
sweep still in progress is honest. A sweep directory's ``sweep_index.json`` adds the status of
every run, failed runs with their error and runs not started yet. Plots per group: the mean
accuracy matrix as a heatmap, running ACC over tasks and forgetting per task. Forgetting is the
max-based one (see `cl_toolkit.metrics`).
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UsageError
from .store import RESULTS, read_json

COLUMNS = [("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting (max)"),
           ("learning_acc", "Learning acc")]
GROUP_EXCLUDE = {"seed", "resume", "overwrite", "quiet", "output_root", "tensorboard", "threads",
                 "mlflow", "mlflow_uri"}


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
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def group_runs(results: list[dict]) -> dict[str, list[dict]]:
    """Group by config minus the seed; label each group by strategy, benchmark and the config
    values that tell groups apart."""
    keyed = defaultdict(list)
    flats = {}
    for r in results:
        flat = {k: v for k, v in flatten_config(r["config"]).items()
                if k.split(".")[0] not in GROUP_EXCLUDE}
        key = json.dumps(flat, sort_keys=True, default=str)
        keyed[key].append(r)
        flats[key] = flat
    family = defaultdict(list)  # groups of one strategy on one benchmark
    for key, flat in flats.items():
        family[(flat.get("strategy.name"), flat.get("benchmark.name"))].append(flat)
    groups = {}
    for key, runs in keyed.items():
        flat = flats[key]
        siblings = family[(flat.get("strategy.name"), flat.get("benchmark.name"))]
        varying = sorted(k for k in flat if len({json.dumps(g.get(k), default=str)
                                                 for g in siblings}) > 1)
        extra = ", ".join(f"{k}={flat.get(k)}" for k in varying)
        scenario = next((r["stream"]["scenario"] for r in runs if "stream" in r), None)
        label = f"{flat.get('strategy.name')} @ {flat.get('benchmark.name')}" + \
            (f" [{scenario}]" if scenario else "")
        groups[label + (f" ({extra})" if extra else "")] = runs
    return dict(sorted(groups.items()))


def _mean_std(values) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals))


def _fmt(ms, scale: float = 100.0) -> str:
    if ms is None:
        return "n/a"
    return f"{ms[0] * scale:.2f} ± {ms[1] * scale:.2f}"


def load_indexes(paths) -> dict[str, dict]:
    """Index entries of the sweeps among ``paths``, keyed by their run directory."""
    from .sweep import INDEX, read_index

    entries = {}
    for p in map(Path, paths):
        if (p / INDEX).is_file():
            for key, entry in read_index(p)["runs"].items():
                run_dir = str(Path(entry.get("dir") or p / key).resolve())
                entries[run_dir] = {**entry, "key": key}
    return entries


def _run_status(r: dict) -> str:
    if r.get("_sweep_status") == "failed":
        return "failed"
    return "done" if r.get("status") == "done" else "partial"


def summarize(groups: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for label, all_runs in groups.items():
        status = [_run_status(r) for r in all_runs]
        done = [r for r, s in zip(all_runs, status) if s == "done"]
        runs = done or all_runs  # never average an ACC after 2 tasks with one after 5
        row = {"method": label, "runs": len(all_runs), "done": len(done),
               "partial": status.count("partial"), "failed": status.count("failed"),
               "errors": [r["_sweep_error"] for r, s in zip(all_runs, status) if s == "failed"],
               "only_partial": not done}
        for key, _ in COLUMNS:
            row[key] = _mean_std([r["metrics"].get(key) for r in runs])
        row["memory_mb"] = _mean_std([r["memory_bytes"][-1] / 2**20 if r["memory_bytes"] else 0
                                      for r in runs])
        row["train_s"] = _mean_std([sum(r["timings"]["train_s"]) for r in runs])
        rows.append(row)
    return rows + reference_rows(groups)


def reference_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """Rows for the references that strategies report (merging: every fine-tuned model on its
    own task, and the base model theta_0, i.e. the row before any task), one per benchmark.
    ACC of a reference = mean over tasks; the other columns do not apply."""
    refs: dict[str, dict] = {}  # label -> {seed: acc}; strategies sharing a seed share them
    for runs in groups.values():
        for r in runs:
            if not r.get("reference") or _run_status(r) != "done":
                continue
            bench, seed = r["config"]["benchmark"]["name"], r["config"].get("seed")
            for name, per_task in r["reference"].items():
                refs.setdefault(f"{name} (reference) @ {bench}", {})[seed] = float(
                    np.mean(list(per_task.values())))
            refs.setdefault(f"base model (reference) @ {bench}", {})[seed] = float(
                np.mean(r["before"]))
    rows = []
    for label, by_seed in refs.items():
        accs = list(by_seed.values())
        row = {"method": label, "runs": len(accs), "done": len(accs), "partial": 0,
               "failed": 0, "errors": [], "only_partial": False,
               "memory_mb": None, "train_s": None}
        row.update({key: None for key, _ in COLUMNS})
        row["acc"] = _mean_std(accs)
        rows.append(row)
    return rows


def _runs_cell(r: dict) -> str:
    notes = [f"{r[k]} {k}" for k in ("partial", "failed") if r[k]]
    if r["only_partial"] and r["runs"]:
        notes.append("metrics of unfinished runs")
    return f"{r['runs']}" + (f" ({', '.join(notes)})" if notes else "")


def _sweep_section(entries: dict[str, dict]) -> list[str]:
    """Markdown lines: status counts and every run that is not done, with its error."""
    if not entries:
        return []
    counts = {s: sum(e.get("status") == s for e in entries.values())
              for s in ("done", "running", "pending", "failed")}
    lines = ["## Sweep status", "",
             f"{len(entries)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    open_runs = sorted((e["key"], e) for e in entries.values() if e.get("status") != "done")
    if open_runs:
        lines += ["| Run | Status | Error / note |", "|---|---|---|"]
        for key, e in open_runs:
            detail = (e.get("error") or e.get("note") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | {e.get('status')} | {detail} |")
        lines.append("")
    return lines


def _markdown_table(rows: list[dict]) -> str:
    head = ["Method", "Runs"] + [name for _, name in COLUMNS] + ["Memory (MiB)", "Train (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _runs_cell(r)] + [_fmt(r[k]) for k, _ in COLUMNS]
        cells += [_fmt(r["memory_mb"], 1.0), _fmt(r["train_s"], 1.0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(groups: dict[str, list[dict]]) -> dict[str, bytes]:
    """PNG bytes of every plot, keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, runs in groups.items():
        curves = [r["metrics"]["running_acc"] for r in runs]
        k = min(map(len, curves))
        arr = np.asarray([c[:k] for c in curves]) * 100
        x = np.arange(1, k + 1)
        ax.plot(x, arr.mean(0), marker="o", label=label)
        ax.fill_between(x, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0), alpha=0.2)
    ax.set(xlabel="tasks learned", ylabel="running ACC (%)", title="Running accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    figs["running_acc.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / max(len(groups), 1)
    for i, (label, runs) in enumerate(groups.items()):
        per = [r["metrics"]["forgetting_per_task"] for r in runs]
        k = min(map(len, per))
        if k == 0:
            continue
        arr = np.asarray([p[:k] for p in per]) * 100
        offset = (i - (len(groups) - 1) / 2) * width
        ax.bar(np.arange(k) + offset, arr.mean(0), width, yerr=arr.std(0), label=label)
    ax.set(xlabel="task", ylabel="forgetting (%, max-based)", title="Forgetting per task")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="best")
    figs["forgetting.png"] = png(fig)

    # ACC against what each method keeps (coresets, buffers, generators, task vectors): the
    # accuracy-memory trade-off, drawn when any method keeps something.
    points = {label: [(r["memory_bytes"][-1], r["metrics"]["acc"] * 100) for r in runs
                      if r.get("memory_bytes") and r.get("status") == "done"]
              for label, runs in groups.items()}
    if any(b > 0 for pts in points.values() for b, _ in pts):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, pts in points.items():
            if pts:
                b, a = np.asarray(pts).T
                ax.errorbar(max(b.mean(), 1.0), a.mean(), yerr=a.std(), fmt="o", label=label)
        ax.set_xscale("log")
        ax.set(xlabel="memory kept besides the model (bytes; 0 is drawn at 1)", ylabel="ACC (%)",
               title="Accuracy against memory")
        ax.legend(fontsize=7, loc="best")
        figs["acc_vs_memory.png"] = png(fig)

    for i, (label, runs) in enumerate(groups.items()):
        mats = [np.asarray(r["matrix"]) for r in runs]
        k = min(m.shape[0] for m in mats)
        mean = np.mean([m[:k] for m in mats], axis=0) * 100
        fig, ax = plt.subplots(figsize=(0.5 * mean.shape[1] + 2.5, 0.5 * k + 1.8))
        im = ax.imshow(mean, vmin=0, vmax=100, cmap="viridis")
        if mean.size <= 400:
            for (a, b), v in np.ndenumerate(mean):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 60 else "black")
        ax.set(xlabel="evaluated on task j", ylabel="after learning task i", title=label)
        fig.colorbar(im, ax=ax, fraction=0.046)
        figs[f"matrix_{i}.png"] = png(fig)
    return figs


def write_report(paths, out: str | None = None) -> tuple[Path, Path]:
    entries = load_indexes(paths)
    files = find_results(paths, allow_empty=bool(entries))
    results = []
    for f in files:
        r = read_json(f)
        entry = entries.get(str(f.parent.resolve()), {})
        r["_sweep_status"], r["_sweep_error"] = entry.get("status"), entry.get("error")
        results.append(r)
    groups = group_runs(results)
    rows = summarize(groups)
    out_dir = Path(out) if out else (Path(paths[0]) if Path(paths[0]).is_dir()
                                      else Path(paths[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _figures(groups) if groups else {}
    for name, data in figs.items():
        (out_dir / name).write_bytes(data)
    table = _markdown_table(rows)
    matrices = [n for n in figs if n.startswith("matrix_")]
    md = ["# cl_toolkit report", "",
          f"{len(results)} run(s) from {len(files)} results file(s). Metrics in %, mean ± std over "
          "runs (seeds / task orders). Forgetting is max-based: mean over j < T-1 of "
          "max_{l<T-1} R[l, j] - R[T-1, j].", "", table, "", *_sweep_section(entries)]
    if figs:
        md += ["![running accuracy](running_acc.png)", "", "![forgetting](forgetting.png)", ""]
    if "acc_vs_memory.png" in figs:
        md += ["![accuracy against memory](acc_vs_memory.png)", ""]
    md += [f"![{label}]({name})" for label, name in zip(groups, matrices)]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(figs[name]).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    head = ["Method", "Runs"] + [n for _, n in COLUMNS] + ["Memory (MiB)", "Train (s)"]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in
                         [r["method"], _runs_cell(r)] + [_fmt(r[k]) for k, _ in COLUMNS]
                         + [_fmt(r["memory_mb"], 1.0), _fmt(r["train_s"], 1.0)]) + "</tr>"
        for r in rows)
    curves = (img("running_acc.png", "running accuracy") + img("forgetting.png", "forgetting")
              if figs else "")
    if "acc_vs_memory.png" in figs:
        curves += img("acc_vs_memory.png", "accuracy against memory")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cl_toolkit report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%;margin:1em 0}}</style></head><body>
<h1>cl_toolkit report</h1><p>{len(results)} run(s). Metrics in %, mean ± std over runs.
Forgetting is max-based.</p>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{body}</table>
{_html_sweep(entries)}
{curves}
{''.join(img(n, label) for label, n in zip(groups, matrices))}
</body></html>"""
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path


def _html_sweep(entries: dict[str, dict]) -> str:
    lines = _sweep_section(entries)
    if not lines:
        return ""
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| Run |")]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>"
                                    for c in ln.strip("|").split(" | ")) + "</tr>" for ln in rows)
    table = (f"<table><tr><th>Run</th><th>Status</th><th>Error / note</th></tr>{body}</table>"
             if rows else "")
    return f"<h2>Sweep status</h2><p>{html.escape(lines[2])}</p>{table}"
