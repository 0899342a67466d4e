"""Strong decay in a sequence's last, partly filled chunk: forward and every gradient finite and
equal to the float64 token loop (issue 15, item 1).

A chunk past the sequence end has padding rows. Their cumulative log-gate once loaded as 0, so
exp(G_t - G_i) overflowed against a strongly decayed valid row i and 0 * inf = NaN reached the
valid rows through the dots (dk, dv, dg, dbeta of the delta rule; dk, dv of linear attention).
"""
import copy
import math

import pytest
import torch

from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule
from cl_toolkit.kernels.linear_attn import chunk_linear_attn, naive_linear_attn
from cl_toolkit.layers.mom import MoMLayer

from .conftest import rel_err
from .helpers import TOL, compare, make_inputs
from .test_mom import slow_mom

OPS = {"gdr": (chunk_gated_delta_rule, naive_gated_delta_rule),
       "gla": (chunk_linear_attn, naive_linear_attn)}


def _inputs(op, B, T, g, n_states=None):
    x = make_inputs(B, T, 2, 16, 16, torch.float32, n_states=n_states, beta=op == "gdr")
    if op == "gla":
        x.pop("beta")
    x["g"] = g
    return x


def _check(op, x, backend, chunk, cu=None):
    fn, ref = OPS[op]
    fails = compare(lambda **a: fn(**a, chunk_size=chunk, backend=backend), ref, x,
                    TOL[torch.float32], cu_seqlens=cu)
    assert not fails, fails


@pytest.mark.parametrize("op", ["gdr", "gla"])
def test_issue_repro_uniform_decay_one_partial_chunk(op):
    # T = 40 in one chunk of 64, g = -2.5 per token: the valid rows reach G = -100.
    _check(op, _inputs(op, 2, 40, torch.full((2, 40, 2), -2.5)), "triton", 64)


def _one_token_of_minus_100(op):
    g = torch.full((1, 40, 2), -0.05)
    g[0, 37] = -100.0
    _check(op, _inputs(op, 1, 40, g), "triton", 16)


@pytest.mark.parametrize("op", ["gdr", "gla"])
def test_issue_repro_one_token_of_minus_100_in_the_last_chunk(op):
    _one_token_of_minus_100(op)


# Packed sequences whose last chunks (of 16) hold 1, 7, 15 and 16 tokens: the padding rows of
# a middle sequence's last chunk are the next sequence's rows.
SWEEP_CU = [0, 17, 40, 55, 71]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["gdr", "gla"])
@pytest.mark.parametrize("decay", [-1.0, -90.0, -200.0], ids=lambda d: f"G{d:g}")
def test_decay_sweep_over_partial_chunk_lengths(decay, op, backend):
    # g = -0.05 per token, but each sequence's last chunk decays by `decay` in all (uniformly
    # over its tokens). exp overflows in float32 past 88.
    g = torch.full((1, SWEEP_CU[-1], 2), -0.05)
    for s, e in zip(SWEEP_CU[:-1], SWEEP_CU[1:]):
        r = (e - s - 1) % 16 + 1
        g[0, e - r:e] = decay / r
    cu = torch.tensor(SWEEP_CU)
    _check(op, _inputs(op, 1, SWEEP_CU[-1], g, n_states=cu.numel() - 1), backend, 16, cu)


def test_mom_layer_with_strong_gates_matches_slow_reference():
    # A at the top of its init range (16), dt_bias at the top of its own and one token whose
    # gate logit is about 6: that token's log-decay is about -60, and the memories' segments
    # of T = 127 tokens end in partial chunks of 64.
    torch.manual_seed(0)
    layer = MoMLayer(16, num_heads=2, num_memories=4, topk=2, conv_size=3, chunk_size=64,
                     backend="triton")
    B, T = 1, 127
    x = torch.randn(B, T, 16)
    x[..., 0] = 0.0
    x[0, 90, 0] = 1.0
    with torch.no_grad():
        layer.A_log.fill_(math.log(16.0))
        layer.dt_bias.fill_(0.1 + math.log(-math.expm1(-0.1)))
        layer.a_proj[..., 0] = 6.0
    ref = copy.deepcopy(layer).double()
    dy = torch.randn(B, T, 16)
    grads = []
    for model, xin, run in ((layer, x, lambda m, xi: m(xi)[0]), (ref, x.double(), slow_mom)):
        xi = xin.clone().requires_grad_()
        params = dict(model.named_parameters())
        y = run(model, xi)
        (y * dy.to(y.dtype)).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in params.items()}})
    for name, ref_grad in grads[1].items():
        assert rel_err(grads[0][name], ref_grad) < 1e-3, name
