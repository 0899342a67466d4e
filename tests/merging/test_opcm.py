"""OPCM: the projection against an SVD built by hand, the fast path against the float64 SVD
reference, orthogonality in every Linear, the norm-keeping lambda_t and the alpha edge cases."""
import pytest
import torch
from torch import nn

from cl_toolkit.merging.opcm import (linear_weights, opcm_step_, project, project_exact,
                                     split_rank)
from cl_toolkit.merging.task_vectors import norm

torch.manual_seed(0)


def orthonormal(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]


def test_split_rank_hand_values():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum / sum = .4 .7 .9 1.
    assert split_rank(sigma, 0.0) == 0
    assert split_rank(sigma, 0.5) == 1
    assert split_rank(sigma, 0.75) == 2
    assert split_rank(sigma, 0.95) == 3
    assert split_rank(sigma, 1.0) == 4
    with pytest.raises(ValueError, match="alpha"):
        split_rank(sigma, -0.1)


@pytest.mark.parametrize("alpha, r", [(0.0, 0), (0.5, 1), (0.75, 2), (1.0, 4)])
def test_projection_matches_hand_built_svd(alpha, r):
    # S = U diag(4,3,2,1) V^T with U, V known, so the removed coefficients are known too.
    U, V = orthonormal(7, 4, 1), orthonormal(5, 4, 2)
    S = U @ torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ V.T
    tau = torch.randn(7, 5, dtype=torch.float64)
    M = U.T @ tau @ V
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep.fill_diagonal_(False)
    keep[:r, :r] = False
    expected = tau - U @ (M * ~keep) @ V.T
    torch.testing.assert_close(project_exact(S, tau, alpha), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(project(S, tau, alpha), expected, rtol=0, atol=1e-10)


def test_alpha_edge_cases():
    S = torch.randn(9, 4, dtype=torch.float64)
    tau = torch.randn(9, 4, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(S, full_matrices=False)
    # alpha = 1: the whole U U^T tau V V^T block goes; for this tall full-rank S, V V^T = I.
    p1 = project(S, tau, 1.0)
    torch.testing.assert_close(U.T @ p1, torch.zeros(4, 4, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    # alpha = 0: only the diagonal u_i^T tau v_i goes; every cross term stays.
    p0 = project(S, tau, 0.0)
    before, after = U.T @ tau @ Vh.T, U.T @ p0 @ Vh.T
    torch.testing.assert_close(after.diagonal(), torch.zeros(4, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(after[off], before[off], atol=1e-10, rtol=0)
    # A square full-rank S with alpha = 1 leaves nothing to add.
    Q = torch.randn(5, 5, dtype=torch.float64)
    assert project(Q, torch.randn(5, 5, dtype=torch.float64), 1.0).abs().max() < 1e-10


def spectrum(shape, decay, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, generator=g) * 1e-3
    if decay:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        A = (U * (s[..., :1] / torch.arange(1, s.shape[-1] + 1)).unsqueeze(-2)) @ Vh
    return A


@pytest.mark.parametrize("shape", [(96, 96), (200, 60), (60, 200), (3, 64, 48), (300, 530)],
                         ids=["square", "tall", "wide", "batch3", "gram_in_blocks"])
@pytest.mark.parametrize("decay", [False, True], ids=["flat", "decaying"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fast_projection_matches_float64_svd_reference(shape, decay, alpha):
    # S as OPCM builds it: a sum of projected float32 task vectors.
    S = spectrum(shape, decay, 1)
    for seed in (2, 3):
        S = S + project(S, spectrum(shape, decay, seed), 0.5)
    tau = spectrum(shape, decay, 4)
    fast = project(S, tau, alpha)
    ref = torch.stack([project_exact(s, t, alpha) for s, t in zip(S.view(-1, *shape[-2:]),
                                                                  tau.view(-1, *shape[-2:]))])
    err = (fast.view_as(ref) - ref).norm() / tau.norm()
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("shape", [(7, 5), (70, 45), (45, 70)], ids=["one_block", "tall", "wide"])
def test_blockwise_gram_lower_triangle_matches_float64_product(shape):
    from cl_toolkit.merging.opcm import _gram_lower

    S = torch.randn(shape)
    S = S.mT if shape[0] < shape[1] else S  # as project_ orients it: a transposed view
    ref = S.double().mT @ S.double()
    G = _gram_lower(S, torch.float64, rows=16, cols=8)
    lower = torch.ones_like(ref, dtype=torch.bool).tril()
    torch.testing.assert_close(G[lower], ref[lower], rtol=1e-12, atol=1e-12)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.mlp = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
        self.head = nn.Linear(16, 3)
        self.conv = nn.Conv2d(1, 2, 3)


def random_tv(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.01
            for k, v in model.state_dict().items() if v.is_floating_point()}


def test_linear_weights_finds_linears_and_stacked_qkv():
    found = linear_weights(Net())
    assert found == {"embed.weight": 1, "attn.in_proj_weight": 3, "attn.out_proj.weight": 1,
                     "mlp.0.weight": 1, "mlp.2.weight": 1, "head.weight": 1}


def test_opcm_steps_orthogonality_lambda_and_unprojected_rest():
    model = Net()
    linear = linear_weights(model)
    update, norms, means = {}, [], []
    lam = opcm_step_(update, random_tv(model, 0), norms, 0.5, linear)
    assert lam == 1.0 and len(update) == len(random_tv(model, 0))
    torch.testing.assert_close(update["conv.weight"], random_tv(model, 0)["conv.weight"])
    taus = [random_tv(model, 0)]
    for step in range(1, 5):
        tau = random_tv(model, step)
        taus.append({k: v.clone() for k, v in tau.items()})
        previous = {k: v.clone() for k, v in update.items()}
        lam = opcm_step_(update, tau, norms, 0.5, linear)
        added = {k: update[k] - previous[k] for k in update}
        for key, chunks in linear.items():
            pairs = zip(added[key].double().chunk(chunks), previous[key].double().chunk(chunks))
            for p, s in pairs:
                cos = (p * s).sum() / (p.norm() * s.norm())
                assert abs(cos) < 1e-5, f"{key}: cos {cos:.2e} at step {step}"
        for key in ("embed.bias", "norm.weight", "conv.weight", "attn.in_proj_bias"):
            torch.testing.assert_close(added[key], taus[-1][key])
        mean_norm = sum(norm(t) for t in taus) / len(taus)
        # theta_t - theta_0 = S_t / lambda_t has the mean task-vector norm.
        assert norm(update) / lam == pytest.approx(mean_norm, rel=1e-6)
        means.append(mean_norm)
    assert norms == pytest.approx([norm(t) for t in taus], rel=1e-6)


def test_zero_update_projects_nothing_away():
    tau = torch.randn(6, 4)
    torch.testing.assert_close(project(torch.zeros(6, 4), tau, 0.5), tau)
    torch.testing.assert_close(project_exact(torch.zeros(6, 4), tau, 0.5), tau)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_matrices_projected_in_parallel_threads_match_the_reference(workers):
    from cl_toolkit.merging import opcm

    pairs = [(spectrum((40, 30), True, s), spectrum((40, 30), False, s + 10)) for s in range(3)]
    pairs.append((spectrum((20, 50), False, 7), spectrum((20, 50), False, 8)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pooled = [t.clone() for _, t in pairs]
        opcm.project_many_(list(zip((s for s, _ in pairs), pooled)), 0.5, workers=workers)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for (S, tau), p in zip(pairs, pooled):
        torch.testing.assert_close(p, project_exact(S, tau, 0.5), rtol=0, atol=1e-5 * tau.norm())
