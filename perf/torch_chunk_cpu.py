"""CPU time of the torch chunk path (the CPU fast path of both memory ops), forward and
forward+backward, with the naive token loop as the yardstick measured in the same run, and of
a MoM layer on top of it.

MoM backbones train on CPU through this path, and its backward used to grow quadratically
with T (see ``kernels/common/chunk_torch.py``), so the long sizes matter. Best of ``--repeats``.

    python -m perf.torch_chunk_cpu
"""
from __future__ import annotations

import argparse

import torch

from perf.timing import best_seconds
from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule
from cl_toolkit.layers.mom import MoMLayer

SIZES = [(4, 256, 4, 64), (2, 1024, 4, 64), (1, 4096, 2, 64)]


def inputs(B: int, T: int, H: int, D: int, gen: torch.Generator):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, T, H, generator=gen) * 0.1
    beta = torch.rand(B, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"gated delta rule, fp32, {args.threads} thread(s), best of {args.repeats}\n")
    print("| (B, T, H, D) | path | forward (ms) | forward + backward (ms) |")
    print("|---|---|---|---|")
    for size in SIZES:
        xs = inputs(*size, gen)
        paths = ["torch"] + (["naive"] if size[1] <= 256 else [])
        for backend in paths:
            def fwd():
                return chunk_gated_delta_rule(*xs, backend=backend)[0]

            def fwd_bwd():
                fwd().sum().backward()

            print(f"| {size} | {backend} | {1e3 * best_seconds(fwd, args.repeats):.1f} | "
                  f"{1e3 * best_seconds(fwd_bwd, args.repeats):.1f} |", flush=True)
    torch.manual_seed(0)
    layer = MoMLayer(256, num_heads=4, num_memories=4, topk=2, backend="torch")
    x = torch.randn(4, 256, 256, generator=gen, requires_grad=True)

    def mom_fwd_bwd():
        y, aux, _ = layer(x)
        (y.sum() + aux).backward()

    with torch.no_grad():
        mom_fwd = 1e3 * best_seconds(lambda: layer(x), args.repeats)
    print(f"| (4, 256), MoM layer, hidden 256, 4 heads, 4 memories top-2 + shared | torch | "
          f"{mom_fwd:.1f} | {1e3 * best_seconds(mom_fwd_bwd, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
