"""MoM evidence: the router doing the partitioning. Does a MoM whose router picks among each
task's memories (and, task-free, infers the task itself) forget less than the baselines at
equal parameters? Runs every (stream, row, seed) that has no results yet and prints one
markdown table per stream (mean +- 95 % t-interval over seeds), with transient forgetting and,
for the routed rows, the router's task inference after every task.

    python -m perf.mom_evidence --run --streams digits_til digits_cil --seeds 0 1 2 \
        --out runs/mom_evidence

Routed rows: 2 memories per task, top-1 (``ROUTED``): the router chooses inside the block.
At hidden 64 that model has 257k parameters, so the routed rows shrink to hidden 48 with the
SwiGLU width set to match the 166.8k of the baselines (``EQUAL_PARAMS``; printed in the
params column). "task-free" rows train the router with the task id through the routing loss
and route without it at test time (``model.task_free=true``); they run on class-il streams.

Every run goes through ``python -m perf.mom_evidence --one DIR -- OVERRIDES``: the config as
``cltk run OVERRIDES`` composes it, validated the same way, run by ``cl_toolkit.runner.run``
with an ``after_task`` hook that writes ``router.json`` beside ``results.json`` for routed
models: per task j after every task, the router's task inference on j's test set
(``SequenceModel.router_task_inference``) and the accuracy of the same model with oracle task
ids at test time (``SequenceModel.oracle_routing``: the parameter-isolation upper bound).
`cltk run` records the sample-level figures of both in ``results["extras"]``
(``router_task_inference``, ``oracle_routing``); router.json adds the token-level ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from cl_toolkit.probes import retention_metrics

STREAMS = {
    "digits_til": ["experiment=mom_split_digits"],
    "digits_cil": ["experiment=mom_split_digits", "benchmark.scenario=class-il"],
    "pfmnist_dil": ["experiment=mom_permuted_fashion_mnist", "benchmark.scenario=domain-il"],
    "pfmnist": ["experiment=mom_permuted_fashion_mnist"],
    "sfmnist": ["experiment=mom_split_fashion_mnist"],
}
TASK_IL = {"digits_til", "pfmnist", "sfmnist"}
MLP = ["model=mlp", "model.hidden=[WIDTH,WIDTH]"]
# 166k / 169k parameters, like the presets
WIDTH = {"digits_til": 376, "digits_cil": 376, "pfmnist": 176, "sfmnist": 176,
         "pfmnist_dil": 176}
# 2 memories per task, top-1, at hidden 48 (2 heads of 24): SwiGLU inner width 160 without the
# shared memory, 124 with it, so that both match the 166.8k-parameter baselines on digits.
ROUTED = ["model=mom", "model.task_routing=true", "model.memories_per_task=2", "model.topk=1",
          "model.hidden_size=48"]
EQUAL_PARAMS = ["model.mlp_ratio=3.34"]
EQUAL_PARAMS_SHARED = ["model.shared_memory=true", "model.mlp_ratio=2.59"]
FREE = ["model.task_free=true", "model.routing_loss_weight=1.0"]
# in training too the router's own choice (the task id sets only the routing loss's target)
ROUTER_TRAINED = ["model.task_free_training=router"]
SAMPLE = ["model.route_per=sample"]  # one routing choice per sample: its tokens' mean logits
ROWS = {
    "MLP naive": MLP,
    "transformer naive": ["model=transformer"],
    "gdn naive": ["model=gdn"],
    "MoM shared naive": ["model=mom"],
    "MoM routed (task ids at test)": ROUTED + EQUAL_PARAMS,
    "MoM routed + shared memory": ROUTED + EQUAL_PARAMS_SHARED,
    # RESULTS 6.4's rows: one memory per task, top-1, hidden 64 (no routing choice)
    "MoM routed 1/task, no choice": ["model=mom", "model.task_routing=true",
                                     "model.memories_per_task=1", "model.topk=1"],
    "MoM task-free": ROUTED + EQUAL_PARAMS + FREE,
    "MoM task-free + shared memory": ROUTED + EQUAL_PARAMS_SHARED + FREE,
    "MoM task-free + replay 200": ROUTED + EQUAL_PARAMS + FREE +
    ["strategy=replay", "strategy.buffer_size=200"],
    "MoM task-free, joint training": ROUTED + EQUAL_PARAMS + FREE + ["strategy=joint"],
    "MoM task-free per sample": ROUTED + EQUAL_PARAMS + FREE + SAMPLE,
    "MoM task-free per sample + replay 200": ROUTED + EQUAL_PARAMS + FREE + SAMPLE +
    ["strategy=replay", "strategy.buffer_size=200"],
    "MoM task-free per sample, joint training": ROUTED + EQUAL_PARAMS + FREE + SAMPLE +
    ["strategy=joint"],
    "MoM task-free, router-trained": ROUTED + EQUAL_PARAMS + FREE + ROUTER_TRAINED,
    "MoM task-free, router-trained + replay 200": ROUTED + EQUAL_PARAMS + FREE +
    ROUTER_TRAINED + ["strategy=replay", "strategy.buffer_size=200"],
    "MoM task-free, router-trained, joint training": ROUTED + EQUAL_PARAMS + FREE +
    ROUTER_TRAINED + ["strategy=joint"],
    "MoM shared + replay 200": ["model=mom", "strategy=replay", "strategy.buffer_size=200"],
    "MoM shared + replay, equal memory": ["model=mom", "strategy=replay",
                                          "strategy.buffer_size=EQUAL"],
    "MLP replay, equal memory": MLP + ["strategy=replay", "strategy.buffer_size=EQUAL"],
}
ORACLE_ROWS = ["MoM routed (task ids at test)", "MoM routed + shared memory"]
FREE_ROWS = [r for r, o in ROWS.items() if "model.task_free=true" in o]
# What each stream runs (class-il and domain-il cannot take oracle routing at test time).
PLAN = {
    "digits_til": ["MLP naive", "transformer naive", "gdn naive", "MoM shared naive",
                   *ORACLE_ROWS, "MoM routed 1/task, no choice", "MoM task-free",
                   "MoM task-free + shared memory",
                   "MLP replay, equal memory"],
    "digits_cil": ["MLP naive", "MoM shared naive", *FREE_ROWS, "MoM shared + replay 200",
                   "MoM shared + replay, equal memory", "MLP replay, equal memory"],
    "pfmnist_dil": ["MLP naive", "MoM shared naive", "MoM task-free",
                    "MoM task-free, router-trained"],
    "pfmnist": ["MLP naive", "MoM shared naive", *ORACLE_ROWS[:1], "MoM task-free"],
    "sfmnist": ["MLP naive", "MoM shared naive", *ORACLE_ROWS[:1], "MoM task-free"],
}


def compose(overrides: list[str]) -> dict:
    """The plain config that ``cltk run OVERRIDES`` would run."""
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        return OmegaConf.to_container(hydra_compose("config", overrides), resolve=True)


def equal_memory_buffer(stream_overrides: list[str]) -> int:
    """Samples whose bytes (x float32, y and t int64) match the routed MoM's memory_bytes()."""
    from cl_toolkit.runner import build_model, build_stream

    cfg = compose(stream_overrides + ROUTED + EQUAL_PARAMS + ["benchmark.scenario=task-il"])
    stream = build_stream(cfg)
    model = build_model(cfg, stream)
    sample = math.prod(stream.input_shape) * 4 + 16
    return math.ceil(model.memory_bytes() / sample)


def router_hook(run_dir: Path, eval_bs: int = 1024):
    """``after_task`` hook: router.json with, per task j after every task, the router's task
    inference and the accuracy under oracle routing (routed models only)."""
    import torch

    record: dict = {"token": [], "sample": [], "predicted": [], "memory_share": [],
                    "oracle_matrix": []}

    def hook(strategy, task):
        backbone = getattr(strategy.model, "backbone", None)
        if not getattr(backbone, "task_routing", False):
            return
        stream, dev = strategy.stream, strategy.ctx.device
        rows = {k: [] for k in record}
        for other in stream:
            x = other.test.x.to(dev)
            stats = backbone.router_task_inference(x, other.index)
            for k in ("token", "sample", "predicted", "memory_share"):
                rows[k].append(stats[k])
            with torch.no_grad(), backbone.oracle_routing():
                strategy.model.eval()
                correct = 0
                for s in range(0, x.shape[0], eval_bs):
                    xb = x[s:s + eval_bs]
                    t = torch.full((xb.shape[0],), other.index, dtype=torch.long, device=dev)
                    logits = strategy.model.classify(backbone(xb, t),
                                                     t if stream.task_il else None)
                    correct += int((logits.argmax(-1).cpu() == other.test.y[s:s + eval_bs])
                                   .sum())
            rows["oracle_matrix"].append(correct / x.shape[0])
        for k in record:
            record[k].append(rows[k])
        (run_dir / "router.json").write_text(json.dumps(
            {"after_task": task.index, **record,
             "measures": "token: share of (layer, token) routes in the task's block; sample: "
                         "share of samples whose majority block is the task's; predicted: "
                         "samples per majority task; oracle_matrix: accuracy of the same "
                         "model routed by the true task id at test time (isolation bound)"}))

    return hook


def run_one(run_dir: Path, overrides: list[str]) -> None:
    from cl_toolkit.runner import run
    from cl_toolkit.strategy import Hooks
    from cl_toolkit.validation import check_config

    cfg = compose(overrides)
    check_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run(cfg, run_dir, hooks=Hooks(after_task=[router_hook(run_dir)]))
    m = results["metrics"]
    print(f"ACC {m['acc']:.3f} forgetting {m['forgetting']:.3f} -> {run_dir}", flush=True)


def run_dir(out: Path, stream: str, row: str, seed: int) -> Path:
    name = row.replace(" ", "_").replace(",", "").replace("+", "plus").replace("(", "") \
        .replace(")", "")
    return out / stream / name / f"seed{seed}"


def overrides(stream: str, row: str, seed: int, buffer: int) -> list[str]:
    return [o.replace("EQUAL", str(buffer)).replace("WIDTH", str(WIDTH[stream]))
            for o in STREAMS[stream] + ROWS[row]] + [
        f"seed={seed}", "threads=1", "quiet=true", "overwrite=true"]


def command(stream: str, row: str, seed: int, out: Path, buffer: int) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "perf.mom_evidence", "--one",
            str(run_dir(out, stream, row, seed)), "--", *overrides(stream, row, seed, buffer)]


def mean_ci(vals: list[float], digits: int = 3) -> str:
    """mean +- the half-width of the 95 % t-interval (n - 1 degrees of freedom)."""
    m, half = retention_metrics.mean_ci(vals)
    return f"{m:.{digits}f}" if half is None else f"{m:.{digits}f} ± {half:.{digits}f}"


def matrix_metrics(R: list[list[float]]) -> dict:
    from cl_toolkit import metrics

    """Final and transient forgetting of one score matrix: transient = the mean over the tasks
    before the last of their largest drop after learning; largest drop = the max of those;
    worst after learning = the mean over the same tasks of their lowest score once learned."""
    worst = metrics.worst_after_learning(R)[:-1]
    return {"acc": metrics.accuracy(R), "forgetting": metrics.forgetting(R),
            "transient": metrics.transient_forgetting(R),
            "largest_drop": max(metrics.largest_drop_per_task(R)[:-1]),
            "worst_after": statistics.mean(worst), "learning_acc": metrics.learning_accuracy(R)}


def load(out: Path, stream: str, row: str, seeds: list[int]) -> list[tuple[dict, dict | None]]:
    runs = []
    for seed in seeds:
        d = run_dir(out, stream, row, seed)
        path = d / "results.json"
        if path.exists():
            r = json.loads(path.read_text())
            if r.get("status") == "done":
                router = d / "router.json"
                runs.append((r, json.loads(router.read_text()) if router.exists() else None))
    return runs


HEAD = ("| row | ACC | forgetting | transient forgetting | largest drop | "
        "worst after learning, mean | learning acc | params | memory (kB) | "
        "router task inference (final) | train s / task | seeds |")


def table(out: Path, stream: str, seeds: list[int]) -> str:
    lines = [HEAD, "|---" * 12 + "|"]
    curves = []
    for row in PLAN[stream]:
        runs = load(out, stream, row, seeds)
        if not runs:
            lines.append(f"| {row} | not run |" + " |" * 10)
            continue
        ms = [matrix_metrics(r["matrix"]) for r, _ in runs]
        col = lambda k: mean_ci([m[k] for m in ms])  # noqa: E731
        routers = [rt for _, rt in runs if rt is not None and rt["sample"]]
        free = row in FREE_ROWS
        router = (mean_ci([statistics.mean(rt["sample"][-1]) for rt in routers])
                  if free and routers else "-")
        r0 = runs[0][0]
        lines.append(
            f"| {row} | {col('acc')} | {col('forgetting')} | {col('transient')} | "
            f"{col('largest_drop')} | {col('worst_after')} | {col('learning_acc')} | "
            f"{r0['model_params']} | {r0['memory_bytes'][-1] / 1000:.0f} | {router} | "
            f"{mean_ci([statistics.mean(r['timings']['train_s']) for r, _ in runs], 1)} | "
            f"{len(runs)} |")
        if free and len(routers) == len(runs):
            om = [matrix_metrics(rt["oracle_matrix"]) for rt in routers]
            ocol = lambda k: mean_ci([m[k] for m in om])  # noqa: E731
            label = ("routed by the true task id at test (not a bound: trained without it)"
                     if "model.task_free_training=router" in ROWS[row] else
                     "oracle task ids at test (isolation upper bound)")
            lines.append(
                f"| ↳ same runs, {label} | "
                f"{ocol('acc')} | {ocol('forgetting')} | {ocol('transient')} | "
                f"{ocol('largest_drop')} | {ocol('worst_after')} | {ocol('learning_acc')} | "
                f"{r0['model_params']} | {r0['memory_bytes'][-1] / 1000:.0f} | 1 (given) | - | "
                f"{len(runs)} |")
            curves.append((row, routers))
    if curves:
        T = len(curves[0][1][0]["sample"])
        lines += ["", "Router task inference, sample majority (token share in brackets): mean "
                  "over the tasks seen so far after each task, and the share of all test "
                  "samples routed to the latest task's block.", "",
                  "| row | " + " | ".join(f"after task {t}" for t in range(T)) +
                  " | final, per task | samples to the latest task (final) |",
                  "|---" * (T + 3) + "|"]
        for row, routers in curves:
            cells = []
            for t in range(T):
                s = [statistics.mean(rt["sample"][t][:t + 1]) for rt in routers]
                k = [statistics.mean(rt["token"][t][:t + 1]) for rt in routers]
                cells.append(f"{mean_ci(s, 2)} ({statistics.mean(k):.2f})")
            final = [statistics.mean(rt["sample"][-1][j] for rt in routers) for j in range(T)]
            latest = [sum(p[-1] for p in rt["predicted"][-1]) /
                      sum(sum(p) for p in rt["predicted"][-1]) for rt in routers]
            lines.append(f"| {row} | " + " | ".join(cells) +
                         f" | {' / '.join(f'{v:.2f}' for v in final)} | {mean_ci(latest, 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one"]:
        run_one(Path(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mom_evidence"))
    ap.add_argument("--streams", nargs="+", default=["digits_til", "digits_cil"],
                    choices=list(STREAMS))
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                    help="default: the stream's plan (PLAN)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--run", action="store_true", help="run what has no results yet")
    ap.add_argument("--print-commands", action="store_true",
                    help="print the cltk command of every run instead of running it")
    args = ap.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stream in args.streams:
        rows = [r for r in (args.rows or PLAN[stream]) if r in PLAN[stream]]
        if args.run or args.print_commands:
            buffer = equal_memory_buffer(STREAMS[stream])
            for seed in args.seeds:
                for row in rows:
                    if args.print_commands:
                        print("cltk run " + " ".join(overrides(stream, row, seed, buffer)))
                        continue
                    if (run_dir(args.out, stream, row, seed) / "results.json").exists():
                        continue
                    cmd = command(stream, row, seed, args.out, buffer)
                    print(" ".join(cmd[7:]), flush=True)
                    subprocess.run(cmd, env=env, check=False)
        if not args.print_commands:
            print(f"\n### {stream}\n\n{table(args.out, stream, args.seeds)}", flush=True)


if __name__ == "__main__":
    main()
