"""Where does a task-routed MoM forget? Train task 0, then the later tasks, then put back one
group of parameters at a time as it was after task 0 and score task 0 again (issue 16 item 4).

A group whose restoration brings task 0 back is where the forgetting leaks. Groups: the task-0
memories (should not move at all), the shared memory, the shared mixer projections (q, gate,
output), embeddings (patch + position), the block MLPs, the norms, the head.

    python perf/mom_forgetting_leak.py [--benchmark split_digits] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

from cl_toolkit.runner import build_model, build_stream, evaluate, seed_everything
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext


GROUPS = ("task-0 memories", "shared memory", "mixer q/gate/out", "embeddings", "MLPs", "norms",
          "head")


def groups(model) -> dict[str, list[tuple[str, torch.Tensor | None]]]:
    """{group: [(parameter name, row mask or None = all rows)]} over the Classifier."""
    owned = {f"backbone.{n}": rows for n, rows in model.backbone.task_owned().items()}
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        if name in owned:
            out["task-0 memories"].append((name, owned[name] == 0))
            if bool((owned[name] == -1).any()):
                out["shared memory"].append((name, owned[name] == -1))
        elif name.startswith("head."):
            out["head"].append((name, None))
        elif ".mixer." in name:
            out["mixer q/gate/out"].append((name, None))
        elif name.startswith(("backbone.embed", "backbone.pos", "backbone.cls")):
            out["embeddings"].append((name, None))
        elif ".up." in name or ".down." in name:
            out["MLPs"].append((name, None))
        else:
            out["norms"].append((name, None))
    return out


def restored(model, snapshot: dict, parts) -> torch.nn.Module:
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, rows in parts:
            if rows is None:
                params[name].copy_(snapshot[name])
            else:
                params[name][rows] = snapshot[name][rows]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="split_digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-train", type=int, default=None, help="first N train samples/task")
    ap.add_argument("--tasks", type=int, default=None, help="train the first N tasks (all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| {args.benchmark}, seed {args.seed} | task 0 after task 0 | after the last | "
          + " | ".join(f"restore {g}" for g in GROUPS) + " |")
    print("|---" * (len(GROUPS) + 3) + "|")
    for shared in (True, False):
        seed_everything(args.seed)
        stream = build_stream({"benchmark": {"name": args.benchmark, "scenario": "task-il"},
                               "seed": args.seed})
        tasks = list(stream)[:args.tasks]
        if args.max_train:
            tasks = [dataclasses.replace(t, train=t.train.subset(torch.arange(
                min(args.max_train, len(t.train))))) for t in tasks]
        model = build_model({"model": {"name": "mom", "task_routing": True,
                                       "shared_memory": shared}}, stream)
        strategy = Naive(epochs=args.epochs, batch_size=32, lr=1e-3, optimizer="adamw")
        strategy.setup(stream, model, RunContext(generator=torch.Generator().manual_seed(
            args.seed)))
        strategy.learn(tasks[0])
        acc0 = evaluate(strategy, stream[0], 1024, torch.device("cpu"))
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        for task in tasks[1:]:
            strategy.learn(task)
        acc1 = evaluate(strategy, stream[0], 1024, torch.device("cpu"))
        cells = []
        for name, parts in groups(model).items():
            if not parts:
                cells.append("-")
                continue
            probe = copy.copy(strategy)
            probe.model = restored(model, snapshot, parts)
            cells.append(f"{evaluate(probe, stream[0], 1024, torch.device('cpu')):.3f}")
        print(f"| shared_memory={str(shared).lower()} | {acc0:.3f} | {acc1:.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
