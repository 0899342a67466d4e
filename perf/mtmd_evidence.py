"""Issue 24 evidence table: market runs (results.json under the given directories) grouped by
model and memory options, each figure as mean ± 95% CI over seeds (Student t, n - 1 degrees of
freedom; "± nan" for one seed).

Figures, all in IC units (daily Pearson IC averaged over a period's test days):
- final IC: mean IC over every period after the last one is learned (the matrix's ACC);
- just-learned IC: mean of R[t, t], each period right after learning it;
- next-period IC: mean of R[t, t + 1], the period not yet seen (the forward figure practitioners
  care about);
- BWT and forgetting (max-based) of the IC matrix; final rank IC; memory bytes of the model;
- days 95%: the half-width of a 95% interval of the final IC from its day-to-day variation
  within one run (1.96 x the standard error of the mean over the test days, each period's
  daily IC std recovered as IC / ICIR), averaged over seeds. The seed interval only covers the
  initialisation of one model on one fixed market; on a real stream every seed sees the same
  days, and this is the sampling noise of those days (large on a tiny cross-section).

    python -m perf.mtmd_evidence runs/multirun [--markdown out.md] [--paired mtmd:hist ...]
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from cl_toolkit.probes.retention_metrics import mean_ci

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


def day_half_width(r: dict) -> float:
    """1.96 x the standard error of the final IC over the test days (see the module doc);
    NaN without the ICIR matrix or the test-day counts."""
    R, icir = r["matrix"], r.get("extras", {}).get("icir", {}).get("matrix")
    days = [t.get("test") for t in r["stream"].get("tasks", [])]
    T = len(R)
    if not icir or len(days) != T or not all(days):
        return float("nan")
    var = 0.0
    for ic, ir, n in zip(R[-1], icir[-1], days):
        if ir is None or not math.isfinite(ir) or ir == 0:
            return float("nan")
        var += (ic / ir) ** 2 / n
    return 1.96 * math.sqrt(var) / T


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
        "days 95%": day_half_width(r),
    }


def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, 95 % t-interval half-width); NaN half-width for one value."""
    mean, half = mean_ci(values)
    return mean, float("nan") if half is None else half


def collect(paths: list[str]) -> dict[str, dict]:
    """``{row label: {seed: figures}}`` of the finished market runs under ``paths``."""
    rows: dict[str, dict] = defaultdict(dict)  # keyed by seed (the file if none)
    for p in paths:
        for f in sorted(Path(p).rglob("results.json")):
            r = json.loads(f.read_text())
            if r.get("status") != "done" or r["stream"].get("kind") != "cross_section":
                continue
            rows[label(r["config"])][r["config"].get("seed", str(f))] = figures(r)
    return rows


def paired(paths: list[str], pairs: list[str]) -> str:
    """Per-seed differences ``A - B`` (same seed: same data and, on the synthetic market, the
    same market), mean ± 95% CI; ``pairs`` as ``"A:B"`` row labels."""
    rows = collect(paths)
    keys = ["final IC", "just-learned IC", "next-period IC", "forgetting"]
    out = ["| comparison | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for pair in pairs:
        a, b = pair.split(":")
        seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
        if not seeds:
            raise SystemExit(f"--paired {pair}: no seed has both rows; rows: {sorted(rows)}")
        cells = []
        for k in keys:
            mean, half = ci95([rows[a][s][k] - rows[b][s][k] for s in seeds])
            cells.append(f"{mean:+.3f} ± {half:.3f}")
        out.append(f"| {a} − {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(paths: list[str]) -> str:
    rows = {name: list(by_seed.values()) for name, by_seed in collect(paths).items()}
    keys = ["final IC", "just-learned IC", "next-period IC", "BWT", "forgetting",
            "final rank IC", "memory bytes", "days 95%"]
    out = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name in sorted(rows):
        cells = []
        for k in keys:
            mean, half = ci95([f[k] for f in rows[name]])
            if k == "memory bytes":
                cells.append(f"{mean:.0f}")
            elif k == "days 95%":
                cells.append(f"± {mean:.3f}")
            else:
                cells.append(f"{mean:.3f} ± {half:.3f}")
        out.append(f"| {name} | {len(rows[name])} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--paired", nargs="+", metavar="A:B",
                    help="instead, per-seed differences of row A minus row B, e.g. mtmd:hist")
    args = ap.parse_args(argv)
    text = paired(args.paths, args.paired) if args.paired else table(args.paths)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
