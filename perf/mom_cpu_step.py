"""CPU time of one training step (forward, backward, AdamW step) of the sequence backbones at
the split_digits and Fashion-MNIST sizes: MoM with shared routing and task-routed against the
equal-parameter ``transformer`` backbone (and ``gdn``, one memory), side by side.

Each backbone is built from its preset (conf/model/<name>.yaml, through the registry, as
``cltk run model=<name>`` builds it) inside a one-head classifier, with random images, labels
and task ids (5 tasks) at batch 32. The backbones take turns step by step, so a change of load
on a shared machine hits them alike; the figure is the best of ``--repeats`` steps in CPU time
of this process (``--clock wall`` for wall-clock), at one thread by default.

    python -m perf.mom_cpu_step

On a GPU (``--device cuda``, wall-clock with synchronisation; ``--dtype bfloat16`` runs the
forward under autocast) the MoM rows take the Triton path, and the variant ``mom shared, fla``
puts fla's MomAttention (https://github.com/fla-org/flash-linear-attention) into the same
block in place of our MoM layer (reported as unavailable where fla is not installed):

    python -m perf.mom_cpu_step --device cuda --dtype bfloat16 \
        --variants transformer "mom shared" "mom task-routed" "mom shared, fla"
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from cl_toolkit import registry
from cl_toolkit.models import Classifier

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SIZES = {"split_digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
VARIANTS = {  # row name -> (preset, overrides)
    "transformer": ("transformer", {}),
    "gdn": ("gdn", {}),
    "mom shared": ("mom", {}),
    "mom task-routed": ("mom", {"task_routing": True}),
    "mom shared, fla": ("mom", {}),  # fla's MomAttention as the mixer (GPU only)
}
DEFAULT_VARIANTS = ["transformer", "gdn", "mom shared", "mom task-routed"]
NUM_TASKS, NUM_CLASSES = 5, 10


def preset(name: str) -> dict:
    """The model keys of conf/model/<name>.yaml that the backbone builder takes."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return {k: v for k, v in cfg.items() if k not in ("name", "heads")}


class FlaMixer(nn.Module):
    """fla's MomAttention behind the block's mixer call (x, mask, cache, use_cache) -> (y, aux,
    cache); its router's auxiliary loss is not added (it comes back as logits)."""

    def __init__(self, hidden_size: int, num_heads: int, num_memories: int, topk: int):
        super().__init__()
        from fla.layers.mom import MomAttention
        self.layer = MomAttention(hidden_size=hidden_size, head_dim=hidden_size // num_heads,
                                  num_heads=num_heads, expand_v=1, num_memories=num_memories,
                                  topk=topk, shared_mem=True)

    def forward(self, x, memory_mask=None, cache=None, use_cache=False):
        return self.layer(x)[0], x.new_zeros(()), None


def make_step(variant: str, shape, batch: int, seed: int, device="cpu",
              dtype=torch.float32, patch_size=None):
    """A closure running one training step, and the model's parameter count."""
    name, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    kw = {**preset(name), **overrides}
    if patch_size is not None:
        kw["patch_size"] = patch_size
    if kw.get("task_routing"):
        kw["num_tasks"] = NUM_TASKS
    backbone = registry.build("model", name, shape, **kw)
    if variant.endswith(", fla"):
        for block in backbone.blocks:
            block.mixer = FlaMixer(kw["hidden_size"], kw["num_heads"], kw["num_memories"],
                                   kw["topk"])
    model = Classifier(backbone, NUM_CLASSES).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(shape), generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    t = torch.randint(0, NUM_TASKS, (batch,), generator=gen).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x, t).float(), y)
            aux = getattr(model.backbone, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--patch-size", type=int, default=None,
                   help="override the presets' patch size (1: one token per pixel)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if dev.type == "cuda":
        args.clock = "wall"

    def clock():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.process_time() if args.clock == "cpu" else time.perf_counter()
    if "transformer" not in args.variants:
        args.variants.insert(0, "transformer")
    print(f"training step on {dev} ({args.dtype}), batch {args.batch}, {args.threads} "
          f"thread(s), best of {args.repeats} ({args.clock} time)\n")
    print("| size | backbone | tokens | parameters | ms/step | vs transformer |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        shape = SIZES[size]
        steps, info, missing = {}, {}, {}
        for v in args.variants:
            try:
                steps[v], info[v] = make_step(v, shape, args.batch, 0, dev, dtype,
                                             args.patch_size)
            except ImportError as exc:  # fla's MomAttention where fla is not installed
                missing[v] = f"{type(exc).__name__}: {exc}"
                continue
            steps[v]()  # warm-up
        best = {v: float("inf") for v in steps}
        for _ in range(args.repeats):
            for v, step in steps.items():
                t0 = clock()
                step()
                best[v] = min(best[v], clock() - t0)
        tokens = registry.build("model", "mom", shape, **preset("mom")).num_tokens
        if args.patch_size:
            tokens = (shape[1] // args.patch_size) * (shape[2] // args.patch_size)
        for v in args.variants:
            if v in missing:
                print(f"| {size} {shape[1]}x{shape[2]} | {v} | {tokens} | - | n/a "
                      f"({missing[v]}) | - |", flush=True)
                continue
            print(f"| {size} {shape[1]}x{shape[2]} | {v} | {tokens} | {info[v]:,} | "
                  f"{1e3 * best[v]:.1f} | {best[v] / best['transformer']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
