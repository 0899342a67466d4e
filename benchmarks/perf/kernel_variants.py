"""Other versions of parts of the chunk kernels, timed against the current ones on a GPU in
the same call (``gpu_kernels.py --variant NAME``). Not used by the library.

A version here is checked for correctness on the CPU (tests/kernels/test_kernel_variants.py).
A candidate that wins on a GPU moves into chunk_triton.py, one that loses is deleted; the
version it replaced may stay here while other cards have not timed it. Earlier entries:
``dense-inverse``, ``fused-bwd``, ``scan-bv-by-pairs`` (issue 5, fourth session) are in this
file at commit 7bb7d8b; ``bwd-dv-local`` became the library's path in the fifth session.

A variant is applied by replacing a name in ``cl_toolkit.kernels.chunk_triton`` before any
kernel is compiled: Triton hashes a kernel together with the jit functions it calls, so a
patched kernel compiles as its own binary.
"""
from __future__ import annotations

from cl_toolkit.kernels import chunk_triton

_LIBRARY_REVERSE_SCAN = chunk_triton._reverse_scan  # a variant replaces the module's name


def reverse_scan_dv_in_scan(q, k, w, gcum, do, dht, use_g, opts):
    """The reverse scan with P^T dO formed inside the sequential scan, as in the fourth session
    (no parallel pass and no fp32 buffer). On an H200 it was 1 % slower forward+backward at
    T <= 4096 and 8.5 % slower at T = 16384 (benchmarks/RESULTS.md)."""
    return _LIBRARY_REVERSE_SCAN(q, k, w, gcum, do, dht, use_g, opts, local_first=False)


VARIANTS = {
    "dv-in-scan": ("_reverse_scan", reverse_scan_dv_in_scan),
}


def apply(name: str) -> None:
    """Swap one variant into the chunk kernels module (before its kernels are first used)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    attr, impl = VARIANTS[name]
    setattr(chunk_triton, attr, impl)
