"""The torch chunk path's length groups (short sequences as one chunk of their own padded
length, empty ones skipped) against the float64 token loop, forward and gradients."""
import pytest
import torch

from cl_toolkit.kernels.chunk_torch import SHORT_STEP
from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule
from cl_toolkit.kernels.linear_attn import chunk_linear_attn, naive_linear_attn

from .conftest import rel_err
from .helpers import make_inputs

S = SHORT_STEP
# Lengths on both sides of every padding step and of the chunk size 64, and empty ones.
AROUND = [0, 1, S - 1, S, S + 1, 0, 2 * S - 1, 2 * S + 1, 63, 64, 65, 0, 3, 130]


def _cu(lens):
    return torch.tensor([0] + lens).cumsum(0)


def _check(fn, ref, x, *, cu=None, final=True, tol=1e-10):
    """o (and the final state) and every input's gradient of fn against ref, float64."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    outs = []
    for f in (fn, ref):
        for t in leaves.values():
            t.grad = None
        o, h = f(**{n: leaves.get(n) for n in x}, cu_seqlens=cu, output_final_state=final)
        gen = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        if final:
            loss = loss + (h * torch.randn(h.shape, generator=gen, dtype=h.dtype)).sum()
        loss.backward()
        outs.append([o] + ([h] if final else []) + [t.grad.clone() for t in leaves.values()])
    names = ["o"] + (["final"] if final else []) + ["d" + n for n in leaves]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, *outs)}
    assert all(e < tol for e in errs.values()), errs


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero-state"])
@pytest.mark.parametrize("final", [True, False], ids=["final", "no-final"])
def test_delta_rule_lengths_around_thresholds(h0, final):
    cu = _cu(AROUND)
    x = make_inputs(1, int(cu[-1]), 2, 8, 6, torch.float64, n_states=len(AROUND), h0=h0)
    _check(lambda **a: chunk_gated_delta_rule(**a, chunk_size=64, backend="torch"),
           naive_gated_delta_rule, x, cu=cu, final=final)


@pytest.mark.parametrize("gate,beta", [(False, True), (True, False)], ids=["nogate", "nobeta"])
def test_delta_rule_without_gate_or_beta(gate, beta):
    lens = [5, 0, 17, 40, 1]
    cu = _cu(lens)
    x = make_inputs(1, int(cu[-1]), 2, 8, 6, torch.float64, n_states=len(lens), gate=gate,
                    beta=beta, h0=False)
    _check(lambda **a: chunk_gated_delta_rule(**a, chunk_size=32, backend="torch"),
           naive_gated_delta_rule, x, cu=cu)


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero-state"])
def test_linear_attn_lengths_around_thresholds(h0):
    cu = _cu(AROUND)
    x = make_inputs(1, int(cu[-1]), 2, 8, 6, torch.float64, n_states=len(AROUND), h0=h0,
                    beta=False)
    x.pop("beta")
    _check(lambda **a: chunk_linear_attn(**a, chunk_size=64, backend="torch"),
           naive_linear_attn, x, cu=cu)


@pytest.mark.parametrize("T", [7, S, 23, 64], ids=lambda t: f"T{t}")
def test_equal_lengths_up_to_one_chunk(T):
    x = make_inputs(3, T, 2, 8, 6, torch.float64, h0=False)
    _check(lambda **a: chunk_gated_delta_rule(**a, chunk_size=64, backend="torch"),
           naive_gated_delta_rule, x, final=False)


def test_float32_short_segments_match_float64_loop():
    cu = _cu(AROUND)
    x = make_inputs(1, int(cu[-1]), 2, 16, 16, torch.float32, n_states=len(AROUND), h0=False)
    o, h = chunk_gated_delta_rule(**x, cu_seqlens=cu, output_final_state=True, backend="torch")
    xd = {n: t.double() if t is not None else None for n, t in x.items()}
    o2, h2 = naive_gated_delta_rule(**xd, cu_seqlens=cu, output_final_state=True)
    assert o.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(o, o2) < 1e-5 and rel_err(h, h2) < 1e-5


def test_all_empty_returns_initial_states():
    x = make_inputs(1, 0, 2, 8, 6, torch.float64, n_states=3)
    o, h = chunk_gated_delta_rule(**x, cu_seqlens=torch.tensor([0, 0, 0, 0]),
                                  output_final_state=True, backend="torch")
    assert o.shape == (1, 0, 2, 6)
    assert torch.equal(h, x["initial_state"])
