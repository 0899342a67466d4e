"""Accuracy against memory: KCL with growing coresets vs GKCL with growing generators.

The experiment of issue 3 (GKCL's claim, https://arxiv.org/abs/2112.13410, in shape: where the
two curves overlap in bytes, GKCL's ACC is at least KCL's). Runs on rotated or permuted
Fashion-MNIST in KCL's MNIST protocol (task-il, MLP 784-256-256 with dropout 0.5, batch 10, one
epoch per task, lr 0.1 halved per task), on a reduced stream by default so that it finishes on a
CPU in minutes; prints one row per setting: memory_bytes() after the last task, ACC, forgetting.

    python -m cl_toolkit.benchmarks.perf.kcl_memory_curve --tasks 3 --max-train 2000
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cl_toolkit.benchmarks.fashion_mnist import permuted_fashion_mnist, rotated_fashion_mnist
from cl_toolkit.metrics import accuracy, forgetting
from cl_toolkit.models import MLP, Classifier
from cl_toolkit.runner import evaluate, seed_everything
from cl_toolkit.strategies.gkcl import GKCL
from cl_toolkit.strategies.kcl import KCL
from cl_toolkit.strategy import RunContext

# GKCL generator sizes: (encoder widths, latent size).
GENERATORS = {"small": ((32,), 8), "medium": ((128,), 16), "large": ((512,), 32)}


def run_one(stream, strategy, seed: int) -> tuple[float, float | None, int, float]:
    seed_everything(seed)
    model = Classifier(MLP(stream.input_shape, (256, 256), dropout=0.5), stream.num_classes)
    ctx = RunContext(seed=seed, generator=torch.Generator().manual_seed(seed))
    strategy.setup(stream, model, ctx)
    t0, R = time.perf_counter(), []
    for task in stream:
        strategy.learn(task)
        R.append([evaluate(strategy, other, 1024, torch.device("cpu")) for other in stream])
    return accuracy(R), forgetting(R), strategy.memory_bytes(), time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stream", choices=["rotated", "permuted"], default="rotated")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--max-train", type=int, default=2000, help="training samples per task")
    p.add_argument("--max-test", type=int, default=2000, help="test samples per task")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--coresets", default="1,2,5,10,20,50", help="KCL samples per class")
    p.add_argument("--generators", default="small,medium,large",
                   help=f"GKCL sizes among {', '.join(GENERATORS)}")
    p.add_argument("--generator-epochs", type=int, default=30,
                   help="GKCL generator epochs per task (small streams need many)")
    p.add_argument("--kernel", default="rff", help="KCL kernel (GKCL uses linear)")
    p.add_argument("--num-features", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    build = rotated_fashion_mnist if args.stream == "rotated" else permuted_fashion_mnist
    common = dict(epochs=1, batch_size=10, lr=0.1, lr_decay=0.5, momentum=0.8)
    settings = [("kcl", f"coreset {m}/class",
                 lambda m=int(m): KCL(kernel=args.kernel, coreset_per_class=m,
                                      num_features=args.num_features, **common))
                for m in args.coresets.split(",")]
    settings += [("gkcl", f"generator {g} {GENERATORS[g]}",
                  lambda g=g: GKCL(generator_hidden=GENERATORS[g][0], z_dim=GENERATORS[g][1],
                                   generator_epochs=args.generator_epochs, **common))
                 for g in args.generators.split(",")]
    print(f"{args.stream}_fashion_mnist, {args.tasks} tasks, task-il, {args.max_train} train / "
          f"{args.max_test} test per task, {args.seeds} seed(s)")
    print(f"{'method':6} {'setting':34} {'memory (bytes)':>14} {'ACC':>14} {'forgetting':>14} "
          f"{'time (s)':>9}")
    for method, label, make in settings:
        rows = []
        for seed in range(args.seeds):
            stream = build(n_tasks=args.tasks, scenario="task-il", seed=seed,
                           max_train_per_task=args.max_train, max_test_per_task=args.max_test)
            rows.append(run_one(stream, make(), seed))
        acc, fgt, mem, sec = (np.array([r[i] for r in rows], dtype=float) for i in range(4))
        print(f"{method:6} {label:34} {int(mem.mean()):>14,d} {acc.mean():>7.4f}±{acc.std():.4f}"
              f" {np.nanmean(fgt):>7.4f}±{np.nanstd(fgt):.4f} {sec.mean():>9.1f}", flush=True)


if __name__ == "__main__":
    main()
