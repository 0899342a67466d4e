"""Kernel ridge regression classifiers with per-task parameters: the classifier of KCL and GKCL.

KCL, Derakhshani et al., ICML 2021, https://arxiv.org/abs/2107.05757. A task's classifier is not a
weight matrix but the closed-form kernel ridge regression (KRR) solution on a support set S:

    alpha     = (K_SS + lambda_t I)^-1 Y_S            [S, C]   (Cholesky solve, never an inverse)
    logits(x) = gamma_t * k(x, S) alpha + beta_t      [Q, C]

with learnable per-task ``lambda_t`` (ridge), ``gamma_t`` (temperature) and ``beta_t`` (offset);
every task is always scored with its own three values.

Kernels on features ``h`` ``[N, d]`` (scaled by ``1 / bandwidth`` for the shift-invariant ones):

- ``linear``:    k(a, b) = a . b
- ``gaussian``:  k(a, b) = exp(-||a - b||_2^2 / (2 bandwidth^2))
- ``laplacian``: k(a, b) = exp(-||a - b||_1 / bandwidth). The public KCL code calls this one
  ``rbf`` (exp(-0.25 ||a - b||_1), i.e. bandwidth 4). The name ``rbf`` is refused here: it
  means the Gaussian kernel in most texts and the Laplacian one in KCL's code.
- ``rff``:    random Fourier features phi(h) = sqrt(2/D) cos(Omega h + b), Omega ~ N(0, I) fixed,
  b ~ U[0, 2 pi); phi(a) . phi(b) is an unbiased estimate of the ``gaussian`` kernel
  (Rahimi & Recht 2007, https://people.eecs.berkeley.edu/~brecht/papers/07.rah.rec.nips.pdf).
- ``vrf``:    variational random features (Zhen et al. 2020, https://arxiv.org/abs/2006.06707, as
  used by KCL): each row of Omega is drawn from q(omega | S) = N(mu, diag(sigma^2)) whose mean and
  log-variance come from a small amortisation net fed the support set's mean feature; a prior
  net fed the batch's mean feature gives p(omega); the loss adds tau * KL(q || p) (analytic,
  diagonal Gaussians).

For the explicit feature maps (linear, rff, vrf) k(x, S) alpha = phi(x) (phi(S)^T alpha), so a
solved machine is stored as the primal weight ``phi(S)^T alpha`` ``[F, C]``: scoring a test batch
then costs one matmul and no support features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cl_toolkit.errors import ClToolkitError, ConfigError, unknown_name

KERNELS = ("linear", "gaussian", "laplacian", "rff", "vrf")
DUAL_KERNELS = ("gaussian", "laplacian")  # no explicit feature map: solved in the dual
JITTERS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # relative to the mean diagonal


class KernelSolveError(ClToolkitError, RuntimeError):
    """The regularised kernel matrix could not be factorised even with jitter."""


def krr_solve(K: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """alpha = (K + lam I)^-1 Y for K ``[S, S]``, Y ``[S, C]`` by a Cholesky factorisation.

    If the factorisation fails (K not positive definite in floating point), retry with a diagonal
    jitter growing from 1e-6 to 1e-2 times the mean diagonal; raise `KernelSolveError` after that.
    """
    n = K.shape[0]
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    A = K + lam * eye
    L, info = torch.linalg.cholesky_ex(A)
    finite = torch.isfinite(A).all()
    if bool((info == 0) & finite):  # the one host sync of the common case
        return torch.cholesky_solve(Y, L)
    lam_value = float(lam.detach()) if torch.is_tensor(lam) else float(lam)
    if not bool(finite):
        raise KernelSolveError(
            f"Kernel ridge regression got a {n}x{n} kernel matrix with NaN/Inf entries "
            f"(lambda={lam_value:.3g}): the features diverged. Lower the learning rate or check "
            "the inputs for NaN/Inf."
        )
    scale = A.diagonal().abs().mean().detach().clamp_min(1e-12)
    for jitter in JITTERS[1:]:
        L, info = torch.linalg.cholesky_ex(A + (jitter * scale) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(Y, L)
    raise KernelSolveError(
        f"Kernel ridge regression failed: the {n}x{n} kernel matrix plus lambda={lam_value:.3g} "
        f"is not positive definite even with a jitter of {JITTERS[-1]:g} x its mean diagonal "
        f"({float(scale):.3g}). Raise lambda_min or lower the kernel bandwidth."
    )


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) for diagonal Gaussians, summed over the
    last dimension: ``[..., d]`` -> ``[...]``."""
    return 0.5 * (logvar_p - logvar_q
                  + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0).sum(-1)


class Amortiser(nn.Module):
    """Mean feature ``[d]`` -> (mu, log-variance) of the distribution of one row of Omega ``[d]``.

    The output layer starts at zero so that at initialisation q = p = N(0, I): VRF then begins as
    the plain ``rff`` kernel and learns to move away from it.
    """

    def __init__(self, feat_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ELU(),
                                 nn.Linear(hidden, 2 * feat_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(h_mean).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)


@dataclass
class Solution:
    """A solved machine for one task: either the primal weight ``[F, C]`` (explicit feature maps)
    or the support features ``[S, d]`` and dual coefficients ``[S, C]`` (gaussian, laplacian)."""

    task: int
    omega: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    support: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


class KernelMachine(nn.Module):
    """Per-task KRR classifiers over features of dimension ``feat_dim``.

    ``fit`` solves a task's machine on a support set, ``scores`` applies it, ``forward`` does both
    and also returns the VRF KL term (0 for the other kernels). The learnable per-task values
    are ``lambda_t = lambda_min + |raw_lambda_t|`` (never below lambda_min, so the solve stays
    well conditioned), ``gamma_t`` and ``beta_t``.
    """

    def __init__(self, kernel: str, feat_dim: int, num_tasks: int, num_features: int = 1024,
                 bandwidth: float = 1.0, lambda_init: float = 0.1, lambda_min: float = 0.01,
                 vrf_hidden: int = 256, seed: int = 0):
        super().__init__()
        if kernel == "rbf":
            raise ConfigError(
                "kernel='rbf' is ambiguous: choose kernel=gaussian (exp(-||a-b||^2 / (2 "
                "bandwidth^2)), what 'rbf' means in most texts) or kernel=laplacian "
                "(exp(-||a-b||_1 / bandwidth), what KCL's public code calls 'rbf', with "
                "bandwidth=4)."
            )
        if kernel not in KERNELS:
            raise unknown_name("kernel", kernel, KERNELS)
        if bandwidth <= 0 or lambda_min <= 0 or num_features <= 0:
            raise ConfigError(f"bandwidth ({bandwidth}), lambda_min ({lambda_min}) and "
                              f"num_features ({num_features}) must be positive.")
        self.kernel, self.feat_dim, self.num_features = kernel, feat_dim, num_features
        self.bandwidth, self.lambda_min = float(bandwidth), float(lambda_min)
        self.raw_lambda = nn.Parameter(torch.full((num_tasks,), float(lambda_init)))
        self.gamma = nn.Parameter(torch.ones(num_tasks))
        self.beta = nn.Parameter(torch.zeros(num_tasks))
        if kernel in ("rff", "vrf"):
            gen = torch.Generator().manual_seed(seed)
            # Fixed standard-normal draws: the rff bases, and VRF's evaluation-time noise (so a
            # task's classifier is deterministic and needs no RNG state to resume).
            self.register_buffer("omega_eps", torch.randn(num_features, feat_dim, generator=gen))
            self.register_buffer("phase", 2 * math.pi * torch.rand(num_features, generator=gen))
        if kernel == "vrf":
            self.posterior = Amortiser(feat_dim, vrf_hidden)
            self.prior = Amortiser(feat_dim, vrf_hidden)

    def task_params(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lambda_t, gamma_t, beta_t) of task ``t``."""
        return self.lambda_min + self.raw_lambda[t].abs(), self.gamma[t], self.beta[t]

    def feature_map(self, h: torch.Tensor, omega: torch.Tensor | None) -> torch.Tensor:
        """phi(h) ``[N, F]`` for the explicit feature maps; F = d (linear) or D (rff, vrf)."""
        if self.kernel == "linear":
            return h
        proj = (h / self.bandwidth) @ omega.T + self.phase
        return math.sqrt(2.0 / self.num_features) * torch.cos(proj)

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact Gram matrix ``[Na, Nb]`` of the dual kernels (gaussian, laplacian)."""
        if self.kernel == "laplacian":
            return torch.exp(-torch.cdist(a, b, p=1) / self.bandwidth)
        d2 = (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min(0)
        return torch.exp(-d2 / (2 * self.bandwidth ** 2))

    def omega(self, h_support: torch.Tensor, h_batch: torch.Tensor | None = None,
              eps: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Random-feature bases Omega ``[D, d]`` and the KL term (a 0-d tensor).

        vrf: Omega = mu + sigma * eps with (mu, log sigma^2) from the posterior net on the mean
        support feature; ``eps`` defaults to the fixed draws (evaluation), training passes fresh
        ones. The KL is computed when ``h_batch`` (the features the prior sees) is given.
        """
        zero = h_support.new_zeros(())
        if self.kernel == "rff":
            return self.omega_eps, zero
        if self.kernel != "vrf":
            return None, zero
        mu_q, logvar_q = self.posterior(h_support.mean(0))
        eps = self.omega_eps if eps is None else eps
        omega = mu_q + (0.5 * logvar_q).exp() * eps
        if h_batch is None:
            return omega, zero
        mu_p, logvar_p = self.prior(h_batch.mean(0))
        return omega, gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)

    def fit(self, t: int, h_support: torch.Tensor, y_support: torch.Tensor, num_classes: int,
            h_batch: torch.Tensor | None = None, eps: torch.Tensor | None = None
            ) -> tuple[Solution, torch.Tensor]:
        """Solve task ``t``'s machine on support features ``[S, d]`` with task-local labels
        ``[S]`` in ``0..num_classes-1``. Returns the solution and the KL term."""
        omega, kl = self.omega(h_support, h_batch, eps)
        Y = F.one_hot(y_support, num_classes).to(h_support.dtype)
        lam = self.task_params(t)[0]
        if self.kernel in DUAL_KERNELS:
            alpha = krr_solve(self.gram(h_support, h_support), Y, lam)
            return Solution(t, support=h_support, alpha=alpha), kl
        phi = self.feature_map(h_support, omega)
        alpha = krr_solve(phi @ phi.T, Y, lam)
        return Solution(t, omega=omega, weight=phi.T @ alpha), kl

    def scores(self, sol: Solution, h: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``[Q, C]`` = gamma_t * k(h, S) alpha + beta_t."""
        _, gamma, beta = self.task_params(sol.task)
        if self.kernel in DUAL_KERNELS:
            raw = self.gram(h, sol.support) @ sol.alpha
        else:
            raw = self.feature_map(h, sol.omega) @ sol.weight
        return gamma * raw + beta

    def forward(self, t: int, h_support: torch.Tensor, y_support: torch.Tensor,
                h_query: torch.Tensor, num_classes: int, h_batch: torch.Tensor | None = None,
                eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: query logits ``[Q, C]`` from the machine solved on the support, and
        the KL term, whose prior is fed the mean of ``h_batch`` (default: the query batch)."""
        h_batch = (h_query if h_batch is None else h_batch) if self.kernel == "vrf" else None
        sol, kl = self.fit(t, h_support, y_support, num_classes, h_batch, eps)
        return self.scores(sol, h_query), kl
