"""Host (Python) time of one call of the Triton chunk path, with the kernels stubbed out.

On the GPU every timed call includes the host work before the kernels start: validation, the
sequence layout, buffers, the autograd Function and the autotuners' dispatch. The GPU profile
of issue 5 put it at about a third of a forward call at (8, 2048, 16, 128). That host work runs
the same on any CPU, so it can be measured here: the chunk kernels are replaced by no-op
launchers (what stays is our wrapper; Triton's own launcher and the CUDA allocator are not
counted) and tiny CPU tensors keep allocation out of the way. Prints microseconds per call,
the best of several repeats (the machine is shared; the minimum is the least disturbed).

    python -m perf.kernel_host_overhead
"""
from __future__ import annotations

import argparse
import os

import torch

from perf.timing import best_seconds


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    from cl_toolkit.kernels.common import chunk_triton

    for name in dir(chunk_triton):
        if name.endswith("_kernel") and name.startswith("_"):
            setattr(chunk_triton, name, _NoLaunch())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend='triton' accept CPU tensors
    os.environ.pop("CLTK_KERNELS_POISON", None)
    torch.set_num_threads(1)
    stub_kernels()
    from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule
    from cl_toolkit.kernels.linear_attn import chunk_linear_attn

    B, T, H, D = 2, 128, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = -torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]

    def gdr():
        return chunk_gated_delta_rule(q, k, v, g, beta, backend="triton")

    def gdr_fused():
        return chunk_gated_delta_rule(q, k, v, None, beta, gate_logits=g, A_log=g[0, 0],
                                      dt_bias=g[0, 1], use_qk_l2norm=True, backend="triton")

    def gla():
        return chunk_linear_attn(q, k, v, g, backend="triton")

    def gdr_fwd_bwd():
        o, _ = chunk_gated_delta_rule(*leaves, backend="triton")
        o.backward(o)

    print(f"host time per call, kernels stubbed, (B, T, H, D) = {(B, T, H, D)}, best of "
          f"{args.repeats} x {args.calls} calls, {torch.get_num_threads()} thread(s)\n")
    print("| call | host time (us) |")
    print("|---|---|")
    for name, fn in (("gated delta rule, forward", gdr),
                     ("gated delta rule, forward, fused gate and L2 norm", gdr_fused),
                     ("gated linear attention, forward", gla),
                     ("gated delta rule, forward + backward", gdr_fwd_bwd)):
        us = 1e6 * best_seconds(fn, args.repeats, args.calls, warmup=20)
        print(f"| {name} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
