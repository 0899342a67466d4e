"""Why the WY inverse of the chunk kernels multiplies in three-pass tf32, even for bf16 inputs.

``_inverse_unit_lower`` (kernels/common/chunk_triton.py) forms (I + A)^-1 of a 64 x 64 chunk with a
chain of ten products. One-pass tf32 products would cost a third of the tensor-core work of the
prep kernel's largest part, and its result is rounded to bf16 right after, so it looks precise
enough. It is not: the chain multiplies powers of A that grow before they cancel, and with
correlated keys and beta up to 2 (negative eigenvalues allowed) the rounding of one-pass tf32
is amplified by orders of magnitude. This script emulates the kernel's product chain on the
CPU, with tf32 modelled as operands rounded to 10 mantissa bits and fp32 accumulation, and
prints the worst relative error over 5 draws against the float64 inverse, next to the error
that rounding the exact T to bf16 already makes.

    python -m perf.wy_inverse_precision
"""
from __future__ import annotations

import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 (10 explicit mantissa bits, round half up on the bit pattern)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def dot(a: torch.Tensor, b: torch.Tensor, prec: str) -> torch.Tensor:
    """tl.dot of fp32 tiles with input_precision ``prec`` ('tf32' or 'tf32x3')."""
    ah, bh = tf32(a), tf32(b)
    if prec == "tf32":
        return ah @ bh
    return ah @ bh + ah @ tf32(b - bh) + tf32(a - ah) @ bh


def inverse(A: torch.Tensor, prec: str) -> torch.Tensor:
    """The product chain of ``_inverse_unit_lower`` for a 64 x 64 chunk (16 x 16 blocks)."""
    n = A.shape[0]
    o = torch.arange(n)
    same = (o[:, None] // 16) == (o[None, :] // 16)
    eye = torch.eye(n)
    L = torch.where(same, A, 0.0)
    D = eye - L
    for _ in range(3):
        L = dot(L, L, prec)
        D = dot(D, eye + L, prec)
    M = dot(D, torch.where(same, 0.0, A), prec)
    P = eye - M
    M = dot(M, M, prec)
    P = dot(P, eye + M, prec)
    return dot(P, D, prec)


def chunk(corr: float, beta_max: float, decay: float, gen: torch.Generator):
    """A = strictly_lower(diag(beta) (K K^T * exp(G_i - G_j))) of one chunk of unit bf16 keys
    that share a common direction with weight ``corr``."""
    n, d = 64, 128
    k = torch.randn(n, d, generator=gen) + corr * torch.randn(1, d, generator=gen)
    k = (k / k.norm(dim=1, keepdim=True)).bfloat16().float()
    beta = torch.rand(n, generator=gen) * beta_max
    G = (-torch.rand(n, generator=gen) * decay).cumsum(0)
    return torch.tril(beta[:, None] * (k @ k.T) * torch.exp(G[:, None] - G[None, :]), -1)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print("| key correlation | beta max | decay per token | T error, tf32x3 | T error, tf32 | "
          "bf16 rounding of exact T |")
    print("|---|---|---|---|---|---|")
    for corr in (0.0, 1.0, 3.0, 10.0):
        for beta_max in (1.0, 2.0):
            for decay in (0.0, 1.0):
                errs = []
                for _ in range(5):
                    A = chunk(corr, beta_max, decay, gen)
                    exact = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + A.double())
                    errs.append((rel(inverse(A, "tf32x3"), exact), rel(inverse(A, "tf32"), exact),
                                 rel(exact.float().bfloat16(), exact)))
                worst = [max(e[i] for e in errs) for i in range(3)]
                print(f"| {corr} | {beta_max} | {decay} | {worst[0]:.1e} | {worst[1]:.1e} | "
                      f"{worst[2]:.1e} |")


if __name__ == "__main__":
    main()
