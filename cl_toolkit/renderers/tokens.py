"""Report renderers for token streams (``results["extras"]``, see `cl_toolkit.renderers`).

Each renderer takes the runs of a report (results.json dicts) and a directory, writes its
plots there as PNG and returns ``(markdown, html)``; runs are grouped as in the main table
(config minus seed), cells and curves are mean ± sample std (ddof 1, as the main table) over
a group's runs.

- ``mqar``: accuracy against the number of key-value pairs;
- ``kv_interference``: first whether each run learned its training distribution (the gate);
  for the runs that did, accuracy against updates per key U (log axis) in each update order,
  against the number of keys K at a fixed U per key and at a fixed K x U, the error classes
  (stale / other key / no value, and which update a stale answer repeats), both summary
  scores (our area under accuracy against log U, PI-LLM's log_1.5-weighted mean), the chance
  guessers beside every curve (rows, dashed lines) and the points beyond training (``*``, a
  shaded band);
- ``exact_match``: the share of sequences with every answer right, per task, after the last.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..runs import group_runs
from . import legend_outside, save_png


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
    md_img, html_img = save_png(fig, Path(out_dir), "mqar_accuracy.png")
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


CHANCE_NAMES = {"value_in_context": "chance: a random value of the sequence",
                "value_of_key": "chance: a random value of the queried key",
                "uniform_value": "chance: a random value token"}
ORDER_WORD = {"random": "randomised (interleaved)", "sequential": "sequential (blocks per key)"}


def _learned(e: dict) -> bool:
    """A run without a gate (results written before it existed) counts as learned."""
    return bool(e.get("learned", True))


def _star(point, extras, field: str) -> str:
    """``*`` when any run marks ``point`` of the curve ``field`` as extrapolation."""
    return "*" if any(point in e.get("extrapolated", {}).get(field, []) for e in extras) else ""


def _chance_of(groups: dict[str, list[dict]], curve: str):
    """``[(row label, extra)]`` of the chance rows of ``curve``: one set when every run's
    chance at its points agrees, else one per group (labelled with it)."""
    have = {label: [e for e in ex if "chance" in e.get(curve, {})] for label, ex in groups.items()}
    have = {label: ex for label, ex in have.items() if ex}
    if not have:
        return []
    points = {"updates": "updates", "by_updates": "updates", "by_keys": "keys",
              "by_keys_fixed_total": "keys_fixed_total"}[curve]
    seen = {json.dumps([e[points], e[curve]["chance"]], sort_keys=True)
            for ex in have.values() for e in ex}
    if len(seen) == 1:
        return [("", next(iter(have.values()))[0])]
    return [(f" ({label})", ex[0]) for label, ex in have.items()]


def _chance_rows(groups, curve: str, points_of, width_before: int, names=CHANCE_NAMES,
                 aucs: bool = False) -> list[list[str]]:
    """Rows of the chance guessers' accuracy (%) at each point of ``curve``, aligned with a
    table whose point columns start after ``width_before`` cells (AUC cells from
    ``chance_auc`` when ``aucs``)."""
    rows = []
    points = _union(groups.values(), points_of)
    for suffix, e in _chance_of(groups, curve):
        for name, label in names.items():
            if name not in e[curve]["chance"]:
                continue
            acc = e[curve]["chance"][name]["accuracy"]
            mine = list(points_of(e))
            cells = [_ms([acc[mine.index(p)]]) if p in mine else "" for p in points]
            pre = [""] * (width_before - 1)
            if aucs:
                auc = e.get("chance_auc", {}).get(name, {})
                pre = pre[:-2] + [_ms([auc["auc_log_updates"]]) if auc else "",
                                  _ms([auc["auc_log15_updates"]]) if auc else ""]
            rows.append([label + suffix] + pre + cells)
    return rows


def _gate_notes(groups: dict[str, list[dict]]) -> list[str]:
    """A sentence per group with runs that did not learn their training distribution."""
    notes = []
    for label, ex in groups.items():
        bad = [e for e in ex if not _learned(e)]
        if bad:
            accs = ", ".join(f"{100 * e['train_accuracy']:.1f} %" for e in bad)
            gate = f"{100 * bad[0]['learned_gate']:.0f} %"
            notes.append(f"{label} ({len(bad)} of {len(ex)} runs): did not learn its "
                         f"training distribution (acc {accs} < gate {gate}); not drawn as a PI "
                         "curve.")
    return notes


def _shade_extrapolation(ax, groups, field: str, points_of) -> None:
    """Shade the x range every probe point beyond the trained ones lies in (``field``: the
    curve's key in ``extrapolated``)."""
    inside = {p for ex in groups.values() for e in ex for p in points_of(e)
              if p not in e.get("extrapolated", {}).get(field, [])}
    out = {p for ex in groups.values() for e in ex
           for p in e.get("extrapolated", {}).get(field, [])}
    if inside and out:
        hi = [p for p in out if p > max(inside)]
        lo = [p for p in out if p < min(inside)]
        if hi:
            ax.axvspan(max(inside), max(hi), color="0.85", alpha=0.5, lw=0,
                       label="beyond training")
        if lo:
            ax.axvspan(min(lo), min(inside), color="0.85", alpha=0.5, lw=0,
                       label=None if hi else "beyond training")


def _chance_lines(ax, groups, curve: str, points_of, field: str = "accuracy") -> None:
    styles = {"value_in_context": ("k", "--"), "value_of_key": ("0.45", "--"),
              "uniform_value": ("0.6", ":")}
    for suffix, e in _chance_of(groups, curve):
        for name, (color, ls) in styles.items():
            if name in e[curve]["chance"]:
                ax.plot(points_of(e), e[curve]["chance"][name][field], color=color, ls=ls,
                        lw=1, label=CHANCE_NAMES[name] + suffix)


def render_kv_interference(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """The PI section (`_render_pi`), then, where runs differ by ``context`` (a context policy
    in front of the model, cl_toolkit/context), the curves with and without each policy side
    by side (`_render_context`)."""
    md, hm = _render_pi(runs, out_dir)
    md_c, hm_c = _render_context(runs, out_dir)
    return md + md_c, hm + hm_c


def _policy_label(cfg: dict) -> str:
    """``none`` (no context layer, or context=none), else the policy and its settings."""
    node = cfg.get("context") or {"name": "none"}
    name = node.get("name", "?")
    extra = []
    if name == "recency":
        extra.append(f"k={node.get('keep')}")
        if node.get("window", 1) != 1:
            extra.append(f"window={node.get('window')}")
        if node.get("summarise"):
            extra.append("summarised")
    if name == "learned":
        extra += [f"budget={node.get('budget')}", f"penalty={node.get('penalty')}",
                  f"{node.get('steps')} steps"]
    if node.get("during") == "train_and_test":
        extra.append("train+test")
    return name + (f" ({', '.join(extra)})" if extra else "")


_POLICY_ORDER = {"none": 0, "recency": 1, "oracle": 2, "learned": 3}


def _render_context(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """Accuracy against U per backbone with and without each context policy (both orders), the
    share of the context kept, its agreement with the oracle's rule (exactly each key's last
    update kept) and the operations per sequence; one panel per backbone."""
    have = [r for r in runs if "kv_interference" in r.get("extras", {})]
    if not any("context" in r["extras"]["kv_interference"] for r in have):
        return "", ""
    table: dict[tuple[str, str], list[dict]] = {}
    for r in have:
        key = (str(r["config"].get("model", {}).get("name")), _policy_label(r["config"]))
        table.setdefault(key, []).append(r["extras"]["kv_interference"])
    keys = sorted(table, key=lambda k: (k[0], _POLICY_ORDER.get(k[1].split(" ")[0], 9), k[1]))

    def upd(e):
        return e["updates"]

    ups = _union([table[k] for k in keys], upd)
    orders = sorted({o for ex in table.values() for e in ex for o in e.get("other_orders", {})})
    md, hm = [], []

    def emit(title, header, rows):
        md.append(f"### {title}\n\n{_table(header, rows)}\n")
        hm.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")

    def ctx(e, field):
        c = e.get("context")
        return c["by_updates"][field] if c else [1.0 if field == "kept_share" else None] * \
            len(e["updates"])

    header = ["model", "context", "n", "learned (gate)"] + [f"U={u}" for u in ups]
    rows = [[m, p, str(len(ex)), f"{sum(_learned(e) for e in ex)} of {len(ex)}"] +
            [_ms(_at(ex, u, upd, lambda e: e["by_updates"]["accuracy"])) for u in ups]
            for (m, p), ex in ((k, table[k]) for k in keys)]
    emit("Context management (Sculptor): accuracy (%) against U with and without each policy,"
         " training order, mean ± std over seeds", header, rows)
    for o in orders:
        rows = [[m, p, str(len(ex)), f"{sum(_learned(e) for e in ex)} of {len(ex)}"] +
                [_ms(_at([e for e in ex if o in e.get("other_orders", {})], u, upd,
                         lambda e, o=o: e["other_orders"][o]["by_updates"]["accuracy"]))
                 for u in ups] for (m, p), ex in ((k, table[k]) for k in keys)]
        emit(f"Context management: accuracy (%) against U in the {ORDER_WORD.get(o, o)} "
             "update order (not trained on)", header, rows)
    header = ["model", "context"] + [f"kept / match U={u}" for u in ups] + \
        ["hides / searches / summaries per sequence (largest U)"]
    rows = []
    for m, p in keys:
        ex = [e for e in table[m, p] if e.get("context")]
        if not ex:
            rows.append([m, p] + ["100 / -"] * len(ups) + ["0 / 0 / 0"])
            continue
        top = max(ups)
        cells = [f"{_ms(_at(ex, u, upd, lambda e: ctx(e, 'kept_share')))} / "
                 f"{_ms(_at(ex, u, upd, lambda e: ctx(e, 'oracle_match')))}" for u in ups]
        ops = " / ".join(f"{np.mean(_at(ex, top, upd, lambda e, f=f: ctx(e, f))):.1f}"
                         for f in ("hides", "searches", "summaries"))
        rows.append([m, p] + cells + [ops])
    emit("Context kept (% of the pairs) / rows whose kept pairs are exactly each key's last "
         "update (% , the oracle's rule), training order", header, rows)
    models = sorted({m for m, _ in keys})
    fig, ax = _figure(len(models))
    for col, m in enumerate(models):
        a = ax[0, col]
        for mm, p in keys:
            if mm != m:
                continue
            ex = table[mm, p]
            x = _union([ex], upd)
            y = [np.mean(_at(ex, u, upd, lambda e: e["by_updates"]["accuracy"])) for u in x]
            line, = a.plot(x, y, marker="o", label=p)
            for o in orders:
                on = [e for e in ex if o in e.get("other_orders", {})]
                if on:
                    y = [np.mean(_at(on, u, upd, lambda e, o=o: e["other_orders"][o][
                        "by_updates"]["accuracy"])) for u in x]
                    a.plot(x, y, marker="s", ms=3, ls=":", color=line.get_color(),
                           label=f"{p} ({o} order)")
        a.set_xscale("log", base=2)
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
        a.set(xlabel="updates per key U (log)", ylabel="accuracy (last value)", title=m)
        a.legend(fontsize=6, loc="lower left")
    md_img, html_img = save_png(fig, Path(out_dir), "kv_interference_context.png",
                             wide=len(models) > 1)
    return "\n".join(md) + f"\n{md_img}\n", "".join(hm) + html_img


def _render_pi(runs: list[dict], out_dir: Path) -> tuple[str, str]:
    """The gate, then (runs that learned their training distribution only) accuracy against
    U in the training order and in every other order probed, against K at a fixed U per key
    and against K at a fixed K x U, the error classes and both AUCs; a column per point any run
    probed (blank where a row's runs did not; ``*``: beyond the training sizes), with the
    chance guessers' rows below each table and dashed in the plots."""
    every = _groups(runs, "kv_interference")
    if not every:
        return "", ""
    notes = _gate_notes(every)
    groups = {label: [e for e in ex if _learned(e)] for label, ex in every.items()}
    groups = {label: ex for label, ex in groups.items() if ex}
    md, hm = [], []
    if any("learned" in e for ex in every.values() for e in ex):
        title_g = ("Learned the task? Accuracy (%) at the training sizes (every (K, U) trained "
                   "on, in the training order) against the gate")
        header_g = ["run", "n", "train accuracy", "gate", "learned"]
        rows_g = [[label, str(len(ex)), _ms([e["train_accuracy"] for e in ex]),
                   " / ".join(sorted({f"{100 * e['learned_gate']:.0f}" for e in ex})),
                   f"{sum(_learned(e) for e in ex)} of {len(ex)}"]
                  for label, ex in every.items()]
        md.append(f"### {title_g}\n\n{_table(header_g, rows_g)}\n" +
                  "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
        hm.append(f"<h3>{html.escape(title_g)}</h3>{_html_table(header_g, rows_g)}" +
                  ("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
                   if notes else ""))
    if not groups:
        return "\n".join(md), "".join(hm)

    def upd(e):
        return e["updates"]

    def keys_of(e):
        return e["keys"]

    def fixed_of(e):
        return e.get("keys_fixed_total", [])

    def legacy(e):  # results before the fixed-U keys test: by_keys held K x U fixed
        return "keys_updates" not in e

    updates = _union(groups.values(), upd)
    keys_new = _union([[e for e in ex if not legacy(e)] for ex in groups.values()], keys_of)
    keys_old = _union([[e for e in ex if legacy(e)] for ex in groups.values()], keys_of)
    fixed = _union(groups.values(), fixed_of)
    K, trained, order = (_one(groups, f) for f in ("num_keys", "train_updates", "order"))
    each = [("K", "num_keys")] if K is None else []
    each += [("trained on U", "train_updates")] if trained is None else []
    each += [("order", "order")] if order is None and any(
        "order" in e for ex in groups.values() for e in ex) else []
    pi_auc = any("auc_log15_updates" in e for ex in groups.values() for e in ex)

    def cells(ex, fields):
        return [" / ".join(sorted({str(e.get(f)) for e in ex})) for _, f in fields]

    def u_table(title, node_of, star=True):
        """The accuracy-against-U table of the curve ``node_of(e)`` (None: not probed)."""
        sub = {label: [e for e in ex if node_of(e) is not None] for label, ex in groups.items()}
        sub = {label: ex for label, ex in sub.items() if ex}
        if not sub:
            return
        pts = _union(sub.values(), upd)
        header = (["run", "n"] + [h for h, _ in each] + ["AUC log U"] +
                  (["AUC log1.5 (PI-LLM)"] if pi_auc else []) +
                  [f"U={u}" + (_star(u, [e for ex in sub.values() for e in ex], "updates")
                               if star else "*") for u in pts])
        rows = [[label, str(len(ex))] + cells(ex, each) +
                [_ms([node_of(e)["auc_log_updates"] for e in ex
                      if "auc_log_updates" in node_of(e)])] +
                ([_ms([node_of(e)["auc_log15_updates"] for e in ex
                       if "auc_log15_updates" in node_of(e)])] if pi_auc else []) +
                [_ms(_at(ex, u, upd, lambda e: node_of(e)["by_updates"]["accuracy"]))
                 for u in pts] for label, ex in sub.items()]
        before = 2 + len(each) + 1 + pi_auc
        rows += _chance_rows(sub, "by_updates", upd, before, aucs=pi_auc)
        md.append(f"### {title}\n\n{_table(header, rows)}\n")
        hm.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, rows)}")

    if updates:
        at = (f"K = {K} keys" if K is not None else "K as in each row") + (
            f", trained on U in {trained}" if trained is not None else "") + (
            f", {ORDER_WORD.get(order, order)} update order" if order is not None else "")
        title = (f"Proactive interference: accuracy (%) against updates per key U ({at}); AUC "
                 "log U = area under accuracy vs log U over the log range (ours); AUC log1.5 = "
                 "mean accuracy weighted by log_1.5(max(U, 2)) (PI-LLM's auc_log1.5); "
                 "* = beyond the training sizes")
        u_table(title, lambda e: e)
        for o in sorted({o for ex in groups.values() for e in ex
                         for o in e.get("other_orders", {})}):
            u_table(f"Accuracy (%) against U in the {ORDER_WORD.get(o, o)} update order, "
                    "not trained on (every point extrapolates: *)",
                    lambda e, o=o: e.get("other_orders", {}).get(o), star=False)
    if keys_new:
        sub = {label: [e for e in ex if not legacy(e)] for label, ex in groups.items()}
        sub = {label: ex for label, ex in sub.items() if ex}
        per = _one(sub, "keys_updates")
        fixed_u = [("U per key", "keys_updates")] if per is None else []
        flat = [e for ex in sub.values() for e in ex]
        title_k = ("Accuracy (%) against the number of keys K at a fixed number of updates "
                   "per key" + (f", U = {per}" if per is not None else " (U of each row)") +
                   " (PI-LLM's keys test); * = beyond the training sizes")
        header_k = ["run", "n"] + [h for h, _ in fixed_u] + \
            [f"K={k}{_star(k, flat, 'keys')}" for k in keys_new]
        rows_k = [[label, str(len(ex))] + cells(ex, fixed_u) +
                  [_ms(_at(ex, k, keys_of, lambda e: _by(e, "by_keys", "accuracy")))
                   for k in keys_new] for label, ex in sub.items()]
        rows_k += _chance_rows(sub, "by_keys", keys_of, 2 + len(fixed_u))
        md.append(f"### {title_k}\n\n{_table(header_k, rows_k)}\n")
        hm.append(f"<h3>{html.escape(title_k)}</h3>{_html_table(header_k, rows_k)}")
    for label_k, pts, pts_of, curve, which in (
            ("legacy", keys_old, keys_of, "by_keys", legacy),
            ("fixed", fixed, fixed_of, "by_keys_fixed_total", lambda e: True)):
        if not pts:
            continue
        sub = {label: [e for e in ex if which(e) and pts_of(e)] for label, ex in groups.items()}
        sub = {label: ex for label, ex in sub.items() if ex}
        tot = _one(sub, "total_updates")
        col = [("K x U", "total_updates")] if tot is None else []
        flat = [e for ex in sub.values() for e in ex]
        title_t = ("Accuracy (%) against the number of keys K" +
                   (f" at K x U = {tot}" if tot is not None else " at K x U of each row") +
                   (" (a fixed length: U falls as K rises; a control, not PI-LLM's keys test)"
                    if label_k == "fixed" else ""))
        field = "keys_fixed_total" if label_k == "fixed" else "keys"
        header_t = ["run", "n"] + [h for h, _ in col] + \
            [f"K={k}{_star(k, flat, field) if label_k == 'fixed' else ''}" for k in pts]
        rows_t = [[label, str(len(ex))] + cells(ex, col) +
                  [_ms(_at(ex, k, pts_of, lambda e, c=curve: _by(e, c, "accuracy")))
                   for k in pts] for label, ex in sub.items()]
        if label_k == "fixed":
            rows_t += _chance_rows(sub, curve, pts_of, 2 + len(col))
        md.append(f"### {title_t}\n\n{_table(header_t, rows_t)}\n")
        hm.append(f"<h3>{html.escape(title_t)}</h3>{_html_table(header_t, rows_t)}")
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
        for suffix, e in _chance_of(groups, "by_updates"):
            top = max(e["updates"])
            j = e["updates"].index(top)
            for name, label in CHANCE_NAMES.items():
                ch = e["by_updates"]["chance"].get(name)
                if ch is None:
                    continue
                # a guesser picks each earlier update as often as the right one
                each_update = ch["accuracy"][j] if top > 1 else 0.0
                rows_e.append([label + suffix, str(top)] +
                              [_ms([ch[c][j]]) for c in ("stale", "other_key", "no_value")] +
                              [_ms([each_update])] * 2)
        md.append(f"### {title_e}\n\n{_table(header_e, rows_e)}\n")
        hm.append(f"<h3>{html.escape(title_e)}</h3>{_html_table(header_e, rows_e)}")
    panels = (["u", "stale"] if updates else []) + (["keys"] if keys_new else []) + \
        (["legacy"] if keys_old else []) + (["fixed"] if fixed else [])
    if not panels:
        return "\n".join(md), "".join(hm)
    fig, ax = _figure(len(panels))
    for col, panel in enumerate(panels):
        a = ax[0, col]
        if panel == "u":
            _shade_extrapolation(a, groups, "updates", upd)
            _curves(a, groups, upd, lambda e: _by(e, "by_updates", "accuracy"), log=True)
            color = {c.get_label(): c.lines[0].get_color() for c in a.containers
                     if getattr(c, "lines", None)}
            for o in sorted({o for ex in groups.values() for e in ex
                             for o in e.get("other_orders", {})}):
                for label, ex in groups.items():
                    on = [e for e in ex if o in e.get("other_orders", {})]
                    if on:
                        x = _union([on], upd)
                        y = [np.mean(_at(on, u, upd, lambda e, o=o: e["other_orders"][o][
                            "by_updates"]["accuracy"])) for u in x]
                        a.plot(x, y, marker="s", ls=":", ms=3, color=color.get(label),
                               label=f"{label} ({o} order, not trained on)")
            _chance_lines(a, groups, "by_updates", upd)
            a.set(xlabel="updates per key U (log)", ylabel="accuracy (last value)",
                  title="accuracy vs U")
        elif panel == "stale":
            for label, ex in groups.items():
                x = _union([ex], upd)
                stale = [np.mean(_at(ex, u, upd, lambda e: _by(e, "by_updates", "stale")))
                         for u in x]
                a.plot(x, stale, marker="o", label=label)
            _chance_lines(a, groups, "by_updates", upd, field="stale")
            a.set_xscale("log", base=2)
            a.set_ylim(-0.02, 1.02)
            a.grid(alpha=0.3)
            a.set(xlabel="updates per key U (log)", ylabel="share of queries",
                  title="stale answers vs U")
        elif panel == "keys":
            sub = {label: [e for e in ex if not legacy(e)] for label, ex in groups.items()}
            sub = {label: ex for label, ex in sub.items() if ex}
            _shade_extrapolation(a, sub, "keys", keys_of)
            _curves(a, sub, keys_of, lambda e: _by(e, "by_keys", "accuracy"), log=True)
            _chance_lines(a, sub, "by_keys", keys_of)
            per = _one(sub, "keys_updates")
            a.set(xlabel="keys K (U per key fixed" + (f" = {per})" if per else ")"),
                  ylabel="accuracy (last value)", title="accuracy vs K, U fixed")
        else:
            legacy_panel = panel == "legacy"
            pts_of = keys_of if legacy_panel else fixed_of
            curve = "by_keys" if legacy_panel else "by_keys_fixed_total"
            sub = {label: [e for e in ex if (legacy(e) if legacy_panel else fixed_of(e))]
                   for label, ex in groups.items()}
            sub = {label: ex for label, ex in sub.items() if ex}
            if not legacy_panel:
                _shade_extrapolation(a, sub, "keys_fixed_total", fixed_of)
            _curves(a, sub, pts_of, lambda e, c=curve: _by(e, c, "accuracy"), log=True)
            if not legacy_panel:
                _chance_lines(a, sub, curve, pts_of)
            a.set(xlabel="keys K (K x U fixed)", ylabel="accuracy (last value)",
                  title="accuracy vs K, K x U fixed")
    handles = {}  # one legend for every panel's lines (the other orders are in the first only)
    for a in ax[0]:
        for h, name in zip(*a.get_legend_handles_labels()):
            handles.setdefault(name, h)
    ax[0, -1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                     bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    md_img, html_img = save_png(fig, Path(out_dir), "kv_interference.png", wide=ax.shape[1] > 1)
    return "\n".join(md) + f"\n{md_img}\n", "".join(hm) + html_img


def check_kv_interference(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["kv_interference"]`` the renderer cannot draw."""
    _mapping(extra)
    curves = [("updates", "by_updates", ("accuracy", "stale", "other_key", "no_value",
                                          "stale_by_update")),
              ("keys", "by_keys", ("accuracy",))]
    if "keys_fixed_total" in extra:
        curves.append(("keys_fixed_total", "by_keys_fixed_total", ("accuracy",)))
    for points, curve, fields in curves:
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
        for name, guess in (node.get("chance") or {}).items():
            if not isinstance(guess, dict):
                raise TypeError(f"{curve}: chance {name!r} is not a mapping")
            acc = _list(guess, "accuracy", f"{curve}: chance {name!r}: ")
            if len(acc) != n:
                raise ValueError(f"{curve}: chance {name!r} has {len(acc)} accuracies for {n} "
                                 f"{points!r}")
    for o, node in (extra.get("other_orders") or {}).items():
        acc = _list(node.get("by_updates") if isinstance(node, dict) else None, "accuracy",
                    f"other_orders[{o!r}]: by_updates: ")
        if len(acc) != len(extra["updates"]):
            raise ValueError(f"other_orders[{o!r}] has {len(acc)} accuracies for "
                             f"{len(extra['updates'])} 'updates'")
    if "learned" in extra:
        if not isinstance(extra["learned"], bool):
            raise TypeError(f"'learned' is {extra['learned']!r}, not true / false")
        for key in ("train_accuracy", "learned_gate"):
            if isinstance(extra.get(key), bool) or not isinstance(extra.get(key), (int, float)):
                raise TypeError(f"'learned' without a number {key!r}")


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
