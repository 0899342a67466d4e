"""The CPU decoding path (kernels/common/recurrent_torch.py, backend 'torch' of the fused
recurrent functions) against the per-sequence naive references, in float64: packed sequences
of unequal length, empty ones (whose state must come back untouched), with and without gate,
beta and initial state, and the one-token step a MoM layer decodes with."""
import pytest
import torch

from cl_toolkit.kernels.gated_delta_rule import (fused_recurrent_gated_delta_rule,
                                                 naive_gated_delta_rule)
from cl_toolkit.kernels.linear_attn import fused_recurrent_linear_attn, naive_linear_attn

from .helpers import make_inputs

OPS = {"gdr": (fused_recurrent_gated_delta_rule, naive_gated_delta_rule, True),
       "la": (fused_recurrent_linear_attn, naive_linear_attn, False)}
CASES = {  # (B, T, cu_seqlens, gate, beta, h0)
    "fixed": (3, 9, None, True, True, True),
    "varlen-empty": (1, 23, [0, 5, 5, 17, 17, 23], True, True, True),
    "decode-step": (1, 4, [0, 1, 1, 2, 2, 3, 4, 4], True, True, True),
    "no-gate-no-beta": (1, 11, [0, 4, 11], False, False, True),
    "no-h0": (2, 6, None, True, True, False),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES)
def test_torch_recurrent_matches_naive_float64(op, case):
    fused, naive, delta = OPS[op]
    B, T, cu, gate, beta, h0 = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    n = B if cu is None else cu.numel() - 1
    x = make_inputs(B, T, 2, 5, 7, torch.float64, gate=gate, beta=beta and delta, h0=h0,
                    n_states=n)
    if not delta:
        x.pop("beta")
    o, s = fused(**x, cu_seqlens=cu, backend="torch", output_final_state=True)
    o2, s2 = naive(**x, cu_seqlens=cu, output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s2, rtol=1e-12, atol=1e-12)
    if cu is not None and h0:
        empty = (cu[1:] == cu[:-1]).nonzero().squeeze(1)
        assert torch.equal(s[empty], x["initial_state"][empty])  # bit for bit


def test_torch_recurrent_in_float32_keeps_the_input_dtype_and_matches_float64():
    cu = torch.tensor([0, 3, 3, 10])
    x = make_inputs(1, 10, 2, 8, 8, torch.float32, n_states=3)
    o, s = fused_recurrent_gated_delta_rule(**x, cu_seqlens=cu, backend="torch")
    o2, s2 = naive_gated_delta_rule(**{k: t.double() for k, t in x.items()}, cu_seqlens=cu,
                                    output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), s2, rtol=1e-5, atol=1e-5)
