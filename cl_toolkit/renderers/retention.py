"""Tables and plots of the retention probe's curves (``results["extras"]["retention"]``, see
`cl_toolkit.probes.retention`): the report renderer ``retention`` and what ``python -m
cl_toolkit.retention`` prints.

Every effect is read against the unstudied control set of the same stimulus kind, measured in
the same branch at the same point: for k > 0 a cell is studied minus control (recognition and
recall in percentage points; loss gain in nats: how much more the studied sequences' loss fell
below their foils' than the control's did below its foils', since before the study); the k = 0
row is the control itself as measured (its loss gain: its own drift since before the study).
A cell is the mean over runs with different seeds (runs with the same seed are averaged first)
with the half-width of its 95 % confidence interval, t-distribution with n - 1 degrees of
freedom (`cl_toolkit.probes.retention_metrics.mean_ci`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from ..probes.retention_metrics import mean_ci
from ..runs import flat_config, show
from . import legend_outside

MEASURES = ("recognition", "recall_exact", "recall_token", "recall_rouge")
POINT_KEYS = ("stimuli", "set", "k", "updates", *MEASURES, "loss_studied", "loss_foil")
LABELS = {"recognition": "recognition (%)", "recall_exact": "recall, exact match (%)",
          "recall_token": "recall, token accuracy (%)",
          "recall_rouge": "recall, ROUGE-L (%, cue included)", "loss_gain": "loss gain (nats)"}


def check(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["retention"]`` the renderer cannot draw: it needs
    ``before`` and ``points`` lists of measurements with every key of `POINT_KEYS` (results of
    the probe before its control set lack ``set`` and ``recall_rouge``)."""
    if not isinstance(extra, dict):
        raise TypeError(f"a {type(extra).__name__}, not a mapping")
    for name in ("before", "points"):
        rows = extra.get(name)
        if not isinstance(rows, list):
            raise TypeError(f"no {name!r} list" if rows is None else
                            f"{name!r} is {rows!r}, not a list")
        for i, row in enumerate(rows):
            missing = [k for k in POINT_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                old = " (written by the probe before it had a control set)" \
                    if "set" in missing else ""
                raise ValueError(f"{name}[{i}] lacks {', '.join(map(repr, missing))}{old}")


def _gap(row: dict) -> float:
    return row["loss_foil"] - row["loss_studied"]


def _per_run(extra: dict) -> tuple[dict, dict]:
    """One run's cells: ``effects {(stimuli, k): {at: {measure: value}}}`` (studied minus control)
    and ``control {stimuli: {at: {measure: value}}}`` (the control as measured, averaged over
    the branches that measured it at that point); ``at`` is "before" or the update count."""
    before = {(p["stimuli"], p["set"]): p for p in extra["before"]}
    pairs: dict = {}
    for p in extra["points"]:
        pairs.setdefault((p["stimuli"], p["k"], p["updates"]), {})[p["set"]] = p
    effects: dict = {}
    control: dict = {}
    for (kind, k, at), both in pairs.items():
        s, c = both.get("studied"), both.get("control")
        if s is None or c is None:
            continue
        b_s, b_c = before.get((kind, "studied")), before.get((kind, "control"))
        cell = effects.setdefault((kind, k), {}).setdefault(at, {})
        for m in MEASURES:
            cell[m] = s[m] - c[m]
        if b_s is not None and b_c is not None:
            cell["loss_gain"] = (_gap(s) - _gap(b_s)) - (_gap(c) - _gap(b_c))
        ctl = control.setdefault(kind, {}).setdefault(at, {})
        for m in MEASURES:
            ctl.setdefault(m, []).append(c[m])
        if b_c is not None:
            ctl.setdefault("loss_gain", []).append(_gap(c) - _gap(b_c))
    for kind, cells in control.items():
        for at, cell in cells.items():
            cells[at] = {m: sum(v) / len(v) for m, v in cell.items()}
    for kind in {p["stimuli"] for p in extra["before"]}:
        s, c = before.get((kind, "studied")), before.get((kind, "control"))
        if s is not None and c is not None:
            for key in [key for key in effects if key[0] == kind]:
                effects[key]["before"] = {m: s[m] - c[m] for m in MEASURES}
            control.setdefault(kind, {})["before"] = {m: c[m] for m in MEASURES}
    return effects, control


def _labels(runs: list[dict]) -> list[str]:
    """A row label per run: its model's name, plus the config keys whose values differ between
    that model's runs (seeds aside), so runs with different settings are never averaged as if
    they were seeds of one setting."""
    flats = [flat_config(r) if r.get("config") else {} for r in runs]
    models = [(r.get("config") or {}).get("model", {}).get("name", "?") for r in runs]
    labels = []
    for model, flat in zip(models, flats):
        same = [f for m, f in zip(models, flats) if m == model]
        differ = sorted(k for k in {k for f in same for k in f}
                        if len({json.dumps(f.get(k), default=str) for f in same}) > 1)
        labels.append(model + (f" ({', '.join(f'{k}={show(flat.get(k))}' for k in differ)})"
                               if differ else ""))
    return labels


def _curves(runs: list[dict]) -> dict:
    """``{(row, stimuli, k): {at: {measure: [one value per seed]}}}``: k = 0 the control as
    measured, k > 0 studied minus control (see the module); rows as `_labels` names them."""
    by_seed: dict = {}
    for r, model in zip(runs, _labels(runs)):
        extra = (r.get("extras") or {}).get("retention")
        if not extra:
            continue
        config = r.get("config") or {}
        seed = config.get("seed", 0)
        effects, control = _per_run(extra)
        rows = {**{(kind, k): c for (kind, k), c in effects.items()},
                **{(kind, 0): c for kind, c in control.items()}}
        for (kind, k), cells in rows.items():
            for at, cell in cells.items():
                for m, v in cell.items():
                    (by_seed.setdefault((model, kind, k), {}).setdefault(at, {})
                     .setdefault(m, {}).setdefault(seed, []).append(v))
    return {key: {at: {m: [sum(v) / len(v) for v in seeds.values()]
                       for m, seeds in cell.items()}
                  for at, cell in cells.items()}
            for key, cells in by_seed.items()}


def _cell(values: list[float] | None, scale: float, digits: int, signed: bool) -> str:
    if not values:
        return ""
    mean, half = mean_ci(values)
    text = f"{scale * mean:{'+' if signed else ''}.{digits}f}"
    return text if half is None else f"{text} ± {scale * half:.{digits}f}"


def tables(runs: list[dict]) -> str:
    """Markdown: one table per measure, a row per (model, stimuli, k), a column per point (mean
    ± 95 % CI over seeds; k = 0: the unstudied control as measured, k > 0: studied minus
    control; the number of seeds in the last column)."""
    curves = _curves(runs)
    if not curves:
        return ""
    points = sorted({a for c in curves.values() for a in c if a != "before"})
    md = []
    for m in MEASURES + ("loss_gain",):
        head = ["model", "stimuli", "k", "before"] + [str(p) for p in points] + ["seeds"]
        scale, digits = (1, 2) if m == "loss_gain" else (100, 0)
        unit = "nats" if m == "loss_gain" else "points"
        md += [(f"{LABELS[m]} after n updates of the retention corpus; k = 0: the unstudied "
                f"control as measured, k > 0: studied minus control ({unit}); mean ± 95 % CI "
                "over seeds"), "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (model, kind, k), c in sorted(curves.items()):
            cells = [_cell(c.get(a, {}).get(m), scale, digits, k > 0 or m == "loss_gain")
                     for a in ["before"] + points]
            n = max((len(v.get(m, ())) for v in c.values()), default=0)
            label = "0 (control)" if k == 0 else str(k)
            md.append("| " + " | ".join([model, kind, label] + cells + [str(n)]) + " |")
        md.append("")
    return "\n".join(md)


def render(runs: list[dict], out_dir) -> tuple[str, str]:
    """Renderer ``retention``: the tables plus one plot per model of the effects against the
    control, with their 95 % confidence bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    notes = sorted({n for r in runs
                    if (n := ((r.get("extras") or {}).get("retention") or {}).get("note"))})
    title = "Retention (recognition, recall; effects against an unstudied control)"
    if not curves:  # nothing measured: say why, if the runs said
        return (f"### {title}\n\n" + "".join(f"Note: {n}  \n" for n in notes) if notes else "",
                f"<h3>{title}</h3>" +
                "".join(f'<p class="note">Note: {html.escape(n)}</p>' for n in notes)
                if notes else "")
    md, frag = [f"### {title}", ""] + \
        [f"Note: {n}  " for n in notes] + ([""] if notes else []) + [tables(runs)], []
    frag.append(f"<h3>{html.escape(title)}</h3>")
    frag += [f'<p class="note">Note: {html.escape(n)}</p>' for n in notes]
    shown = MEASURES + ("loss_gain",)
    for model in sorted({key[0] for key in curves}):
        fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), sharex=True)
        kinds = sorted({key[1] for key in curves if key[0] == model})
        ks = sorted({key[2] for key in curves if key[0] == model and key[2] > 0})
        styles = ["-", "--", ":", "-."]
        for (name, kind, k), c in sorted(curves.items()):
            if name != model or k == 0:
                continue
            xs = sorted(a for a in c if a != "before")
            for ax, m in zip(axes, shown):
                scale = 1 if m == "loss_gain" else 100
                stats = [mean_ci(c[a][m]) for a in xs if m in c[a]]
                if not stats:
                    continue
                ys = [scale * s[0] for s in stats]
                half = [scale * (s[1] or 0.0) for s in stats]
                color, ls = f"C{ks.index(k)}", styles[kinds.index(kind) % len(styles)]
                ax.plot([x + 1 for x in xs], ys, marker="o", ms=3, color=color, ls=ls,
                        label=f"{kind}, k={k}")
                ax.fill_between([x + 1 for x in xs], [y - h for y, h in zip(ys, half)],
                                [y + h for y, h in zip(ys, half)], color=color, alpha=0.12)
        for ax, m in zip(axes, shown):
            unit = "nats" if m == "loss_gain" else "points"
            ax.set(xscale="log", xlabel="updates after the study + 1",
                   ylabel=f"{LABELS[m].split(' (')[0]} − control ({unit})")
            ax.axhline(0, color="grey", lw=0.8, ls=":")
        legend_outside(axes[-1])
        fig.suptitle(f"{model}: studied minus unstudied control, 95 % CI over seeds "
                     f"(line style: stimulus kind, {', '.join(kinds)})")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        name = f"retention_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model).strip('_')}.png"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / name).write_bytes(buf.getvalue())
        md += [f"![retention {model}]({name})", ""]
        data = base64.b64encode(buf.getvalue()).decode()
        frag.append(f'<img alt="{html.escape(model)} retention" src="data:image/png;base64,'
                    f'{data}">')
    frag.append("<pre>" + html.escape(tables(runs)) + "</pre>")
    return "\n".join(md), "\n".join(frag)


render.check = check
