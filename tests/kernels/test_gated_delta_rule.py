"""Gated delta rule: every fast path against the float64 token loop, forward and gradients."""
import pytest
import torch
import triton
import triton.language as tl

from cl_toolkit.kernels.common.chunk_triton import _inverse_unit_lower
from cl_toolkit.kernels.gated_delta_rule import (chunk_gated_delta_rule,
                                                 fused_recurrent_gated_delta_rule,
                                                 naive_gated_delta_rule)

from .conftest import rel_err
from .helpers import TOL, compare, make_inputs


def test_naive_gradcheck_float64():
    x = make_inputs(1, 5, 2, 4, 3, torch.float64)
    x["g"] = x["g"].double()
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    leaves = [x[n].clone().requires_grad_() for n in names]

    def f(q, k, v, g, beta, h0):
        o, s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return o, s

    assert torch.autograd.gradcheck(f, leaves)


def test_naive_matches_hand_computed_two_steps():
    # One head, K = V = 1: S1 = b1 v1 k1^2... written out by hand for a scalar state.
    q = torch.tensor([[[[2.0]], [[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0]], [[0.5]]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0]], [[-1.0]]]], dtype=torch.float64)
    g = torch.log(torch.tensor([[[0.5], [0.8]]], dtype=torch.float64))
    beta = torch.tensor([[[0.5], [1.0]]], dtype=torch.float64)
    o, s = naive_gated_delta_rule(q, k, v, g, beta, scale=1.0, output_final_state=True)
    s1 = 0.5 * 3.0 * 1.0                                  # a1*0 + b1 v1 k1
    s2 = 0.8 * s1 * (1 - 1.0 * 0.25) + 1.0 * -1.0 * 0.5   # a2 S1 (1 - b2 k2^2) + b2 v2 k2
    assert torch.allclose(o.flatten(), torch.tensor([s1 * 2.0, s2 * 1.0], dtype=torch.float64))
    assert torch.allclose(s.flatten(), torch.tensor([s2], dtype=torch.float64))


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 16), (75, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "nogate"])
def test_torch_chunk_matches_naive_float64(T, chunk, gate):
    x = make_inputs(2, T, 2, 8, 6, torch.float64, gate=gate)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=chunk, backend="torch"),
                    naive_gated_delta_rule, x, 1e-10)
    assert not fails, fails


@pytest.mark.parametrize("cu", [[0, 5, 5, 40, 74], [0, 74], [0, 1, 17, 33, 60, 74]],
                         ids=["with-empty", "single", "five"])
def test_torch_chunk_varlen_float64(cu):
    cu = torch.tensor(cu)
    x = make_inputs(1, 74, 2, 8, 6, torch.float64, n_states=cu.numel() - 1)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=16, backend="torch"),
                    naive_gated_delta_rule, x, 1e-10, cu_seqlens=cu)
    assert not fails, fails


TRITON_CASES = [
    # (B, T, H, K, V, dtype, cu_seqlens, gate, h0, chunk)
    (2, 37, 2, 16, 20, torch.float32, None, True, True, 16),
    (1, 75, 1, 32, 16, torch.float32, None, True, False, 64),
    (2, 40, 2, 16, 16, torch.float16, None, True, True, 16),
    (1, 50, 2, 16, 16, torch.float32, [0, 7, 7, 33, 50], True, True, 16),
    (1, 45, 2, 20, 16, torch.float32, [0, 16, 45], False, False, 16),
    (1, 50, 2, 16, 16, torch.float16, [0, 3, 20, 50], True, True, 16),
]


def _case_id(c):
    B, T, H, K, V, dt, cu, gate, h0, chunk = c
    return (f"B{B}-T{T}-H{H}-K{K}-V{V}-{str(dt)[6:]}-{'varlen' if cu else 'fixed'}"
            f"-{'gate' if gate else 'nogate'}-{'h0' if h0 else 'noh0'}-C{chunk}")


@pytest.mark.parametrize("case", TRITON_CASES, ids=[_case_id(c) for c in TRITON_CASES])
def test_triton_chunk_matches_naive(case):
    B, T, H, K, V, dtype, cu, gate, h0, chunk = case
    cu = torch.tensor(cu) if cu else None
    n = cu.numel() - 1 if cu is not None else B
    x = make_inputs(B, T, H, K, V, dtype, gate=gate, h0=h0, n_states=n)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=chunk, backend="triton"),
                    naive_gated_delta_rule, x, TOL[dtype], cu_seqlens=cu)
    assert not fails, fails


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_recurrent_matches_naive(dtype):
    cu = torch.tensor([0, 7, 7, 13, 20])
    x = make_inputs(1, 20, 2, 16, 20, dtype, n_states=4)
    o, s = fused_recurrent_gated_delta_rule(**x, cu_seqlens=cu, backend="triton")
    ref = {n: t.double() for n, t in x.items()}
    o2, s2 = naive_gated_delta_rule(**ref, cu_seqlens=cu, output_final_state=True)
    assert rel_err(o, o2) < TOL[dtype] and rel_err(s, s2) < TOL[dtype]


def test_fused_gate_and_l2norm_options():
    B, T, H, K = 1, 12, 2, 8
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    a, A_log, dt_bias = torch.randn(B, T, H), torch.randn(H), torch.randn(H)
    beta = torch.rand(B, T, H)
    o, _ = chunk_gated_delta_rule(q, k, v, beta=beta, gate_logits=a, A_log=A_log, dt_bias=dt_bias,
                                  use_qk_l2norm=True, backend="torch", chunk_size=16)
    g = -A_log.exp() * torch.nn.functional.softplus(a + dt_bias)
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    o2, _ = naive_gated_delta_rule(qn.double(), kn.double(), v.double(), g.double(), beta.double())
    assert rel_err(o, o2) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_fused_l2norm_and_gate_grads(dtype):
    # Kernel-fused q/k normalisation and gate against torch ops + the float64 token loop,
    # including the gradients of the raw q, k, the gate logits, A_log and dt_bias.
    B, T, H, K = 1, 40, 2, 16
    raw = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, K),
               beta=torch.rand(B, T, H), gate_logits=torch.randn(B, T, H),
               A_log=torch.randn(H) * 0.5, dt_bias=torch.randn(H) * 0.5)
    cu = torch.tensor([0, 9, 9, 40])
    do = torch.randn(B, T, H, K)
    x = {n: (t.to(dtype) if n in ("q", "k", "v", "beta") else t).clone().requires_grad_()
         for n, t in raw.items()}
    o, _ = chunk_gated_delta_rule(**x, use_qk_l2norm=True, cu_seqlens=cu, chunk_size=16,
                                  backend="triton")
    (o.double() * do.double()).sum().backward()
    r = {n: t.detach().double().requires_grad_() for n, t in raw.items()}
    g = -r["A_log"].exp() * torch.nn.functional.softplus(r["gate_logits"] + r["dt_bias"])
    qn = r["q"] * torch.rsqrt((r["q"] ** 2).sum(-1, keepdim=True) + 1e-6)
    kn = r["k"] * torch.rsqrt((r["k"] ** 2).sum(-1, keepdim=True) + 1e-6)
    o2, _ = naive_gated_delta_rule(qn, kn, r["v"], g, r["beta"], cu_seqlens=cu)
    (o2 * do.double()).sum().backward()
    assert rel_err(o, o2) < TOL[dtype]
    for n in raw:
        assert rel_err(x[n].grad, r[n].grad) < TOL[dtype], n


@pytest.mark.parametrize("bad,match", [
    (dict(cu_seqlens=torch.tensor([1, 10])), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 9])), "end at the total length 10"),
    (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "int32 or int64"),
    (dict(g=torch.zeros(1, 9, 2)), r"g must have shape \(1, 10, 2\)"),
    (dict(initial_state=torch.zeros(1, 2, 8, 4)), r"initial_state must have shape \(1, 2, 4, 8\)"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(chunk_size=48), "chunk_size must be one of"),
], ids=["cu-start", "cu-order", "cu-end", "cu-dtype", "g-shape", "h0-shape", "backend",
        "chunk"])
def test_validation_errors_quote_values(bad, match):
    q, k, v = torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 4)
    kw = dict(beta=torch.rand(1, 10, 2), backend="torch")
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(q, k, v, **kw)


def test_triton_path_rejects_noncontiguous_and_float64():
    q = torch.randn(1, 8, 2, 16).transpose(1, 2).contiguous().transpose(1, 2)
    k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_gated_delta_rule(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        chunk_gated_delta_rule(k.double(), k.double(), v.double(), backend="triton")


def test_triton_grads_when_final_state_is_not_requested():
    # The autograd Function then receives no gradient for the final state (dht = None).
    x = make_inputs(1, 20, 2, 16, 16, torch.float32, h0=False)
    x.pop("initial_state")
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, s = chunk_gated_delta_rule(**leaves, chunk_size=16, backend="triton")
    assert s is None
    o.sum().backward()
    ref = {n: t.double().requires_grad_() for n, t in x.items()}
    naive_gated_delta_rule(**ref)[0].sum().backward()
    for n in leaves:
        assert rel_err(leaves[n].grad, ref[n].grad) < 1e-4, n


@triton.jit
def _inv_kernel(a, t, BT: tl.constexpr):
    o = tl.arange(0, BT)
    b_a = tl.load(a + o[:, None] * BT + o[None, :])
    tl.store(t + o[:, None] * BT + o[None, :], _inverse_unit_lower(b_a, BT))


@pytest.mark.parametrize("BT", [16, 32, 64, 128])
def test_blocked_unit_lower_inverse_matches_linalg(BT):
    # The chunk kernels' (I + A)^-1 (block substitution + block products) against LAPACK.
    k = torch.nn.functional.normalize(torch.randn(BT, 8, dtype=torch.float64), dim=-1)
    G = (-torch.rand(BT, dtype=torch.float64) * 0.1).cumsum(0)
    A = (torch.rand(BT, 1, dtype=torch.float64) * (k @ k.T) * (G[:, None] - G[None, :]).exp())
    A = A.tril(-1)
    out = torch.empty(BT, BT, dtype=torch.float32)
    _inv_kernel[(1,)](A.float().contiguous(), out, BT=BT)
    ref = torch.linalg.inv(torch.eye(BT, dtype=torch.float64) + A)
    assert rel_err(out, ref) < 1e-5


class _Twice:
    """A kernel whose every launch runs twice, as the autotuner does on a GPU."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            launch(*args, **kwargs)
            launch(*args, **kwargs)
        return run


def test_triton_kernels_are_idempotent(monkeypatch):
    # The autotuner times a kernel by launching it several times on the real buffers, so a
    # kernel that updated an output in place would be wrong on a GPU's first call only.
    from cl_toolkit.kernels.common import chunk_triton
    for name in dir(chunk_triton):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(chunk_triton, name, _Twice(getattr(chunk_triton, name)))
    cu = torch.tensor([0, 9, 9, 40])
    x = make_inputs(1, 40, 2, 16, 16, torch.float32, n_states=3)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=16, backend="triton"),
                    naive_gated_delta_rule, x, TOL[torch.float32], cu_seqlens=cu)
    assert not fails, fails
