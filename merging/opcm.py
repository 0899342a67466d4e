"""Orthogonal-projection continual merging, OPCM (Tang et al., https://arxiv.org/abs/2501.09522).

State: the unscaled merged update ``S`` and the norms of every task vector seen. Step 1 takes
``S_1 = tau_1``. At step t, for every Linear weight with ``S_{t-1} = U diag(sigma) V^T`` (thin
SVD), the new task vector loses its components ``u_i^T tau v_i`` for every i (the diagonal) and
``u_i^T tau v_j`` for all ``i, j < r`` (the top block), where ``r`` = `split_rank`:

    P(tau) = tau - U (D o (U^T tau V)) V^T,   D = I + [i < r and j < r]

so ``<P(tau), S_{t-1}>_F = 0`` in every Linear. Every other entry (biases, norms, embeddings,
the conv stem) is added unprojected. Then ``S_t = S_{t-1} + P(tau_t)``,
``lambda_t = ||S_t|| / mean_{i<=t} ||tau_i||`` (one global scalar, whole-model L2) and
``theta_t = theta_0 + S_t / lambda_t``, so the merged model always sits at the mean task-vector
distance from the base.

Only the ``min(m, n)`` singular pairs of the thin SVD enter ``P``; the public implementation
takes full SVDs, which is wasted work. `project_exact` is the executable spec (float64 SVD);
`project` is the fast path used by the strategy (see its docstring and
``benchmarks/perf/merge_speed.py``). Singular values below ``RTOL * sigma_max`` are treated as
zero by both: in a float32 matrix they are rounding noise and their vectors are arbitrary.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .task_vectors import StateDict, norm

RTOL = 1e-6


def linear_weights(model: nn.Module) -> dict[str, int]:
    """State-dict keys of the weight matrices OPCM projects -> how many matrices are stacked
    in the entry: 1 for ``nn.Linear``, 3 for ``nn.MultiheadAttention.in_proj_weight`` (q, k and
    v are three Linear maps stored as one ``[3d, d]`` tensor; projecting them one by one matches
    models that keep them separate, as the paper's Hugging Face CLIP does)."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            out[prefix + "weight"] = 1
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out[prefix + "in_proj_weight"] = 3
    return out


def split_rank(sigma: torch.Tensor, alpha: float) -> int:
    """Size ``r`` of the top block: the first index at which ``cumsum(sigma) / sum(sigma)``
    exceeds ``alpha`` (``sigma`` descending, zeros already dropped).

    ``alpha = 0`` -> ``r = 0``: only the diagonal is removed. ``alpha >= 1`` -> ``r = len(sigma)``:
    tau loses its whole ``U U^T tau V V^T`` block (FusionBench's argmax returns 0 there instead,
    which silently turns alpha = 1 into alpha = 0).
    """
    if alpha < 0:
        raise ValueError(f"OPCM alpha must be >= 0, got {alpha}; the paper uses 0.5.")
    if alpha >= 1 or sigma.numel() == 0:
        return int(sigma.numel())
    cum = sigma.cumsum(-1) / sigma.sum(-1, keepdim=True)
    return int((cum <= alpha).sum())


def project_exact(S: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference ``P(tau)`` for one matrix ``[m, n]`` from a float64 thin SVD of ``S``."""
    U, sigma, Vh = torch.linalg.svd(S.double(), full_matrices=False)
    keep = int((sigma > RTOL * sigma[0]).sum()) if sigma.numel() and sigma[0] > 0 else 0
    U, sigma, V = U[:, :keep], sigma[:keep], Vh[:keep].T
    r = split_rank(sigma, alpha)
    M = U.T @ tau.double() @ V
    Z = torch.diag_embed(M.diagonal())
    Z[:r, :r] = M[:r, :r]
    return (tau.double() - U @ Z @ V.T).to(tau.dtype)


def project(S: torch.Tensor, tau: torch.Tensor, alpha: float,
            gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Fast ``P(tau)`` for one matrix ``[m, n]`` or a batch ``[..., m, n]``.

    The thin SVD comes from the eigendecomposition of the smaller Gram matrix
    ``S^T S = V diag(sigma^2) V^T`` (n x n, n = min(m, n)) and ``U = S V / sigma``; of
    ``U^T tau V`` only the diagonal and the top ``r x r`` block are formed. Work per matrix: one
    Gram product and one eigh in ``gram_dtype``, three ``m n^2`` products in the weights' dtype.
    The Gram squares the condition number, so it and its eigh need float64 to resolve small
    singular values; ``U = S V / sigma`` does not square it, so float32 is enough there.
    """
    if S.shape != tau.shape:
        raise ValueError(f"S has shape {tuple(S.shape)} but tau {tuple(tau.shape)}.")
    if S.dim() == 2:
        return project_many([(S, tau)], alpha, gram_dtype)[0]
    flat = list(zip(S.reshape(-1, *S.shape[-2:]), tau.reshape(-1, *S.shape[-2:])))
    return torch.stack(project_many(flat, alpha, gram_dtype)).view(S.shape)


def project_many(pairs: list[tuple[torch.Tensor, torch.Tensor]], alpha: float,
                 gram_dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """`project` for a list of ``(S, tau)`` matrix pairs of any shapes. Their eigh calls run
    side by side, one single-threaded call per CPU thread: LAPACK's own threading of an
    n = 768 eigh gains little (2% slower on a quiet 2-core Xeon) and collapses when the cores
    are shared (1.8x slower on this busy 2-core EPYC). torch's thread count is lowered to 1
    meanwhile, so do not run other torch work in parallel threads."""
    oriented = [(s.mT, t.mT) if s.shape[0] < s.shape[1] else (s, t) for s, t in pairs]
    grams = [_gram(s, gram_dtype) for s, _ in oriented]
    spectra = _eigh_all(grams)
    del grams
    out = []
    for (s, t), (eigval, V), (s0, _) in zip(oriented, spectra, pairs):
        p = _finish(s, t, eigval, V, alpha)
        out.append(p.mT if s0.shape[0] < s0.shape[1] else p)
    return out


def _gram(S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    S = S.to(dtype)
    return S.mT @ S


def _eigh_all(grams: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    threads = torch.get_num_threads()
    if len(grams) < 2 or threads < 2 or grams[0].device.type != "cpu":
        return [torch.linalg.eigh(g) for g in grams]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(torch.linalg.eigh, grams))
    finally:
        torch.set_num_threads(threads)


def _finish(S: torch.Tensor, tau: torch.Tensor, eigval: torch.Tensor, V: torch.Tensor,
            alpha: float) -> torch.Tensor:
    """``P(tau)`` for ``S [m, n]`` (m >= n) from the eigendecomposition of ``S^T S``."""
    sigma = eigval.flip(-1).clamp_min(0).sqrt()
    keep = sigma > RTOL * sigma[:1]
    inv = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), 0.0)
    V = V.flip(-1).to(S.dtype)
    U = (S @ V) * inv.to(S.dtype)
    X = tau @ V
    W = U * (U * X).sum(0)  # U diag(d), d_i = u_i^T tau v_i
    r = split_rank(sigma[keep], alpha)
    if r > 0:
        B = U[:, :r].T @ X[:, :r]
        B.fill_diagonal_(0)
        W[:, :r] += U[:, :r] @ B
    return tau - W @ V.T


def opcm_step_(update: dict[str, torch.Tensor], tau: dict[str, torch.Tensor],
               tau_norms: list[float], alpha: float, linear: dict[str, int],
               gram_dtype: torch.dtype = torch.float64, window: int = 8) -> float:
    """One OPCM step, in place: ``update`` (``S_{t-1}``) becomes ``S_t``; ``tau`` is used as
    scratch (it ends up holding ``P(tau)``); ``norm(tau)`` is appended to ``tau_norms``.
    Returns ``lambda_t``. With an empty ``update`` (first step) ``S_1 = tau_1``, lambda 1.
    Linear weights are projected ``window`` matrices at a time (see `project_many`)."""
    tau_norms.append(norm(tau))
    if not update:
        update.update({k: t.clone() for k, t in tau.items()})
        return merge_scale(update, tau_norms)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush():
        for (_, t), p in zip(pending, project_many(pending, alpha, gram_dtype)):
            t.copy_(p)
        pending.clear()

    for k in linear:
        if k in tau:
            c, s, t = linear[k], update[k], tau[k]
            pending += zip(s.view(c, -1, s.shape[-1]).unbind(),
                           t.view(c, -1, t.shape[-1]).unbind())
            if len(pending) >= window:
                flush()
    flush()
    for k, t in tau.items():
        update[k].add_(t)
    return merge_scale(update, tau_norms)


def merge_scale(update: StateDict, tau_norms: list[float]) -> float:
    """``lambda_t = ||S_t|| / mean ||tau_i||``."""
    mean = sum(tau_norms) / len(tau_norms)
    n = norm(update)
    return n / mean if mean > 0 else 1.0
