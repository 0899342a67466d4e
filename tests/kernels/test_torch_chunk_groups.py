"""The torch chunk path's length groups (short sequences as one chunk of their group's padded
length, long ones in whole chunks, empty ones skipped) against the float64 token loop, forward
and gradients."""
import pytest
import torch

from cl_toolkit.kernels.common import chunk_torch
from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule
from cl_toolkit.kernels.linear_attn import chunk_linear_attn, naive_linear_attn

from .conftest import rel_err
from .helpers import make_inputs

# Empty sequences, lengths on both sides of the chunk size 64 and of its multiples.
AROUND = [0, 1, 15, 16, 17, 0, 31, 33, 48, 63, 64, 65, 0, 3, 130]


@pytest.fixture(params=[0, 10 ** 9], ids=["group-per-length", "one-short-group"])
def group_cost(request, monkeypatch):
    """Both ends of the grouping rule: every distinct length its own group (no padding of
    short sequences), or all short sequences padded to the longest."""
    monkeypatch.setattr(chunk_torch, "GROUP_COST", request.param)


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
def test_delta_rule_lengths_around_thresholds(h0, final, group_cost):
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
def test_linear_attn_lengths_around_thresholds(h0, group_cost):
    cu = _cu(AROUND)
    x = make_inputs(1, int(cu[-1]), 2, 8, 6, torch.float64, n_states=len(AROUND), h0=h0,
                    beta=False)
    x.pop("beta")
    _check(lambda **a: chunk_linear_attn(**a, chunk_size=64, backend="torch"),
           naive_linear_attn, x, cu=cu)


@pytest.mark.parametrize("T", [7, 16, 23, 64, 65], ids=lambda t: f"T{t}")
def test_equal_lengths_up_to_one_chunk(T):
    x = make_inputs(3, T, 2, 8, 6, torch.float64, h0=False)
    _check(lambda **a: chunk_gated_delta_rule(**a, chunk_size=64, backend="torch"),
           naive_gated_delta_rule, x, final=False)


def test_float32_short_segments_match_float64_loop(group_cost):
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


def test_grouping_rule_hand_computed(monkeypatch):
    # H=1, K=0: a sequence of length n costs n^2. Lengths 3 and 4 share a group (padding the
    # 3 to 4 costs 16 - 9 = 7, not more than a group's 7); adding 10 would cost
    # 2 * (100 - 16) = 168 > 7; 70 is longer than the chunk 64 and goes to the group of whole
    # chunks (128); 0 is skipped.
    monkeypatch.setattr(chunk_torch, "GROUP_COST", 7)
    assert chunk_torch._groups([3, 4, 10, 0, 70], 64, 1, 0) == [(4, [0, 1]), (10, [2]),
                                                               (128, [4])]
