"""(Gated) linear attention: fast paths against the float64 token loop."""
import pytest
import torch

from cl_toolkit.kernels.linear_attn import (chunk_linear_attn, fused_recurrent_linear_attn,
                                            naive_linear_attn)

from .conftest import rel_err
from .helpers import TOL, compare, make_inputs


def _la_inputs(*a, **kw):
    x = make_inputs(*a, beta=False, **kw)
    x.pop("beta")
    return x


def test_naive_gradcheck_float64():
    x = _la_inputs(1, 5, 2, 4, 3, torch.float64)
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "initial_state")]

    def f(q, k, v, g, h0):
        return naive_linear_attn(q, k, v, g, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, leaves)


def test_naive_plain_equals_causal_masked_attention():
    # Without decay, linear attention is softmax-free causal attention: o = tril(QK^T) V.
    q, k, v = torch.randn(1, 9, 1, 4).double(), torch.randn(1, 9, 1, 4).double(), torch.randn(
        1, 9, 1, 3).double()
    o, _ = naive_linear_attn(q, k, v, scale=1.0)
    ref = torch.tril(q[0, :, 0] @ k[0, :, 0].T) @ v[0, :, 0]
    assert torch.allclose(o[0, :, 0], ref)


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("cu", [None, [0, 5, 5, 40, 74]], ids=["fixed", "varlen"])
def test_torch_chunk_matches_naive_float64(gate, cu):
    cu = torch.tensor(cu) if cu else None
    B = 1 if cu is not None else 2
    x = _la_inputs(B, 74, 2, 8, 6, torch.float64, gate=gate,
                   n_states=cu.numel() - 1 if cu is not None else None)
    fails = compare(lambda **a: chunk_linear_attn(**a, chunk_size=16, backend="torch"),
                    naive_linear_attn, x, 1e-10, cu_seqlens=cu)
    assert not fails, fails


CASES = [
    (2, 37, 2, 16, 20, torch.float32, None, True, True),
    (1, 50, 2, 16, 16, torch.float32, [0, 7, 7, 33, 50], False, True),
    (1, 50, 2, 16, 16, torch.float16, [0, 3, 20, 50], True, False),
]


@pytest.mark.parametrize("case", CASES, ids=[
    f"B{c[0]}-T{c[1]}-{str(c[5])[6:]}-{'varlen' if c[6] else 'fixed'}-{'gate' if c[7] else 'plain'}"
    f"-{'h0' if c[8] else 'noh0'}" for c in CASES])
def test_triton_chunk_matches_naive(case):
    B, T, H, K, V, dtype, cu, gate, h0 = case
    cu = torch.tensor(cu) if cu else None
    x = _la_inputs(B, T, H, K, V, dtype, gate=gate, h0=h0,
                   n_states=cu.numel() - 1 if cu is not None else B)
    fails = compare(lambda **a: chunk_linear_attn(**a, chunk_size=16, backend="triton"),
                    naive_linear_attn, x, TOL[dtype], cu_seqlens=cu)
    assert not fails, fails


def test_triton_recurrent_matches_naive():
    cu = torch.tensor([0, 7, 7, 13, 20])
    x = _la_inputs(1, 20, 2, 16, 20, torch.float32, n_states=4)
    o, s = fused_recurrent_linear_attn(**x, cu_seqlens=cu, backend="triton")
    o2, s2 = naive_linear_attn(**{n: t.double() for n, t in x.items()}, cu_seqlens=cu,
                               output_final_state=True)
    assert rel_err(o, o2) < 1e-4 and rel_err(s, s2) < 1e-4
