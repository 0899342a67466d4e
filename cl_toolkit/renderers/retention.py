"""Tables and plots of the retention probe's curves (``results["extras"]["retention"]``, see
`cl_toolkit.probes.retention`): the report renderer ``retention`` and what ``python -m
cl_toolkit.retention`` prints.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from . import legend_outside

MEASURES = ("recognition", "recall_exact", "recall_token")
POINT_KEYS = ("stimuli", "k", "updates", *MEASURES, "loss_studied", "loss_foil")


def check(extra) -> None:
    """Refuse (ValueError, TypeError) an ``extras["retention"]`` the renderer cannot draw: it needs
    ``before`` and ``points`` lists of measurements with every key of `POINT_KEYS`."""
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
                raise ValueError(f"{name}[{i}] lacks {', '.join(map(repr, missing))}")


def _curves(runs: list[dict]) -> dict:
    """``{(model, stimuli, k): {updates or "before": {measure: [one value per run]}}}``;
    ``loss_gain`` is how much more the studied sequences' loss fell than the foils' since the
    measurement before the study (nats), which cancels the sets' chance differences."""
    out: dict = {}
    for r in runs:
        extra = r.get("extras", {}).get("retention")
        if not extra:
            continue
        model = r.get("config", {}).get("model", {}).get("name", "?")
        gap0 = {(p["stimuli"], p["k"]): p["loss_foil"] - p["loss_studied"]
                for p in extra["before"]}
        for p in extra["before"] + extra["points"]:
            at = "before" if p["updates"] is None else p["updates"]
            cell = out.setdefault((model, p["stimuli"], p["k"]), {}).setdefault(at, {})
            for m in MEASURES:
                cell.setdefault(m, []).append(p[m])
            if at != "before":
                gap = p["loss_foil"] - p["loss_studied"]
                cell.setdefault("loss_gain", []).append(gap - gap0[(p["stimuli"], p["k"])])
    return out


def tables(runs: list[dict]) -> str:
    """Markdown: one table per measure, a row per (model, stimuli, k), a column per point
    (mean over runs, in %; ``loss_gain`` in nats, see `_curves`; the number of runs in the last
    column)."""
    curves = _curves(runs)
    if not curves:
        return ""
    points = sorted({a for c in curves.values() for a in c if a != "before"})
    md = []
    for m in MEASURES + ("loss_gain",):
        head = ["model", "stimuli", "k", "before"] + [str(p) for p in points] + ["runs"]
        unit, scale, fmt = ("nats", 1, "{:+.2f}") if m == "loss_gain" else ("%", 100, "{:.0f}")
        md += [f"{m} ({unit}) after n updates of new text", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (model, kind, k), c in sorted(curves.items()):
            cells = [fmt.format(scale * sum(c[a][m]) / len(c[a][m])) if m in c.get(a, {})
                     else "" for a in ["before"] + points]
            n = max(len(v.get(m, ())) for v in c.values())
            md.append("| " + " | ".join([model, kind, str(k)] + cells + [str(n)]) + " |")
        md.append("")
    return "\n".join(md)


def render(runs: list[dict], out_dir) -> tuple[str, str]:
    """Renderer ``retention``: the tables plus one retention plot per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    notes = sorted({n for r in runs
                    if (n := ((r.get("extras") or {}).get("retention") or {}).get("note"))})
    if not curves:  # nothing measured: say why, if the runs said
        return ("### Retention (recognition, recall)\n\n" +
                "".join(f"Note: {n}  \n" for n in notes) if notes else "",
                "<h3>Retention (recognition, recall)</h3>" +
                "".join(f'<p class="note">Note: {html.escape(n)}</p>' for n in notes)
                if notes else "")
    md, frag = ["### Retention (recognition, recall)", ""] + \
        [f"Note: {n}  " for n in notes] + ([""] if notes else []) + [tables(runs)], []
    frag.append("<h3>Retention (recognition, recall)</h3>")
    frag += [f'<p class="note">Note: {html.escape(n)}</p>' for n in notes]
    for model in sorted({key[0] for key in curves}):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
        ks = sorted({key[2] for key in curves if key[0] == model})
        for (name, kind, k), c in sorted(curves.items()):
            if name != model:
                continue
            xs = sorted(a for a in c if a != "before")
            for ax, m in zip(axes, MEASURES):
                ys = [100 * sum(c[a][m]) / len(c[a][m]) for a in xs]
                ax.plot([x + 1 for x in xs], ys, marker="o", ms=3, color=f"C{ks.index(k)}",
                        ls="-" if kind == "fortunes" else "--", label=f"{kind}, k={k}")
        for ax, m in zip(axes, MEASURES):
            ax.set(xscale="log", xlabel="updates after the study + 1", ylabel=f"{m} (%)",
                   ylim=(-5, 105))
            if m == "recognition":
                ax.axhline(50, color="grey", lw=0.8, ls=":")
        legend_outside(axes[-1])
        fig.suptitle(f"{model}: retention of studied sequences (solid: fortunes, dashed: random)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        name = f"retention_{model}.png"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / name).write_bytes(buf.getvalue())
        md += [f"![retention {model}]({name})", ""]
        data = base64.b64encode(buf.getvalue()).decode()
        frag.append(f'<img alt="{html.escape(model)} retention" src="data:image/png;base64,'
                    f'{data}">')
    frag.append("<pre>" + html.escape(tables(runs)) + "</pre>")
    return "\n".join(md), "\n".join(frag)


render.check = check
