"""CPU time of one training step (forward, backward, AdamW step) of the sequence backbones at
the split_digits and Fashion-MNIST sizes: MoM with shared routing and the routed configurations
of the evidence (perf/mom_evidence.py: 2 memories per task, top-1, hidden 48, with and without
the shared memory, task-routed and task-free with its routing loss) against the
equal-parameter ``transformer`` backbone, ``gdn`` (one memory) and a plain
``torch.nn.TransformerEncoder`` of equal parameters (patch embedding, position embedding, mean
readout; its feed-forward width is solved for the transformer preset's parameter count).

Each backbone is built from its preset (conf/model/<name>.yaml, through the registry, as
``cltk run model=<name>`` builds it, plus the row's overrides) inside a one-head classifier,
with random images and labels at batch 32. Batches are single-task, as every training batch of
the evidence's naive runs (task 2 of 5; ``--task-ids mixed`` draws a task per sample, as the
replayed part of a batch would). The backbones take turns step by step, so a change of load on
a shared machine hits them alike; the figure is the best of ``--repeats`` steps in CPU time of
this process (``--clock wall`` for wall-clock), at one thread by default.

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
ROUTED = {"task_routing": True, "memories_per_task": 2, "topk": 1, "hidden_size": 48,
          "mlp_ratio": 3.34}  # = perf/mom_evidence.py ROUTED + EQUAL_PARAMS
VARIANTS = {  # row name -> (preset, overrides)
    "transformer": ("transformer", {}),
    "torch TransformerEncoder": ("transformer", {}),  # `TorchEncoder`, sized like the preset
    "gdn": ("gdn", {}),
    "mom shared": ("mom", {}),
    "mom routed 2/task top-1": ("mom", ROUTED),
    "mom routed 2/task top-1 + shared memory": ("mom", {**ROUTED, "shared_memory": True,
                                                        "mlp_ratio": 2.59}),
    "mom task-free 2/task top-1": ("mom", {**ROUTED, "task_free": True,
                                           "routing_loss_weight": 1.0}),
    "mom task-routed": ("mom", {"task_routing": True}),  # the 2x2 preset default (257k)
    "mom shared, fla": ("mom", {}),  # fla's MomAttention as the mixer (GPU only)
}
DEFAULT_VARIANTS = ["transformer", "torch TransformerEncoder", "gdn", "mom shared",
                    "mom routed 2/task top-1", "mom routed 2/task top-1 + shared memory",
                    "mom task-free 2/task top-1"]
NUM_TASKS, NUM_CLASSES, TASK = 5, 10, 2


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


class TorchEncoder(nn.Module):
    """A plain ``torch.nn.TransformerEncoder`` image backbone: p x p patches, a linear
    embedding, a learned position embedding, ``num_layers`` post-norm encoder layers (ReLU
    feed-forward of width ``ff``), the mean over tokens."""

    def __init__(self, shape, hidden: int, heads: int, layers: int, ff: int, patch: int):
        super().__init__()
        C, H, W = shape
        self.patch, self.feat_dim = patch, hidden
        self.embed = nn.Linear(C * patch * patch, hidden)
        self.pos = nn.Parameter(torch.zeros((H // patch) * (W // patch), hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        h = self.embed(x.reshape(B, (H // p) * (W // p), C * p * p)) + self.pos
        return self.encoder(h).mean(1)


def torch_encoder(shape, kw: dict, target: int) -> TorchEncoder:
    """The TorchEncoder with the preset's width, heads, depth and patch whose feed-forward width
    brings its parameters nearest to ``target`` (the count is linear in that width)."""
    patch = kw.get("patch_size") or (2 if max(shape[1:]) <= 16 else 4)
    make = lambda ff: TorchEncoder(shape, kw["hidden_size"], kw["num_heads"],  # noqa: E731
                                   kw["num_layers"], ff, patch)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    base, slope = count(make(1)), count(make(2)) - count(make(1))
    return make(max(1, 1 + round((target - base) / slope)))


def make_step(variant: str, shape, batch: int, seed: int, device="cpu",
              dtype=torch.float32, patch_size=None, task_ids: str = "single"):
    """A closure running one training step, and the model's parameter count."""
    name, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    kw = {**preset(name), **overrides}
    if patch_size is not None:
        kw["patch_size"] = patch_size
    if kw.get("task_routing"):
        kw["num_tasks"] = NUM_TASKS
    backbone = registry.build("model", name, shape, **kw)
    if variant == "torch TransformerEncoder":
        target = sum(p.numel() for p in backbone.parameters())
        backbone = torch_encoder(shape, kw, target)
    if variant.endswith(", fla"):
        for block in backbone.blocks:
            block.mixer = FlaMixer(kw["hidden_size"], kw["num_heads"], kw["num_memories"],
                                   kw["topk"])
    model = Classifier(backbone, NUM_CLASSES).to(device)
    # The task id goes to a backbone that reads it at test time or in training only
    # (task-free routing: the routing loss needs it).
    takes_t = getattr(backbone, "uses_task_id", False) or \
        getattr(backbone, "trains_with_task_id", False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(shape), generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    t = (torch.full((batch,), TASK) if task_ids == "single" else
         torch.randint(0, NUM_TASKS, (batch,), generator=gen)).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            h = model.backbone(x, t) if takes_t else model.backbone(x)
            loss = F.cross_entropy(model.classify(h).float(), y)
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
    p.add_argument("--task-ids", choices=("single", "mixed"), default="single",
                   help="single: every batch from one task (the evidence's naive runs); "
                        "mixed: a random task per sample")
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
          f"thread(s), best of {args.repeats} ({args.clock} time), {args.task_ids}-task "
          "batches\n")
    print("| size | backbone | tokens | parameters | ms/step | vs transformer |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        shape = SIZES[size]
        steps, info, missing = {}, {}, {}
        for v in args.variants:
            try:
                steps[v], info[v] = make_step(v, shape, args.batch, 0, dev, dtype,
                                             args.patch_size, args.task_ids)
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
