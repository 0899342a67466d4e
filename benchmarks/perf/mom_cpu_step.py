"""CPU time of one training step (forward, backward, AdamW step) of the sequence backbones at
the split_digits and Fashion-MNIST sizes: MoM with shared routing and task-routed against the
equal-parameter ``transformer`` backbone (and ``gdn``, one memory), side by side.

Each backbone is built from its preset (conf/model/<name>.yaml, through the registry, as
``cltk run model=<name>`` builds it) inside a one-head classifier, with random images, labels
and task ids (5 tasks) at batch 32. The backbones take turns step by step, so a change of load
on a shared machine hits them alike; the figure is the best of ``--repeats`` steps in CPU time
of this process (``--clock wall`` for wall-clock), at one thread by default.

    python -m cl_toolkit.benchmarks.perf.mom_cpu_step
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from cl_toolkit import registry
from cl_toolkit.models import Classifier

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
SIZES = {"split_digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
VARIANTS = {  # row name -> (preset, overrides)
    "transformer": ("transformer", {}),
    "gdn": ("gdn", {}),
    "mom shared": ("mom", {}),
    "mom task-routed": ("mom", {"task_routing": True}),
}
NUM_TASKS, NUM_CLASSES = 5, 10


def preset(name: str) -> dict:
    """The model keys of conf/model/<name>.yaml that the backbone builder takes."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return {k: v for k, v in cfg.items() if k not in ("name", "heads")}


def make_step(name: str, overrides: dict, shape, batch: int, seed: int):
    """A closure running one training step, and the model's parameter count."""
    torch.manual_seed(seed)
    kw = {**preset(name), **overrides}
    if kw.get("task_routing"):
        kw["num_tasks"] = NUM_TASKS
    model = Classifier(registry.build("model", name, shape, **kw), NUM_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(shape), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    t = torch.randint(0, NUM_TASKS, (batch,), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x, t), y)
        aux = getattr(model.backbone, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if "transformer" not in args.variants:
        args.variants.insert(0, "transformer")
    print(f"training step, batch {args.batch}, {args.threads} thread(s), best of "
          f"{args.repeats} ({args.clock} time)\n")
    print("| size | backbone | tokens | parameters | ms/step | vs transformer |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        shape = SIZES[size]
        steps, info = {}, {}
        for v in args.variants:
            name, over = VARIANTS[v]
            steps[v], n_params = make_step(name, over, shape, args.batch, seed=0)
            info[v] = n_params
            steps[v]()  # warm-up
        best = {v: float("inf") for v in steps}
        for _ in range(args.repeats):
            for v, step in steps.items():
                t0 = clock()
                step()
                best[v] = min(best[v], clock() - t0)
        p_ = registry.build("model", "mom", shape, **preset("mom")).patch_size
        tokens = (shape[1] // p_) * (shape[2] // p_)
        for v in args.variants:
            print(f"| {size} {shape[1]}x{shape[2]} | {v} | {tokens} | {info[v]:,} | "
                  f"{1e3 * best[v]:.1f} | {best[v] / best['transformer']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
