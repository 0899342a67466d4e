"""Report renderers for token streams (``results["extras"]``, see `cl_toolkit.renderers`).

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
import json
from pathlib import Path

import numpy as np

from ..runs import group_runs
from . import legend_outside


def _groups(runs: list[dict], key: str) -> dict[str, list[dict]]:
    """``{label: [extras[key] of each run]}``; labelled by model name where that is unique,
    else by the row name the report gave the runs (``r["_row"]``), else by the group label."""
    groups = group_runs([r for r in runs if key in r.get("extras", {})])
    names = {label: rs[0]["config"].get("model", {}).get("name") for label, rs in groups.items()}
    unique = None not in names.values() and len(set(names.values())) == len(names)
    return {(names[label] if unique else rs[0].get("_row") or label):
            [r["extras"][key] for r in rs] for label, rs in groups.items()}


def _ms(values) -> str:
    v = np.asarray(values, dtype=float) * 100
    if not len(v):
        return ""
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _union(extras, points_of) -> list:
    """The sorted union of the probe points of ``extras`` (every run of every group)."""
    return sorted({p for ex in extras for e in ex for p in points_of(e)})


def _at(ex: list[dict], point, points_of, values_of) -> list[float]:
    """The values of the runs ``ex`` that measured ``point`` (runs that did not are left
    out, never shifted onto another point)."""
    out = []
    for e in ex:
        points = list(points_of(e))
        if point in points:
            out.append(values_of(e)[points.index(point)])
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves(ax, groups: dict[str, list[dict]], points_of, values_of, log: bool = False) -> None:
    """Per group, mean ± sample std of the runs at each of its probe points (each group at its
    own points)."""
    for label, extras in groups.items():
        x = _union([extras], points_of)
        ys = [np.asarray(_at(extras, p, points_of, values_of), dtype=float) for p in x]
        ax.errorbar(x, [y.mean() for y in ys],
                    yerr=[y.std(ddof=1) if len(y) > 1 else 0.0 for y in ys]
                    if any(len(y) > 1 for y in ys) else None,
                    marker="o", capsize=3, label=label)
    if log:
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _one(groups: dict[str, list[dict]], field: str):
    """The value of ``field`` if every run agrees on it, else None."""
    values = {json.dumps(e.get(field), sort_keys=True) for ex in groups.values() for e in ex}
    return json.loads(values.pop()) if len(values) == 1 else None


def _save(fig, out_dir: Path, name: str, wide: bool = False) -> tuple[str, str]:
    """Markdown and html references to the figure saved as ``out_dir/name`` (``wide``: a
    figure of several panels, shown across the page)."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out_dir / name).write_bytes(buf.getvalue())
    data = base64.b64encode(buf.getvalue()).decode()
    style = ' style="max-width:98%"' if wide else ""
    return (f"![{name}]({name})",
            f'<img alt="{name}"{style} src="data:image/png;base64,{data}">')


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), squeeze=False)


def _pairs(e: dict) -> list:
    return e["num_pairs"]


def render_mqar(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """Accuracy per query against the number of pairs: a column per number of pairs any run
    probed (blank where a row's runs did not)."""
    groups = _groups(runs, "mqar")
    if not groups:
        return "", ""
    pairs = _union(groups.values(), _pairs)
    header = ["run", "n"] + [f"{p} pairs" for p in pairs]
    rows = [[label, str(len(ex))] + [_ms(_at(ex, p, _pairs, lambda e: e["accuracy"]))
                                     for p in pairs]
            for label, ex in groups.items()]
    fig, ax = _figure()
    _curves(ax[0, 0], groups, _pairs, lambda e: e["accuracy"], log=True)
    ax[0, 0].set(xlabel="key-value pairs", ylabel="accuracy (per query)",
                 title="MQAR: accuracy vs number of pairs")
    legend_outside(ax[0, 0])
    md_img, html_img = _save(fig, Path(out_dir), "mqar_accuracy.png")
    title = "Associative recall (MQAR): accuracy (%) per query after the last task"
    return (f"### {title}\n\n{_table(header, rows)}\n\n{md_img}\n",
            f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}{html_img}")


def check_mqar(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["mqar"]`` the renderer cannot draw truthfully."""
    _mapping(extra)
    pairs, acc = _list(extra, "num_pairs"), _list(extra, "accuracy")
    if len(acc) != len(pairs):
        raise ValueError(f"'accuracy' has {len(acc)} values for {len(pairs)} 'num_pairs'")


def _mapping(extra) -> None:
    if not isinstance(extra, dict):
        raise TypeError(f"a {type(extra).__name__}, not a mapping")


def _list(node: dict, key: str, where: str = "") -> list:
    value = node.get(key) if isinstance(node, dict) else None
    if not isinstance(value, list):
        raise TypeError(f"no {where}{key!r} list" if value is None else
                        f"{where}{key!r} is {value!r}, not a list")
    return value


def _by(e: dict, curve: str, field: str) -> list:
    return e[curve][field]


def render_kv_interference(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """Accuracy against U and K, the error classes and the AUC: a column per U (and per K)
    any run probed, blank where a row's runs did not; K, the training U and K x U in the
    titles when every run agrees on them, else as columns."""
    groups = _groups(runs, "kv_interference")
    if not groups:
        return "", ""

    def upd(e):
        return e["updates"]

    def keys_of(e):
        return e["keys"]

    updates, keys = _union(groups.values(), upd), _union(groups.values(), keys_of)
    K, trained, total = (_one(groups, f) for f in ("num_keys", "train_updates", "total_updates"))
    each = [("K", "num_keys")] if K is None else []
    each += [("trained on U", "train_updates")] if trained is None else []

    def cells(ex, fields):
        return [" / ".join(sorted({str(e.get(f)) for e in ex})) for _, f in fields]

    md, hm = [], []
    if updates:
        at = (f"K = {K} keys" if K is not None else "K as in each row") + (
            f", trained on U in {trained}" if trained is not None else "")
        title = (f"Proactive interference: accuracy (%) against updates per key U ({at}); AUC "
                 "= area under accuracy vs log U")
        header = ["run", "n"] + [h for h, _ in each] + ["AUC log U"] + [f"U={u}" for u in updates]
        rows = [[label, str(len(ex))] + cells(ex, each) +
                [_ms([e["auc_log_updates"] for e in ex if "auc_log_updates" in e])] +
                [_ms(_at(ex, u, upd, lambda e: _by(e, "by_updates", "accuracy")))
                 for u in updates] for label, ex in groups.items()]
        md.append(f"### {title}\n\n{_table(header, rows)}\n")
        hm.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")
    if keys:
        fixed = [("K x U", "total_updates")] if total is None else []
        title_k = ("Accuracy (%) against the number of keys K" +
                   (f" at K x U = {total}" if total is not None else " at K x U of each row"))
        header_k = ["run", "n"] + [h for h, _ in fixed] + [f"K={k}" for k in keys]
        rows_k = [[label, str(len(ex))] + cells(ex, fixed) +
                  [_ms(_at(ex, k, keys_of, lambda e: _by(e, "by_keys", "accuracy")))
                   for k in keys] for label, ex in groups.items()]
        md.append(f"### {title_k}\n\n{_table(header_k, rows_k)}\n")
        hm.append(f"<h3>{html.escape(title_k)}</h3>{_html_table(header_k, rows_k)}")
    if updates:
        title_e = ("Errors at each row's largest U, % of queries: stale (an earlier value of "
                   "the same key), other key, no value; stale split by the update repeated")
        header_e = ["run", "largest U", "stale", "other key", "no value",
                    "stale: first update", "stale: last-but-one"]
        rows_e = []
        for label, ex in groups.items():
            top = max(u for e in ex for u in e["updates"]) if any(e["updates"] for e in ex) \
                else None
            here = [e for e in ex if top in e["updates"]]
            i = [e["updates"].index(top) for e in here]
            by = [e["by_updates"] for e in here]
            upd_ = [b["stale_by_update"][j] for b, j in zip(by, i)]
            rows_e.append([label, "" if top is None else str(top),
                           _ms([b["stale"][j] for b, j in zip(by, i)]),
                           _ms([b["other_key"][j] for b, j in zip(by, i)]),
                           _ms([b["no_value"][j] for b, j in zip(by, i)]),
                           _ms([u[0] if u else 0.0 for u in upd_]),
                           _ms([u[-1] if u else 0.0 for u in upd_])])
        md.append(f"### {title_e}\n\n{_table(header_e, rows_e)}\n")
        hm.append(f"<h3>{html.escape(title_e)}</h3>{_html_table(header_e, rows_e)}")
    if not updates and not keys:
        return "\n".join(md), "".join(hm)
    fig, ax = _figure(3 if updates and keys else 2 if updates else 1)
    col = 0
    if updates:
        _curves(ax[0, 0], groups, upd, lambda e: _by(e, "by_updates", "accuracy"), log=True)
        ax[0, 0].set(xlabel="updates per key U (log)", ylabel="accuracy (last value)",
                     title="accuracy vs U")
        for label, ex in groups.items():
            x = _union([ex], upd)
            stale = [np.mean(_at(ex, u, upd, lambda e: _by(e, "by_updates", "stale")))
                     for u in x]
            ax[0, 1].plot(x, stale, marker="o", label=label)
        ax[0, 1].set_xscale("log", base=2)
        ax[0, 1].set(xlabel="updates per key U (log)", ylabel="share of queries",
                     title="stale answers vs U")
        col = 2
    if keys:
        _curves(ax[0, col], groups, keys_of, lambda e: _by(e, "by_keys", "accuracy"), log=True)
        ax[0, col].set(xlabel="keys K (K x U fixed)", ylabel="accuracy (last value)",
                       title="accuracy vs K")
    legend_outside(ax[0, ax.shape[1] - 1])
    md_img, html_img = _save(fig, Path(out_dir), "kv_interference.png", wide=ax.shape[1] > 1)
    return "\n".join(md) + f"\n{md_img}\n", "".join(hm) + html_img


def check_kv_interference(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["kv_interference"]`` the renderer cannot draw."""
    _mapping(extra)
    for points, curve, fields in (("updates", "by_updates",
                                   ("accuracy", "stale", "other_key", "no_value",
                                    "stale_by_update")),
                                  ("keys", "by_keys", ("accuracy",))):
        n = len(_list(extra, points))
        if not n:
            continue
        node = extra.get(curve)
        if not isinstance(node, dict):
            raise TypeError(f"{n} {points!r} but no {curve!r} mapping")
        for field in fields:
            values = _list(node, field, f"{curve}: ")
            if len(values) != n:
                raise ValueError(f"{curve}[{field!r}] has {len(values)} values for {n} "
                                 f"{points!r}")


def render_exact_match(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    groups = _groups(runs, "exact_match")
    if not groups:
        return "", ""
    last = {label: [e["matrix"][-1] for e in ex if e["matrix"]] for label, ex in groups.items()}
    width = max((len(row) for rows in last.values() for row in rows), default=0)
    header = ["run", "n"] + [f"task {j}" for j in range(width)]
    rows = [[label, str(len(rows))] + [_ms([r[j] for r in rows if j < len(r)])
                                       for j in range(width)]
            for label, rows in last.items() if rows]
    if not rows:
        return "", ""
    title = "Token streams: exact match (%) per task after the last task"
    return (f"### {title}\n\n{_table(header, rows)}\n",
            f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")


def check_exact_match(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["exact_match"]`` that is not a score matrix."""
    _mapping(extra)
    _list(extra, "before")
    for i, row in enumerate(_list(extra, "matrix")):
        if not isinstance(row, list):
            raise TypeError(f"matrix row {i} is {row!r}, not a list of scores")


render_mqar.check = check_mqar
render_kv_interference.check = check_kv_interference
render_exact_match.check = check_exact_match
