"""CPU time of the torch chunk path (the CPU fast path of both memory ops), forward and
forward+backward, with the naive token loop as the yardstick measured in the same run.

MoM backbones train on CPU through this path, and its backward used to grow quadratically
with T (see ``kernels/chunk_torch.py``), so the long sizes matter. Best of ``--repeats``.

    python -m cl_toolkit.benchmarks.perf.torch_chunk_cpu
"""
from __future__ import annotations

import argparse
import time

import torch

from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule

SIZES = [(4, 256, 4, 64), (2, 1024, 4, 64), (1, 4096, 2, 64)]


def inputs(B: int, T: int, H: int, D: int, gen: torch.Generator):
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, T, H, generator=gen) * 0.1
    beta = torch.rand(B, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


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

            print(f"| {size} | {backend} | {best_ms(fwd, args.repeats):.1f} | "
                  f"{best_ms(fwd_bwd, args.repeats):.1f} |", flush=True)


if __name__ == "__main__":
    main()
