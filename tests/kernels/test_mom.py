"""MoM layer against a slow reference that walks memories and tokens one at a time."""
import pytest
import torch
import torch.nn.functional as F

from cl_toolkit.layers.mom import MoMLayer, _GatherRows, switch_aux_loss

from .conftest import rel_err


def _l2(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def slow_mom(layer: MoMLayer, x: torch.Tensor, memory_mask=None) -> torch.Tensor:
    """Reference: per sample, per memory, token by token; convolution over the memory's own
    token history. Independent of the layer's sorting/packing/scatter code."""
    B, T, D = x.shape
    H, K, V, E, M, W = (layer.num_heads, layer.head_k, layer.head_v, layer.num_memories,
                        layer.num_slots, layer.conv_size)
    logits = x @ layer.router.weight.T
    if memory_mask is not None:
        logits = logits.masked_fill(~memory_mask[:, None, :], float("-inf"))
    probs = logits.softmax(-1)
    topv, topi = probs.topk(layer.topk, -1)
    topw = topv / topv.sum(-1, keepdim=True)
    out = x.new_zeros(B, T, H, V)

    def conv(hist, w):  # hist: list of raw inputs, newest last; w: [C, W]
        acc = 0
        for j in range(W):
            if len(hist) - 1 - j >= 0:
                acc = acc + w[:, W - 1 - j] * hist[len(hist) - 1 - j]
        return F.silu(acc)

    for b in range(B):
        q_hist, qs = [], []
        for t in range(T):
            q_hist.append(layer.q_proj.weight @ x[b, t])
            qr = conv(q_hist, layer.q_conv) if layer.use_short_conv else q_hist[-1]
            qs.append(_l2(qr.view(H, K)) * K ** -0.5)
        for m in range(M):
            S = x.new_zeros(H, V, K)
            k_hist, v_hist = [], []
            for t in range(T):
                if m < E:
                    hit = (topi[b, t] == m).nonzero()
                    if hit.numel() == 0:
                        continue
                    w = topw[b, t, hit[0, 0]]
                else:
                    w = 1.0
                xt = x[b, t]
                k_hist.append(layer.k_proj[m] @ xt)
                v_hist.append(layer.v_proj[m] @ xt)
                if layer.use_short_conv:
                    k, v = conv(k_hist, layer.k_conv[m]), conv(v_hist, layer.v_conv[m])
                else:
                    k, v = k_hist[-1], v_hist[-1]
                k, v = _l2(k.view(H, K)), v.view(H, V)
                g = -layer.A_log[m].exp() * F.softplus(layer.a_proj[m] @ xt + layer.dt_bias[m])
                S = S * g.exp()[:, None, None]
                if layer.delta:
                    beta = torch.sigmoid(layer.b_proj[m] @ xt)
                    S = S + (beta[:, None] * (v - torch.einsum("hvk,hk->hv", S, k)))[:, :, None] \
                        * k[:, None, :]
                else:
                    S = S + v[:, :, None] * k[:, None, :]
                out[b, t] += w * torch.einsum("hvk,hk->hv", S, qs[t])
    gate = (x @ layer.g_proj.weight.T).view(B, T, H, V)
    normed = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps)
    normed = normed * layer.o_norm.weight * F.silu(gate)
    return normed.reshape(B, T, H * V) @ layer.o_proj.weight.T


def _layer(memory_type, conv=True, shared=True, **kw):
    torch.manual_seed(0)
    layer = MoMLayer(16, num_heads=2, num_memories=4, topk=2, memory_type=memory_type,
                     use_short_conv=conv, conv_size=3, shared_memory=shared, chunk_size=16,
                     **kw).double()
    with torch.no_grad():  # larger decays than the init so that the gates matter at T ~ 20
        layer.A_log.uniform_(-1.0, 0.5)
    return layer


@pytest.mark.parametrize("memory_type", ["gated_delta", "gla"])
@pytest.mark.parametrize("conv,shared", [(True, True), (False, False)], ids=["conv-shared",
                                                                           "noconv-noshared"])
def test_layer_matches_slow_reference(memory_type, conv, shared):
    layer = _layer(memory_type, conv, shared)
    x = torch.randn(3, 21, 16, dtype=torch.float64)
    y, aux, _ = layer(x)
    assert rel_err(y, slow_mom(layer, x)) < 1e-10
    assert aux.ndim == 0 and torch.isfinite(aux)


def test_layer_gradients_match_slow_reference():
    # The layer's backward runs through its own row gathers (_GatherRows); the reference's
    # autograd runs through plain per-token ops.
    layer = _layer("gated_delta")
    x = torch.randn(2, 19, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 19, 16, dtype=torch.float64)
    names = ("k_proj", "v_proj", "a_proj", "b_proj", "A_log", "dt_bias", "q_conv", "k_conv",
             "v_conv", "router.weight")
    params = dict(layer.named_parameters())
    grads = []
    for fn in (lambda: layer(x)[0], lambda: slow_mom(layer, x)):
        (fn() * dy).sum().backward(inputs=[x] + [params[n] for n in names])
        grads.append([x.grad] + [params[n].grad for n in names])
        x.grad = None
        layer.zero_grad(set_to_none=True)
    for name, ours, ref in zip(("x",) + names, *grads):
        assert rel_err(ours, ref) < 1e-10, name


@pytest.mark.parametrize("group", [1, 3])
def test_gather_rows_backward_passes_gradcheck(group):
    torch.manual_seed(0)
    n = 5
    perm = torch.randperm(n * group)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(n * group))
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, perm // group, inv, group),
                                    (x,))


@pytest.mark.parametrize("memory_type,conv", [("gated_delta", True), ("gla", False)],
                         ids=["gdr-conv", "gla-noconv"])
def test_per_memory_parameters_are_the_ones_indexed_by_memory(memory_type, conv):
    # What a task-routed model gives each task: the router's E rows and the E + 1 slots
    # (the shared memory last) of every per-memory projection, gate and convolution.
    layer = MoMLayer(16, num_heads=2, num_memories=4, topk=2, memory_type=memory_type,
                     use_short_conv=conv)
    per_memory = layer.per_memory_parameters()
    assert set(per_memory) == ({"router.weight", "k_proj", "v_proj", "a_proj", "A_log",
                                "dt_bias"} | ({"b_proj"} if memory_type == "gated_delta" else set())
                               | ({"k_conv", "v_conv"} if conv else set()))
    assert per_memory["router.weight"].shape[0] == 4
    assert {p.shape[0] for n, p in per_memory.items() if n != "router.weight"} == {5}


def test_layer_with_memory_mask_matches_reference_and_isolates_memories():
    layer = _layer("gated_delta")
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    y, _, _ = layer(x, memory_mask=mask)
    assert rel_err(y, slow_mom(layer, x, mask)) < 1e-10
    # Sample 0 may not touch memories 2 and 3: their parameters get no gradient from it.
    y[0].sum().backward()
    assert layer.k_proj.grad[2:4].abs().max() == 0 and layer.k_proj.grad[:2].abs().max() > 0


@pytest.mark.parametrize("memory_type", ["gated_delta", "gla"])
def test_decoding_token_by_token_equals_full_forward(memory_type):
    layer = _layer(memory_type)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y_full, _, cache_full = layer(x, use_cache=True)
    cache, ys = None, []
    with torch.no_grad():  # the recurrent decoding path
        for t in range(x.shape[1]):
            y_t, _, cache = layer(x[:, t:t + 1], cache=cache, use_cache=True)
            ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-10
    for name in cache_full:
        assert rel_err(cache[name], cache_full[name]) < 1e-10, name
    # Prefill then decode also agrees (chunk path with a cache, then the recurrent path).
    _, _, cache = layer(x[:, :8], use_cache=True)
    y_rest, _, _ = layer(x[:, 8:], cache=cache, use_cache=True)
    assert rel_err(y_rest, y_full[:, 8:]) < 1e-10


def test_aux_loss_hand_computed():
    # Two tokens, two memories, top-1; probs [0.75, 0.25] and [0.6, 0.4], both pick memory 0:
    # f = [1, 0], P = [0.675, 0.325], loss = E * sum f P = 2 * 0.675 = 1.35.
    probs = torch.tensor([[0.75, 0.25], [0.6, 0.4]])
    topi = torch.tensor([[0], [0]])
    assert abs(switch_aux_loss(probs, topi, 2).item() - 1.35) < 1e-6
    layer = MoMLayer(2, num_heads=1, head_dim=16, num_memories=2, topk=1, aux_loss_weight=1.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[torch.log(torch.tensor(3.0)), 0.0], [torch.log(torch.tensor(1.5)), 0.0]]])
    _, aux, _ = layer(x)
    assert abs(aux.item() - 1.35) < 1e-5


def test_triton_backend_matches_torch_backend():
    layer = _layer("gated_delta").float()
    x = torch.randn(2, 20, 16)
    y_torch, _, _ = layer(x)
    layer.backend = "triton"
    y_triton, _, _ = layer(x)
    assert rel_err(y_triton, y_torch) < 1e-4


def test_mask_with_too_few_memories_raises():
    layer = _layer("gated_delta")
    with pytest.raises(ValueError, match="at least topk=2"):
        layer(torch.randn(1, 4, 16, dtype=torch.float64),
              memory_mask=torch.tensor([[True, False, False, False]]))


def test_triton_decoding_matches_torch_full_forward():
    # Decoding on the Triton recurrent kernel (interpreter): empty segments keep their state.
    layer = _layer("gated_delta").float()
    x = torch.randn(2, 5, 16)
    y_full, _, _ = layer(x)
    layer.backend = "triton"
    cache, ys = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y_t, _, cache = layer(x[:, t:t + 1], cache=cache, use_cache=True)
            ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-4
