"""Report sections for token streams (``results["extras"]``, see `cl_toolkit.report`).

Each renderer takes the runs of a report (results.json dicts) and a directory, writes its
plots there as PNG and returns ``(markdown, html)``; runs are grouped as in the main table
(config minus seed), cells and curves are mean ± sample std (ddof 1, as the main table) over
a group's runs.

- ``mqar``: accuracy against the number of key-value pairs;
- ``kv_interference``: accuracy against updates per key U (log axis) and against the number of
  keys K, the error classes (stale / other key / no value, and which update a stale answer
  repeats) and the summary score, the area under accuracy against log U;
- ``exact_match``: the share of sequences with every answer right, per task, after the last.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .report import group_runs


def _groups(runs: list[dict], key: str) -> dict[str, list[dict]]:
    """``{label: [extras[key] of each run]}``; labelled by model name where that is unique,
    else by the report's group label."""
    groups = group_runs([r for r in runs if key in r.get("extras", {})])
    names = {label: rs[0]["config"]["model"]["name"] for label, rs in groups.items()}
    unique = len(set(names.values())) == len(names)
    return {(names[label] if unique else label): [r["extras"][key] for r in rs]
            for label, rs in groups.items()}


def _ms(values) -> str:
    v = np.asarray(values, dtype=float) * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves(ax, groups: dict[str, list[dict]], x_key: str, y_of, log: bool = False) -> None:
    for label, extras in groups.items():
        x = extras[0][x_key]
        ys = np.asarray([y_of(e) for e in extras], dtype=float)
        ax.errorbar(x, ys.mean(0), yerr=ys.std(0, ddof=1) if len(ys) > 1 else None, marker="o",
                    capsize=3, label=label)
    if log:
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _save(fig, out_dir: Path, name: str) -> tuple[str, str]:
    """Markdown and html references to the figure saved as ``out_dir/name``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out_dir / name).write_bytes(buf.getvalue())
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![{name}]({name})", f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), squeeze=False)


def render_mqar(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    groups = _groups(runs, "mqar")
    if not groups:
        return "", ""
    pairs = next(iter(groups.values()))[0]["num_pairs"]
    header = ["run", "n"] + [f"{p} pairs" for p in pairs]
    rows = [[label, str(len(ex))] + [_ms([e["accuracy"][i] for e in ex])
                                     for i in range(len(pairs))]
            for label, ex in groups.items()]
    fig, ax = _figure()
    _curves(ax[0, 0], groups, "num_pairs", lambda e: e["accuracy"], log=True)
    ax[0, 0].set(xlabel="key-value pairs", ylabel="accuracy (per query)",
                 title="MQAR: accuracy vs number of pairs")
    ax[0, 0].legend(fontsize=7)
    md_img, html_img = _save(fig, Path(out_dir), "mqar_accuracy.png")
    title = "Associative recall (MQAR): accuracy (%) per query after the last task"
    return (f"### {title}\n\n{_table(header, rows)}\n\n{md_img}\n",
            f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}{html_img}")


def render_kv_interference(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    groups = _groups(runs, "kv_interference")
    if not groups:
        return "", ""
    first = next(iter(groups.values()))[0]
    updates, keys = first["updates"], first["keys"]
    md, hm = [], []
    title = (f"Proactive interference: accuracy (%) against updates per key U (K = "
             f"{first['num_keys']} keys, trained on U in {first['train_updates']}); AUC = area "
             "under accuracy vs log U")
    header = ["run", "n", "AUC log U"] + [f"U={u}" for u in updates]
    rows = [[label, str(len(ex)), _ms([e.get("auc_log_updates", np.nan) for e in ex])] +
            [_ms([e["by_updates"]["accuracy"][i] for e in ex]) for i in range(len(updates))]
            for label, ex in groups.items()] if updates else []
    if rows:
        md.append(f"### {title}\n\n{_table(header, rows)}\n")
        hm.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")
    if keys:
        title_k = f"Accuracy (%) against the number of keys K at K x U = {first['total_updates']}"
        header_k = ["run", "n"] + [f"K={k}" for k in keys]
        rows_k = [[label, str(len(ex))] + [_ms([e["by_keys"]["accuracy"][i] for e in ex])
                                           for i in range(len(keys))]
                  for label, ex in groups.items()]
        md.append(f"### {title_k}\n\n{_table(header_k, rows_k)}\n")
        hm.append(f"<h3>{html.escape(title_k)}</h3>{_html_table(header_k, rows_k)}")
    if updates:
        title_e = ("Errors at the largest U, % of queries: stale (an earlier value of the same "
                   "key), other key, no value; stale split by the update repeated")
        header_e = ["run", f"stale (U={updates[-1]})", "other key", "no value",
                    "stale: first update", "stale: last-but-one"]
        rows_e = []
        for label, ex in groups.items():
            by = [e["by_updates"] for e in ex]
            upd = [b["stale_by_update"][-1] for b in by]
            rows_e.append([label, _ms([b["stale"][-1] for b in by]),
                           _ms([b["other_key"][-1] for b in by]),
                           _ms([b["no_value"][-1] for b in by]),
                           _ms([u[0] if u else 0.0 for u in upd]),
                           _ms([u[-1] if u else 0.0 for u in upd])])
        md.append(f"### {title_e}\n\n{_table(header_e, rows_e)}\n")
        hm.append(f"<h3>{html.escape(title_e)}</h3>{_html_table(header_e, rows_e)}")
    fig, ax = _figure(3)
    if updates:
        _curves(ax[0, 0], groups, "updates", lambda e: e["by_updates"]["accuracy"], log=True)
        ax[0, 0].set(xlabel="updates per key U (log)", ylabel="accuracy (last value)",
                     title="accuracy vs U")
        ax[0, 0].legend(fontsize=7)
        for label, ex in groups.items():
            stale = np.mean([e["by_updates"]["stale"] for e in ex], 0)
            ax[0, 2].plot(updates, stale, marker="o", label=f"{label}: stale")
        ax[0, 2].set_xscale("log", base=2)
        ax[0, 2].set(xlabel="updates per key U (log)", ylabel="share of queries",
                     title="stale answers vs U")
    if keys:
        _curves(ax[0, 1], groups, "keys", lambda e: e["by_keys"]["accuracy"], log=True)
        ax[0, 1].set(xlabel="keys K (K x U fixed)", title="accuracy vs K")
    md_img, html_img = _save(fig, Path(out_dir), "kv_interference.png")
    return "\n".join(md) + f"\n{md_img}\n", "".join(hm) + html_img


def render_exact_match(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    groups = _groups(runs, "exact_match")
    if not groups:
        return "", ""
    width = max(len(ex[0]["matrix"][-1]) for ex in groups.values() if ex[0]["matrix"])
    header = ["run", "n"] + [f"task {j}" for j in range(width)]
    rows = [[label, str(len(ex))] + [_ms([e["matrix"][-1][j] for e in ex if e["matrix"]])
                                     for j in range(width)]
            for label, ex in groups.items() if ex[0]["matrix"]]
    title = "Token streams: exact match (%) per task after the last task"
    return (f"### {title}\n\n{_table(header, rows)}\n",
            f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")
