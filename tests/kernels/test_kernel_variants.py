"""benchmarks/perf/kernel_variants.py: the other kernel versions that the GPU script times
against the current ones must still compute the op (checked against the float64 token loop,
in the interpreter), or the comparison means nothing."""
import pytest
import torch

from cl_toolkit.benchmarks.perf import kernel_variants
from cl_toolkit.kernels import chunk_triton
from cl_toolkit.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule

from .helpers import TOL, compare, make_inputs


def _unit(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("name", sorted(kernel_variants.VARIANTS))
def test_variant_matches_naive(name, monkeypatch):
    attr, impl = kernel_variants.VARIANTS[name]
    monkeypatch.setattr(chunk_triton, attr, impl)
    cu = torch.tensor([0, 9, 40])
    x = make_inputs(1, 40, 2, 16, 16, torch.float32, n_states=2)
    fails = compare(lambda **a: chunk_gated_delta_rule(**a, chunk_size=32, use_qk_l2norm=True,
                                                       backend="triton"),
                    lambda q, k, **a: naive_gated_delta_rule(_unit(q), _unit(k), **a), x,
                    TOL[torch.float32], cu_seqlens=cu)
    assert not fails, fails


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="dv-in-scan"):
        kernel_variants.apply("nope")
