"""Issue 25 evidence table: video segmentation runs (results.json under the given directories)
grouped as the report groups them (config minus the seed; rows labelled by the model and the
keys that differ), each figure the mean ± the half-width of its 95 % t-interval over seeds
(``± -`` for one seed).

Figures (Dice and IoU are means over clips of the per-clip mean over frames and classes):
- final Dice: mean Dice over every task after the last one is learned (the matrix's ACC);
- just-learned Dice: mean of R[t, t], each task right after learning it;
- BWT and forgetting (max-based) of the Dice matrix, in Dice points;
- final HD95 (pixels) and temporal error (points), means over tasks after the last one.

    python -m perf.gdkvm_evidence runs/multirun [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cl_toolkit.probes.retention_metrics import mean_ci
from cl_toolkit.runs import describe_groups, find_results

PERCENT = ("final Dice", "just-learned Dice", "BWT", "forgetting", "final temporal error")


def figures(r: dict) -> dict[str, float]:
    R = r["matrix"]
    T = len(R)
    extras = r.get("extras", {})

    def final(key: str) -> float:
        row = extras.get(key, {}).get("matrix", [[float("nan")]])[-1]
        return sum(row) / len(row)

    return {"final Dice": r["metrics"]["acc"],
            "just-learned Dice": sum(R[t][t] for t in range(T)) / T,
            "BWT": r["metrics"]["bwt"], "forgetting": r["metrics"]["forgetting"],
            "final HD95 (px)": final("hd95"),
            "final temporal error": final("temporal_error")}


def _cell(values: list[float], scale: float) -> str:
    values = [v * scale for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    mean, half = mean_ci(values)
    return f"{mean:.1f} ± {'-' if half is None else f'{half:.1f}'}"


def table(paths: list[str]) -> str:
    runs = [json.loads(p.read_text()) for p in find_results(paths)]
    groups = describe_groups(runs)
    header = ["run", "seeds", *figures(runs[0])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        figs = [figures(r) for r in g["runs"]]
        cells = [_cell([f[k] for f in figs], 100 if k in PERCENT else 1) for k in figs[0]]
        lines.append(f"| {g['label']} | {len(figs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    out = table(args.paths)
    print(out)
    if args.markdown:
        args.markdown.write_text(out + "\n")


if __name__ == "__main__":
    main()
