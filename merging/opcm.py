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
`project_` (in place; `project` returns a new tensor) is the fast path used by the strategy
(see its docstring and ``perf/merge_speed.py``). Singular values below
``RTOL * sigma_max`` are treated as zero by both: in a float32 matrix they are rounding noise
and their vectors are arbitrary. `OPCM` is the continual strategy.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from cl_toolkit.errors import ConfigError

from .base import MergeStrategy
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
    """Fast ``P(tau)`` for one matrix ``[m, n]`` or a batch ``[..., m, n]``, as a new tensor
    (see `project_`)."""
    if S.shape != tau.shape:
        raise ValueError(f"S has shape {tuple(S.shape)} but tau {tuple(tau.shape)}.")
    out = tau.clone(memory_format=torch.contiguous_format)
    shape = (-1, *S.shape[-2:])
    project_many_(list(zip(S.reshape(shape).unbind(), out.view(shape).unbind())), alpha,
                  gram_dtype)
    return out


def project_many_(pairs: list[tuple[torch.Tensor, torch.Tensor]], alpha: float,
                  gram_dtype: torch.dtype = torch.float64, workers: int | None = None) -> None:
    """`project_` for a list of ``(S, tau)`` matrix pairs of any shapes, in place.

    On the CPU ``workers`` threads (default: torch's thread count; the calling thread is one of
    them) each take one whole matrix at a time, single-threaded: LAPACK's own threading of an
    n = 768 eigh gains little (2% on a quiet 2-core Xeon) and collapses when the cores are
    shared (1.8x slower, at times far worse, on this busy 2-core EPYC), while one-thread
    products side by side lose nothing. Only ``workers`` matrices' scratch exists at once; the
    calling thread works too because glibc gives each thread its own heap, and only the caller's
    already holds freed memory to reuse (peak 3.19 instead of 3.33 model-sized buffers in
    ``merge_speed``). torch's thread count is 1 meanwhile, so do not run other torch work in
    parallel threads."""
    threads = torch.get_num_threads()
    workers = threads if workers is None else workers
    jobs = sorted(pairs, key=lambda p: -p[0].numel())  # biggest first: a shorter tail
    if workers < 2 or len(jobs) < 2 or jobs[0][0].device.type != "cpu":
        for S, tau in jobs:
            project_(S, tau, alpha, gram_dtype)
        return
    todo, lock = iter(jobs), threading.Lock()

    def drain():
        while True:
            with lock:
                pair = next(todo, None)
            if pair is None:
                return
            project_(*pair, alpha, gram_dtype)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers - 1) as pool:
            helpers = [pool.submit(drain) for _ in range(workers - 1)]
            drain()
            for h in helpers:
                h.result()
    finally:
        torch.set_num_threads(threads)


def project_(S: torch.Tensor, tau: torch.Tensor, alpha: float,
             gram_dtype: torch.dtype = torch.float64) -> None:
    """``tau`` becomes ``P(tau)``, in place, for one matrix ``[m, n]``.

    The thin SVD comes from the eigendecomposition of the smaller Gram matrix
    ``S^T S = V diag(sigma^2) V^T`` (n x n, n = min(m, n)). The Gram squares the condition
    number, so it and its eigh need float64 to resolve small singular values; the rest does not
    and stays in the weights' dtype: with ``A = S V = U diag(sigma)`` and
    ``Y = A^T tau = diag(sigma) U^T tau`` (n x n), the diagonal ``u_i^T tau v_i`` and the top
    ``r x r`` block are read off ``Y V``, and ``tau -= A (diag(1/sigma) Z V^T)``. Products:
    the Gram's lower triangle, three ``m n^2`` ones; scratch: ``A`` and a few n x n."""
    if S.shape[0] < S.shape[1]:  # transpose both: the same problem with the smaller Gram
        S, tau = S.mT, tau.mT
    eigval, V = torch.linalg.eigh(_gram_lower(S, gram_dtype))
    sigma = eigval.flip(-1).clamp_min(0).sqrt()
    keep = sigma > RTOL * sigma[:1]
    inv = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), 0.0)
    inv = inv.to(S.dtype)
    V = V.to(S.dtype).flip(-1)
    A = S @ V
    Y = A.mT @ tau
    Vt = V.mT
    ZVt = Vt * ((Y * Vt).sum(-1) * inv).unsqueeze(-1)  # rows d_i v_i^T
    r = split_rank(sigma[keep], alpha)
    if r > 0:
        B = (Y[:r] @ V[:, :r]) * inv[:r, None]  # u_i^T tau v_j for i, j < r (diagonal d_i)
        ZVt[:r] = B @ Vt[:r]
    tau.addmm_(A, ZVt.mul_(inv.unsqueeze(-1)), alpha=-1)


def _gram_lower(S: torch.Tensor, dtype: torch.dtype, rows: int = 256,
                cols: int = 128) -> torch.Tensor:
    """``S^T S`` in ``dtype``, only its lower triangle filled (all ``eigh`` reads), which saves
    ~40% of the products. ``rows``-row slices of ``S`` are converted one at a time, so there is
    no ``dtype`` copy of the whole matrix."""
    n = S.shape[-1]
    G = torch.zeros(n, n, dtype=dtype, device=S.device)
    for i in range(0, S.shape[0], rows):
        Si = S[i:i + rows].to(dtype)
        for j in range(0, n, cols):
            G[j:j + cols, :j + cols].addmm_(Si[:, j:j + cols].mT, Si[:, :j + cols])
    return G


def opcm_step_(update: dict[str, torch.Tensor], tau: dict[str, torch.Tensor],
               tau_norms: list[float], alpha: float, linear: dict[str, int],
               gram_dtype: torch.dtype = torch.float64, workers: int | None = None) -> float:
    """One OPCM step, in place: ``update`` (``S_{t-1}``) becomes ``S_t``; ``tau`` is used as
    scratch (it ends up holding ``P(tau)``, each matrix written as soon as it is projected);
    ``norm(tau)`` is appended to ``tau_norms``. Returns ``lambda_t``. With an empty ``update``
    (first step) ``S_1 = tau_1``, lambda 1. ``workers``: see `project_many_`."""
    tau_norms.append(norm(tau))
    if not update:
        update.update({k: t.clone() for k, t in tau.items()})
        return merge_scale(update, tau_norms)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, c in linear.items():
        if k in tau:
            s, t = update[k], tau[k]
            pairs += zip(s.view(c, -1, s.shape[-1]).unbind(), t.view(c, -1, t.shape[-1]).unbind())
    project_many_(pairs, alpha, gram_dtype, workers)
    for k, t in tau.items():
        update[k].add_(t)
    return merge_scale(update, tau_norms)


def merge_scale(update: StateDict, tau_norms: list[float]) -> float:
    """``lambda_t = ||S_t|| / mean ||tau_i||``."""
    mean = sum(tau_norms) / len(tau_norms)
    n = norm(update)
    return n / mean if mean > 0 else 1.0


class OPCM(MergeStrategy):
    """OPCM (https://arxiv.org/abs/2501.09522): each Linear's update projected orthogonally to
    the merged update, rescaled to the mean task-vector norm (`opcm_step_`). The state is ``S``
    and the task-vector norms; ``lambda`` follows from them (`merge_scale`)."""

    name = "opcm"
    state_attrs = ("update", "tau_norms")

    def __init__(self, alpha: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if alpha < 0:
            raise ConfigError(f"OPCM alpha must be >= 0, got {alpha}; the paper uses 0.5.")
        self.alpha = alpha
        self.update: dict[str, torch.Tensor] = {}
        self.tau_norms: list[float] = []
        self.lam = 1.0

    def setup(self, stream, model, ctx):
        super().setup(stream, model, ctx)
        self.linear = {k: c for k, c in linear_weights(self.model).items() if k in self.keys}

    def merge_(self, tau, task):
        self.lam = opcm_step_(self.update, tau, self.tau_norms, self.alpha, self.linear)

    def merged_update(self):
        return self.update, 1.0 / self.lam

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tau_norms = list(self.tau_norms)
        self.lam = merge_scale(self.update, self.tau_norms) if self.tau_norms else 1.0
