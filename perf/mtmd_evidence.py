"""Issue 24 evidence table: market runs (results.json under the given directories) grouped by
model and memory options, each figure as mean ± 95% CI over seeds (Student t, n - 1 degrees of
freedom; "± nan" for one seed).

Figures, all in IC units (daily Pearson IC averaged over a period's test days):
- final IC: mean IC over every period after the last one is learned (the matrix's ACC);
- just-learned IC: mean of R[t, t], each period right after learning it;
- next-period IC: mean of R[t, t + 1], the period not yet seen (the forward figure practitioners
  care about);
- BWT and forgetting (max-based) of the IC matrix; final rank IC; memory bytes of the model.

    python -m perf.mtmd_evidence runs/multirun [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

MEMORY_KEYS = ("memory", "bank_size", "memory_update", "memory_tasks", "temperature")
MEMORY_DEFAULTS = (True, 96, True, "shared", 1.0)


def label(cfg: dict) -> str:
    """A row name: the model, for MTMD the memory options that differ from the default, and the
    strategy unless it is naive."""
    m = cfg["model"]
    name = m["name"]
    if name == "mtmd":
        opts = [f"{k}={m[k]}" for k, d in zip(MEMORY_KEYS, MEMORY_DEFAULTS) if m.get(k, d) != d]
        name += f" ({', '.join(opts)})" if opts else ""
    strategy = cfg.get("strategy", {}).get("name", "naive")
    return name if strategy == "naive" else f"{name}, {strategy}"


def figures(r: dict) -> dict[str, float]:
    R = r["matrix"]
    T = len(R)
    rank = r.get("extras", {}).get("rank_ic", {}).get("matrix")
    return {
        "final IC": r["metrics"]["acc"],
        "just-learned IC": sum(R[t][t] for t in range(T)) / T,
        "next-period IC": (sum(R[t][t + 1] for t in range(T - 1)) / (T - 1)) if T > 1
        else float("nan"),
        "BWT": r["metrics"]["bwt"],
        "forgetting": r["metrics"]["forgetting"],
        "final rank IC": sum(rank[-1]) / len(rank[-1]) if rank else float("nan"),
        "memory bytes": float(r.get("memory_bytes", [0])[-1]),
    }


def ci95(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def table(paths: list[str]) -> str:
    rows: dict[str, list[dict]] = defaultdict(list)
    for p in paths:
        for f in sorted(Path(p).rglob("results.json")):
            r = json.loads(f.read_text())
            if r.get("status") != "done" or r["stream"].get("kind") != "cross_section":
                continue
            rows[label(r["config"])].append(figures(r))
    keys = ["final IC", "just-learned IC", "next-period IC", "BWT", "forgetting",
            "final rank IC", "memory bytes"]
    out = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name in sorted(rows):
        cells = []
        for k in keys:
            mean, half = ci95([f[k] for f in rows[name]])
            cells.append(f"{mean:.0f}" if k == "memory bytes" else f"{mean:.3f} ± {half:.3f}")
        out.append(f"| {name} | {len(rows[name])} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    text = table(args.paths)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
