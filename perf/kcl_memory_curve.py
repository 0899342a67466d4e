"""Accuracy against memory: KCL with growing coresets vs GKCL with growing generators.

Issue 3, the GKCL paper's claim in shape (https://arxiv.org/abs/2112.13410): where the two curves
overlap in bytes, GKCL's ACC is at least KCL's. Both methods run with the settings of
``experiment=kcl_<stream>_fashion_mnist`` / ``gkcl_<stream>_fashion_mnist`` (KCL's MNIST
protocol: task-il, MLP 784-256-256 with dropout 0.5, batch 10, one epoch per task, lr 0.1 halved
per task), reduced by the flags below; only the coreset size and the generator size change.

Every run is written atomically to ``--out`` as one JSON file as soon as it ends, and a rerun
skips the runs already there, so a killed sweep loses only the run in progress and two processes
with disjoint ``--coresets`` / ``--generators`` can share the cores. At the end (or with
``--plot`` alone) the script reads every run in ``--out`` and writes ``memory_curve.png`` and
``memory_curve.md``: one row per setting (memory_bytes() after the last task, ACC, forgetting)
and, for each GKCL point, KCL's ACC at the same bytes (interpolated in log-bytes between the two
nearest coreset sizes) with the difference.

    python -m perf.kcl_memory_curve --out /tmp/curve
    python -m perf.kcl_memory_curve --out /tmp/curve --smoke
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from cl_toolkit import registry
from perf.kcl_vs_avalanche import experiment, run_method
from cl_toolkit.errors import ConfigError
from cl_toolkit.metrics import accuracy, backward_transfer, forgetting
from cl_toolkit.runner import build_stream
from cl_toolkit.store import atomic_write_bytes, atomic_write_json

# GKCL generator sizes in feature space (256-d features): (hidden widths, latent size).
# "medium" is the experiment config's generator.
GENERATORS = {"small": ([128], 16), "medium": ([400], 32), "large": ([1000], 64)}


def run_settings(args) -> list[tuple[str, str, list[str]]]:
    """(method, setting label, Hydra overrides) for every point of the two curves."""
    settings = [("kcl", f"coreset {m}/class", [f"strategy.coreset_per_class={m}"])
                for m in _split(args.coresets)]
    for g in _split(args.generators):
        if g not in GENERATORS:
            raise ConfigError(
                f"unknown generator size {g!r}; choose among {', '.join(GENERATORS)}.")
        hidden, z = GENERATORS[g]
        over = [f"strategy.generator_hidden={hidden}", f"strategy.z_dim={z}"]
        if args.generator_epochs is not None:
            over.append(f"strategy.generator_epochs={args.generator_epochs}")
        extra = _split(args.gkcl_overrides)
        label = ", ".join([f"generator {g} (hidden {hidden}, z {z})", *extra])
        settings.append(("gkcl", label, over + extra))
    return settings


def _split(csv: str) -> list[str]:
    return [s for s in csv.split(",") if s]


def run_one(args, method: str, overrides: list[str], seed: int) -> dict:
    reduce = [f"benchmark.n_tasks={args.tasks}", f"benchmark.max_train_per_task={args.max_train}",
              f"benchmark.max_test_per_task={args.max_test}"]
    cfg = experiment(f"{method}_{args.stream}_fashion_mnist", reduce + overrides)
    kwargs = {k: v for k, v in cfg["strategy"].items() if k != "name"}
    stream = build_stream({**cfg, "seed": seed})
    strategy, R, train_s, wall_s = run_method(
        stream, cfg["model"], lambda s: registry.build("strategy", method, **kwargs), seed)
    return {"memory_bytes": strategy.memory_bytes(), "acc": accuracy(R),
            "bwt": backward_transfer(R), "forgetting": forgetting(R), "R": R,
            "train_s": train_s, "wall_s": wall_s, "strategy": cfg["strategy"]}


def kcl_at(kcl: list[tuple[float, float]], nbytes: float) -> float | None:
    """KCL's ACC at ``nbytes``, linear in log-bytes between the two nearest measured points;
    None outside the measured range (no extrapolation)."""
    pts = sorted(kcl)
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
        if b0 <= nbytes <= b1:
            span = math.log(b1) - math.log(b0)
            w = 0.0 if span == 0 else (math.log(nbytes) - math.log(b0)) / span
            return a0 + w * (a1 - a0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == nbytes else None


def summarize(out: Path) -> tuple[list[dict], dict | None, str]:
    """Mean ± std (ddof 0) over seeds of every setting in ``out``, the protocol they ran with,
    and the markdown report."""
    runs: dict[tuple, list[dict]] = {}
    protocol = None
    for f in sorted(out.glob("run_*.json")):
        r = json.loads(f.read_text())
        protocol = r["protocol"]
        runs.setdefault((r["method"], r["setting"]), []).append(r)
    rows = []
    for (method, setting), rs in runs.items():
        acc = np.array([100 * r["acc"] for r in rs])
        fgt = np.array([100 * (r["forgetting"] or 0.0) for r in rs])
        rows.append({"method": method, "setting": setting, "seeds": sorted(r["seed"] for r in rs),
                     "bytes": float(np.mean([r["memory_bytes"] for r in rs])),
                     "acc": acc.mean(), "acc_std": acc.std(), "fgt": fgt.mean(),
                     "fgt_std": fgt.std(), "train_s": float(np.mean([r["train_s"] for r in rs]))})
    rows.sort(key=lambda r: (r["method"] != "kcl", r["bytes"]))
    kcl = [(r["bytes"], r["acc"]) for r in rows if r["method"] == "kcl"]
    lines = [f"Protocol: {json.dumps(protocol)}", "",
             "| method | setting | seeds | memory (MiB) | ACC (%) | forgetting (%) | "
             "KCL's ACC at these bytes (%) | GKCL - KCL |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = kcl_at(kcl, r["bytes"]) if r["method"] == "gkcl" and kcl else None
        lines.append(
            f"| {r['method']} | {r['setting']} | {','.join(map(str, r['seeds']))} | "
            f"{r['bytes'] / 2**20:.2f} | {r['acc']:.2f} ± {r['acc_std']:.2f} | "
            f"{r['fgt']:.2f} ± {r['fgt_std']:.2f} | "
            + (f"{ref:.2f} | {r['acc'] - ref:+.2f} |" if ref is not None else "| |"))
    return rows, protocol, "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # One line per method and set of --gkcl-overrides (the part of the setting after "), ").
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["method"], r["setting"].partition("), ")[2]), []).append(r)
    for (method, extra), pts in series.items():
        ax.errorbar([r["bytes"] / 2**20 for r in pts], [r["acc"] for r in pts],
                    yerr=[r["acc_std"] for r in pts], marker="o" if method == "kcl" else "s",
                    capsize=3, label=", ".join([method.upper(), *([extra] if extra else [])]))
        for r in pts:
            ax.annotate(r["setting"].split(" (")[0].replace("coreset ", "").replace(
                "generator ", ""), (r["bytes"] / 2**20, r["acc"]), textcoords="offset points",
                xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("memory_bytes() after the last task (MiB, log scale)")
    ax.set_ylabel("ACC (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the runs, the table and the figure")
    p.add_argument("--stream", choices=["rotated", "permuted"], default="rotated")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--max-train", type=int, default=10000, help="training images per task")
    p.add_argument("--max-test", type=int, default=10000, help="test images per task")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--coresets", default="1,2,5,10,20,50", help="KCL samples per class")
    p.add_argument("--generators", default="small,medium,large",
                   help=f"GKCL sizes among {', '.join(GENERATORS)}")
    p.add_argument("--generator-epochs", type=int, default=None,
                   help="GKCL generator epochs per task (default: the experiment config's)")
    p.add_argument("--gkcl-overrides", default="",
                   help="comma-separated Hydra overrides for the GKCL runs, e.g. "
                        "strategy.generator_lr=0.0003 (they become part of the setting's name)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", action="store_true", help="only rebuild the table and the figure")
    p.add_argument("--smoke", action="store_true",
                   help="2 tasks, 300 train / 200 test images, coresets 1,5, small generator "
                        "with 1 epoch (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.max_train, args.max_test = 2, 300, 200
        args.coresets, args.generators, args.generator_epochs = "1,5", "small", 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {"stream": args.stream, "tasks": args.tasks, "max_train": args.max_train,
                "max_test": args.max_test, "generator_epochs": args.generator_epochs}
    if not args.plot:
        torch.set_num_threads(args.threads)
        for method, setting, overrides in run_settings(args):
            for seed in map(int, _split(args.seeds)):
                slug = re.sub(r"[^a-z0-9]+", "-", setting.lower()).strip("-")
                path = out / f"run_{method}_{slug}_seed{seed}.json"
                if path.exists():
                    done = json.loads(path.read_text())
                    if done["protocol"] != protocol:
                        raise ConfigError(
                            f"{path} was run with {done['protocol']}, not {protocol}: use "
                            f"another --out folder or the same flags.")
                    print(f"{method} {setting} seed {seed}: done before, skipped", flush=True)
                    continue
                r = run_one(args, method, overrides, seed)
                atomic_write_json(path, {"method": method, "setting": setting, "seed": seed,
                                         "protocol": protocol, **r})
                print(f"{method} {setting} seed {seed}: {r['memory_bytes']:,} B, "
                      f"ACC {100 * r['acc']:.2f}, {r['train_s']:.0f} s training", flush=True)
    rows, done, table = summarize(out)
    if not rows:
        raise ConfigError(f"no runs in {out}: run without --plot first.")
    atomic_write_bytes(out / "memory_curve.md", table.encode())
    plot(rows, out / "memory_curve.png",
         f"{done['stream']} Fashion-MNIST, task-il, {done['tasks']} tasks, "
         f"{done['max_train']} training images per task")
    print(table)
    print(f"wrote {out / 'memory_curve.md'} and {out / 'memory_curve.png'}")


if __name__ == "__main__":
    main()
