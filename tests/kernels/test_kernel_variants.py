"""perf/kernel_variants.py: the other kernel versions that the GPU script times
against the current ones must still compute the op (checked against the float64 token loop,
in the interpreter), or the comparison means nothing."""
import pytest
import torch

from perf import kernel_variants
from cl_toolkit.kernels import chunk_triton, short_conv
from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule
from cl_toolkit.kernels.short_conv import segment_conv

from .helpers import TOL, compare, make_inputs, rel_err


def _unit(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _variants_of(module):
    return sorted(n for n, (m, _, _) in kernel_variants.VARIANTS.items() if m is module)


@pytest.mark.parametrize("name", _variants_of(chunk_triton))
def test_variant_matches_naive(name, monkeypatch):
    _, attr, impl = kernel_variants.VARIANTS[name]
    monkeypatch.setattr(chunk_triton, attr, impl)
    cu = torch.tensor([0, 9, 40])
    x = make_inputs(1, 40, 2, 16, 16, torch.float32, n_states=2)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=32, use_qk_l2norm=True,
                                                       backend="triton"),
                    lambda q, k, **a: naive_gated_delta_rule(_unit(q), _unit(k), **a), x,
                    TOL[torch.float32], cu_seqlens=cu)
    assert not fails, fails


@pytest.mark.parametrize("name", _variants_of(short_conv))
def test_conv_variant_matches_the_torch_path(name, monkeypatch):
    # The torch path is itself checked against a row-by-row loop (test_mom.py).
    _, attr, impl = kernel_variants.VARIANTS[name]
    monkeypatch.setattr(short_conv, attr, impl)
    torch.manual_seed(0)
    cu = [0, 2, 37, 40]  # a segment shorter than W - 1, one longer than a 32-row block
    x = torch.randn(40, 70, dtype=torch.float64)
    w = torch.randn(70, 4, dtype=torch.float64)
    cache = torch.randn(3, 70, 3, dtype=torch.float64)
    dy = torch.randn(40, 70, dtype=torch.float64)
    grads = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, cache)]
        (segment_conv(leaves[0], leaves[1], cu, leaves[2], backend=backend)
         * dy.to(dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for tensor, ours, ref in zip(("dx", "dweight", "dcache"), *grads):
        assert rel_err(ours, ref) < 1e-5, tensor


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="dv-in-scan"):
        kernel_variants.apply("nope")
