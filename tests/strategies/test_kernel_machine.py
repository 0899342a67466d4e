"""Kernel machine of KCL/GKCL against independent oracles (numpy float64, torch.distributions)."""
import math

import numpy as np
import pytest
import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.strategies.kernel_machine import (KernelMachine, KernelSolveError, gaussian_kl,
                                                  krr_solve)


def _data(n_support=30, n_query=12, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n_support, d, generator=g, dtype=torch.float64)
    hq = torch.randn(n_query, d, generator=g, dtype=torch.float64)
    ys = torch.arange(n_support) % classes
    return hs, ys, hq


def _set_task_params(m, t, lam, gamma, beta):
    with torch.no_grad():
        m.raw_lambda[t] = lam - m.lambda_min
        m.gamma[t], m.beta[t] = gamma, beta


def test_krr_solve_matches_numpy_solve_float64():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 5, generator=g, dtype=torch.float64)
    K, Y = X @ X.T, torch.randn(20, 4, generator=g, dtype=torch.float64)
    alpha = krr_solve(K, Y, 0.3)
    expected = np.linalg.solve(K.numpy() + 0.3 * np.eye(20), Y.numpy())
    np.testing.assert_allclose(alpha.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_linear_machine_equals_primal_ridge_by_lstsq():
    """Dual KRR with the linear kernel == primal ridge regression, solved by numpy lstsq on the
    augmented system [X; sqrt(lam) I] w = [Y; 0] (a different route to the same estimator)."""
    hs, ys, hq = _data()
    m = KernelMachine("linear", 6, num_tasks=2).double()
    _set_task_params(m, 1, lam=0.7, gamma=1.5, beta=-0.25)
    sol, kl = m.fit(1, hs, ys, 3)
    got = m.scores(sol, hq).detach().numpy()
    X, Y = hs.numpy(), np.eye(3)[ys.numpy()]
    A = np.vstack([X, math.sqrt(0.7) * np.eye(6)])
    B = np.vstack([Y, np.zeros((6, 3))])
    w = np.linalg.lstsq(A, B, rcond=None)[0]
    np.testing.assert_allclose(got, 1.5 * hq.numpy() @ w - 0.25, rtol=1e-8, atol=1e-9)
    assert float(kl) == 0.0


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_dual_kernel_machine_equals_explicit_dual_formula(kernel):
    hs, ys, hq = _data(seed=3)
    m = KernelMachine(kernel, 6, num_tasks=1, bandwidth=1.7).double()
    _set_task_params(m, 0, lam=0.2, gamma=2.0, beta=0.5)
    sol, _ = m.fit(0, hs, ys, 3)
    got = m.scores(sol, hq).detach().numpy()

    def k(u, v):  # the textbook kernels, one pair at a time
        if kernel == "gaussian":
            return math.exp(-np.sum((u - v) ** 2) / (2 * 1.7 ** 2))
        return math.exp(-np.sum(np.abs(u - v)) / 1.7)

    def gram(a, b):
        return np.array([[k(u, v) for v in b] for u in a])

    S, Q = hs.numpy(), hq.numpy()
    alpha = np.linalg.lstsq(gram(S, S) + 0.2 * np.eye(len(S)), np.eye(3)[ys.numpy()],
                            rcond=None)[0]
    np.testing.assert_allclose(got, 2.0 * gram(Q, S) @ alpha + 0.5, rtol=1e-8, atol=1e-9)


def test_laplacian_with_bandwidth_4_is_the_kcl_reference_codes_rbf():
    """The public KCL code's ``rbf_kernel`` is exp(-0.25 * ||a - b||_1) (an L1, Laplacian
    kernel), written here from its formula."""
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = torch.randn(4, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = KernelMachine("laplacian", 7, 1, bandwidth=4.0)
    expected = torch.exp(-0.25 * (a[:, None] - b[None]).abs().sum(-1))
    torch.testing.assert_close(m.gram(a, b), expected, rtol=1e-12, atol=0)


def test_the_ambiguous_name_rbf_is_refused_naming_both_kernels():
    with pytest.raises(ConfigError, match="gaussian.*laplacian"):
        KernelMachine("rbf", 4, 1)


def test_each_task_uses_its_own_lambda_gamma_beta():
    hs, ys, hq = _data()
    m = KernelMachine("linear", 6, num_tasks=2).double()
    _set_task_params(m, 0, lam=0.1, gamma=1.0, beta=0.0)
    _set_task_params(m, 1, lam=5.0, gamma=3.0, beta=1.0)
    s0 = m.scores(m.fit(0, hs, ys, 3)[0], hq)
    s1 = m.scores(m.fit(1, hs, ys, 3)[0], hq)
    raw0 = hq @ hs.T @ krr_solve(hs @ hs.T, torch.eye(3, dtype=hs.dtype)[ys], 0.1)
    raw1 = hq @ hs.T @ krr_solve(hs @ hs.T, torch.eye(3, dtype=hs.dtype)[ys], 5.0)
    torch.testing.assert_close(s0, raw0)
    torch.testing.assert_close(s1, 3.0 * raw1 + 1.0)


def test_gradients_reach_only_the_trained_tasks_parameters():
    hs, ys, hq = _data()
    m = KernelMachine("rff", 6, num_tasks=3, num_features=64).double()
    logits, _ = m(1, hs, ys, hq, 3)
    logits.sum().backward()
    for p in (m.raw_lambda, m.gamma, m.beta):
        assert p.grad[1] != 0
        assert p.grad[0] == 0 and p.grad[2] == 0


@pytest.mark.parametrize("D", [256, 4096, 16384], ids=lambda d: f"D={d}")
def test_rff_approximates_the_gaussian_kernel_within_stated_tolerance(D):
    """Stated tolerance: mean |phi phi^T - K_gaussian| <= 1.5 / sqrt(D) and max <= 6 / sqrt(D)
    (the Monte-Carlo error of D random features is O(1/sqrt(D)); measured ~0.8 and ~3.5)."""
    h = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = KernelMachine("rff", 8, 1, num_features=D, bandwidth=2.0, seed=5).double()
    omega, _ = m.omega(h)
    phi = m.feature_map(h, omega).numpy()
    x = h.numpy()
    K = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * 2.0 ** 2))
    err = np.abs(phi @ phi.T - K)
    assert err.mean() <= 1.5 / math.sqrt(D)
    assert err.max() <= 6 / math.sqrt(D)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mq, lq, mp, lp = (torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(4))
    q = torch.distributions.Normal(mq, (0.5 * lq).exp())
    p = torch.distributions.Normal(mp, (0.5 * lp).exp())
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), expected)


def test_vrf_kl_and_bases_follow_the_amortised_posterior_and_prior():
    hs, ys, hq = _data(d=5)
    m = KernelMachine("vrf", 5, 1, num_features=32, vrf_hidden=16).double()
    torch.manual_seed(0)
    for net in (m.posterior, m.prior):  # zero-initialised output layer: randomise it
        torch.nn.init.normal_(net.net[-1].weight, std=0.3)
        torch.nn.init.normal_(net.net[-1].bias, std=0.3)
    eps = torch.randn(32, 5, dtype=torch.float64)
    omega, kl = m.omega(hs, hq, eps)
    out_q = m.posterior.net(hs.mean(0))
    out_p = m.prior.net(hq.mean(0))
    mq, lq, mp, lp = out_q[:5], out_q[5:], out_p[:5], out_p[5:]
    q = torch.distributions.Normal(mq, (0.5 * lq).exp())
    p = torch.distributions.Normal(mp, (0.5 * lp).exp())
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum())
    torch.testing.assert_close(omega, mq + (0.5 * lq).exp() * eps)
    logits, kl_train = m(0, hs, ys, hq, 3, eps=eps)
    torch.testing.assert_close(kl_train, kl)
    assert logits.shape == (12, 3)


def test_vrf_starts_as_rff():
    hs, ys, hq = _data(d=5)
    vrf = KernelMachine("vrf", 5, 1, num_features=32, seed=4).double()
    rff = KernelMachine("rff", 5, 1, num_features=32, seed=4).double()
    torch.testing.assert_close(vrf(0, hs, ys, hq, 3)[0], rff(0, hs, ys, hq, 3)[0])


def test_cholesky_jitter_rescues_a_singular_matrix():
    X = torch.randn(10, 2, dtype=torch.float64)
    K = X @ X.T  # rank 2
    alpha = krr_solve(K, torch.ones(10, 1, dtype=torch.float64), 0.0)
    assert torch.isfinite(alpha).all()


def test_solve_failure_is_a_clear_error():
    K = torch.eye(4)
    K[1, 2] = float("nan")
    with pytest.raises(KernelSolveError, match="NaN"):
        krr_solve(K, torch.ones(4, 2), 0.1)


def test_unknown_kernel_name_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="laplacian"):
        KernelMachine("laplacain", 4, 1)


def test_indefinite_matrix_fails_after_jitter_with_advice():
    K = -torch.eye(3, dtype=torch.float64)
    with pytest.raises(KernelSolveError, match="lambda_min"):
        krr_solve(K, torch.ones(3, 1, dtype=torch.float64), 0.0)
