"""Bad inputs to the public kernel entry points give clear errors naming the argument (issue 15,
item 2), and the float64 reference path stays float64 (item 3)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_toolkit.kernels.gated_delta_rule import (chunk_gated_delta_rule,
                                                 fused_recurrent_gated_delta_rule,
                                                 naive_gated_delta_rule,
                                                 torch_chunk_gated_delta_rule)
from cl_toolkit.kernels.linear_attn import (chunk_linear_attn, fused_recurrent_linear_attn,
                                            naive_linear_attn, torch_chunk_linear_attn)
from cl_toolkit.layers.attention import Attention
from cl_toolkit.layers.mom import MoMLayer
from cl_toolkit.kernels.common.utils import gdn_gate
from cl_toolkit.models.language import SequenceLanguageModel

B, T, H, K = 1, 10, 2, 8


def _x(**over):
    x = dict(q=torch.randn(B, T, H, K), k=F.normalize(torch.randn(B, T, H, K), dim=-1),
             v=torch.randn(B, T, H, K), g=-torch.rand(B, T, H), beta=torch.rand(B, T, H))
    x.update(over)
    return x


def _positive_g():
    g = -torch.rand(B, T, H)
    g[0, 3, 1] = 0.5
    return g


def _gdr(fn, **kw):
    return lambda x: fn(**x, **kw)


def _la(fn, **kw):
    return lambda x: fn(**{n: t for n, t in x.items() if n != "beta"}, **kw)


GDR_ENTRIES = {
    "chunk-torch": _gdr(chunk_gated_delta_rule, backend="torch"),
    "chunk-triton": _gdr(chunk_gated_delta_rule, backend="triton", chunk_size=16),
    "chunk-naive": _gdr(chunk_gated_delta_rule, backend="naive"),
    "naive": _gdr(naive_gated_delta_rule),
    "torch-chunk": _gdr(torch_chunk_gated_delta_rule, chunk_size=16),
    "recurrent-triton": _gdr(fused_recurrent_gated_delta_rule, backend="triton"),
    "la-chunk-torch": _la(chunk_linear_attn, backend="torch"),
    "la-chunk-triton": _la(chunk_linear_attn, backend="triton", chunk_size=16),
    "la-naive": _la(naive_linear_attn),
    "la-torch-chunk": _la(torch_chunk_linear_attn, chunk_size=16),
    "la-recurrent": _la(fused_recurrent_linear_attn, backend="torch"),
}

BAD = [
    # (id, inputs changed, error message pattern)
    ("g-positive", dict(g=_positive_g()), r"g is a log-decay .* <= 0.* g\[0, 3, 1\] = 0\.5"),
    ("g-nan", dict(g=torch.full((B, T, H), float("nan"))), r"g is a log-decay .* nan"),
    ("g-neg-inf", dict(g=torch.full((B, T, H), float("-inf"))), r"g is a log-decay .* -inf"),
    ("k-one-head", dict(k=torch.randn(B, T, 1, K)),
     r"k must have shape \(1, 10, 2, 8\), got \(1, 10, 1, 8\)"),
    ("k-int", dict(k=torch.ones(B, T, H, K, dtype=torch.int64)),
     r"k has dtype torch.int64; expected torch.float32 \(q's dtype\)"),
    ("qkv-int", dict(q=torch.ones(B, T, H, K, dtype=torch.int64),
                     k=torch.ones(B, T, H, K, dtype=torch.int64),
                     v=torch.ones(B, T, H, K, dtype=torch.int64)),
     "q must be floating point, got torch.int64"),
    ("q-3d", dict(q=torch.randn(T, H, K)), r"q must be \[B, T, H, K\], got shape \(10, 2, 8\)"),
    ("q-numpy", dict(q=np.zeros((B, T, H, K), dtype=np.float32)),
     "q must be a torch.Tensor, got numpy.ndarray"),
    ("v-numpy", dict(v=np.zeros((B, T, H, K), dtype=np.float32)),
     "v must be a torch.Tensor, got numpy.ndarray"),
    ("g-numpy", dict(g=np.zeros((B, T, H), dtype=np.float32)),
     "g must be a torch.Tensor, got numpy.ndarray"),
    ("v-length", dict(v=torch.randn(B, T + 1, H, K)),
     r"v must be \[B, T, H, V\] = \[1, 10, 2, V\]"),
    ("g-int", dict(g=torch.zeros(B, T, H, dtype=torch.int64)), "g has dtype torch.int64"),
    ("h0-shape", dict(initial_state=torch.zeros(B, H, K + 1, K)),
     r"initial_state must have shape \(1, 2, 8, 8\), got \(1, 2, 9, 8\)"),
    ("cu-numpy", dict(cu_seqlens=np.array([0, 10])), "cu_seqlens must be a torch.Tensor"),
    ("scale-nan", dict(scale=float("nan")), r"scale must be a finite number .* got nan"),
    ("scale-inf", dict(scale=float("inf")), r"scale must be a finite number .* got inf"),
    ("batch-0", dict(q=torch.randn(0, T, H, K), k=torch.randn(0, T, H, K),
                     v=torch.randn(0, T, H, K), g=-torch.rand(0, T, H), beta=torch.rand(0, T, H)),
     r"q holds a batch of 0 sequences \(shape \(0, 10, 2, 8\)\)"),
]


@pytest.mark.parametrize("entry", list(GDR_ENTRIES), ids=list(GDR_ENTRIES))
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(bad, entry):
    _, over, match = bad
    x = _x(**over)
    with pytest.raises(ValueError, match=match):
        GDR_ENTRIES[entry](x)


def _beta_at(value):
    beta = torch.rand(B, T, H)
    beta[0, 4, 1] = value
    return beta


# Every entry that takes beta (the gated delta rule's).
BETA_ENTRIES = [e for e in GDR_ENTRIES if not e.startswith("la-")]


@pytest.mark.parametrize("entry", BETA_ENTRIES, ids=BETA_ENTRIES)
@pytest.mark.parametrize("value,shown", [(3.0, "3.0"), (-0.5, "-0.5"), (float("nan"), "nan")],
                         ids=["3", "-0.5", "nan"])
def test_beta_outside_the_unit_interval_raises(entry, value, shown):
    # beta = 3 gave outputs of ~3e31 before this check: the update stops contracting along k.
    with pytest.raises(ValueError, match=rf"beta .* \[0, 1\], got beta\[0, 4, 1\] = {shown}"):
        GDR_ENTRIES[entry](_x(beta=_beta_at(value)))


def test_beta_at_the_bounds_is_accepted():
    beta = torch.rand(B, T, H)
    beta[0, 0], beta[0, 1] = 0.0, 1.0
    o, _ = chunk_gated_delta_rule(**_x(beta=beta), backend="torch")
    assert torch.isfinite(o).all()


def test_gate_logits_may_be_positive():
    # Logits are not log-decays: the fused gate turns any sign into g <= 0.
    a = torch.full((B, T, H), 3.0)
    x = _x()
    x.pop("g")
    o, _ = chunk_gated_delta_rule(**x, gate_logits=a, A_log=torch.zeros(H),
                                  dt_bias=torch.zeros(H), backend="torch")
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 5, 8), r"x must be \[B, T, hidden_size=16\], got shape \(2, 5, 8\)"),
    (torch.randn(5, 16), r"x must be \[B, T, hidden_size=16\], got shape \(5, 16\)"),
    (torch.ones(2, 5, 16, dtype=torch.int64), "x must be floating point, got torch.int64"),
    (np.zeros((2, 5, 16), dtype=np.float32), "x must be a torch.Tensor, got numpy.ndarray"),
], ids=["hidden", "2d", "int", "numpy"])
def test_mom_layer_bad_inputs(x, match):
    layer = MoMLayer(16, num_heads=2, num_memories=4, topk=2, backend="torch")
    with pytest.raises(ValueError, match=match):
        layer(x)


def test_mom_layer_float64_input_with_float32_weights():
    layer = MoMLayer(16, num_heads=2, num_memories=4, topk=2, backend="torch")
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the layer's weights "
                                         r"are torch.float32"):
        layer(torch.randn(2, 5, 16, dtype=torch.float64))
    y, _, _ = layer.double()(torch.randn(2, 5, 16, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_attention_float64_input_with_float32_weights():
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the layer's weights "
                                         r"are torch.float32"):
        Attention(16, 2)(torch.randn(2, 5, 16, dtype=torch.float64))


@pytest.mark.parametrize("cls", [MoMLayer, Attention], ids=["mom", "attention"])
def test_heads_must_divide_the_hidden_size(cls):
    # MoM used to take head_dim = 10 // 3 = 3 and silently project 10 channels to 9.
    with pytest.raises(ValueError, match=r"hidden_size=10 must be a multiple of num_heads=3"):
        cls(10, num_heads=3)


def test_language_model_refuses_float_token_ids():
    lm = SequenceLanguageModel(32, mixer="gdn", hidden_size=16, num_layers=1, num_heads=2,
                               backend="torch")
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids \(int64 or "
                                         r"int32\), got dtype torch.float32"):
        lm(torch.zeros(2, 5))
    assert lm(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 32)


def test_gdn_gate_is_float64_for_float64_inputs():
    a = torch.randn(50, 3, dtype=torch.float64) * 4
    A_log = torch.randn(3, dtype=torch.float64)
    dt_bias = torch.randn(3, dtype=torch.float64)
    x = (a + dt_bias).tolist()
    hand = torch.tensor([[-np.exp(A_log[h].item()) * np.log1p(np.exp(x[t][h])) for h in range(3)]
                         for t in range(50)], dtype=torch.float64)
    g = gdn_gate(a, A_log, dt_bias)
    assert g.dtype == torch.float64
    assert ((g - hand).abs() / hand.abs()).max() < 1e-12
    assert gdn_gate(a.float(), A_log.float(), dt_bias.float()).dtype == torch.float32
    assert gdn_gate(a.bfloat16(), A_log, dt_bias).dtype == torch.float32


def test_float64_reference_path_with_fused_gate_matches_hand_gate():
    # backend='naive' with gate_logits forms g by gdn_gate, then runs the float64 token loop.
    x = {n: t.double() for n, t in _x().items()}
    x.pop("g")
    a = torch.randn(B, T, H, dtype=torch.float64) * 3
    A_log, dt_bias = torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    o, _ = chunk_gated_delta_rule(**x, gate_logits=a, A_log=A_log, dt_bias=dt_bias,
                                  backend="naive")
    g = -A_log.exp() * torch.log1p((a + dt_bias).exp())
    o2, _ = naive_gated_delta_rule(**x, g=g)
    assert ((o - o2).norm() / o2.norm()).item() < 1e-12
