"""GDKVM and its ablations (cl_toolkit/models/video.py): the memories against float64 loops of
their rules, the memory cut, the Triton path against the torch path, parameter counts, and
refusals of bad input."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError
from cl_toolkit.models import video
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.validation import check_model_kind

MODELS = ("gdkvm", "linear_kvm", "stm", "frame_unet")


def clip_stream(T=3, C=1, H=16, W=16, K=3, N=2, seed=0, kind="segmentation") -> TaskStream:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, T, C, H, W, generator=g)
    y = torch.randint(0, K, (N, T, H, W), generator=g)
    return TaskStream("toy_clips", [Task(0, "a", TensorData(x, y), TensorData(x, y), (0, 1, 2))],
                      "domain-il", K, (T, C, H, W), kind=kind)


def build(name, stream=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("hidden", 8)
    kw.setdefault("heads", 2)
    return getattr(video, name)(stream or clip_stream(), **kw)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_gdkvm_memory_matches_a_float64_loop_of_the_gated_delta_rule():
    """State after each frame and every readout against S <- a S (I - b k k^T) + b v k^T run
    pixel by pixel in float64 (decay once per frame, on its first pixel), with the gates
    recomputed here from the pooled features and the model's gate weights."""
    stream = clip_stream(T=4)
    model = build("gdkvm", stream)
    x = stream[0].train.x
    trace = []
    with torch.no_grad():
        model(x, trace=trace)
    B, N, H, d = trace[0]["q"].shape
    S = torch.zeros(B, H, d, d, dtype=torch.float64)
    Wa, ba = model.a_proj.weight.double(), model.a_proj.bias.double()
    Wb, bb = model.b_proj.weight.double(), model.b_proj.bias.double()
    for t, rec in enumerate(trace):
        q = rec["q"].double()
        assert torch.allclose(q.norm(dim=-1), torch.ones(B, N, H, dtype=torch.float64), atol=1e-5)
        assert rel(rec["readout"], torch.einsum("bhvk,bnhk->bnhv", S, q)) < 1e-5 or t == 0
        if t == 0:
            assert float(rec["readout"].abs().max()) == 0.0
        if t == len(trace) - 1:
            assert "state" not in rec          # the last frame is not written
            break
        p = rec["pooled"].double()
        a = torch.exp(-model.A_log.double().exp() * F.softplus(p @ Wa.T + ba + model.dt_bias.double()))
        b = torch.sigmoid(p @ Wb.T + bb)
        assert torch.allclose(rec["g"].double().exp(), a, rtol=1e-5) and (a < 1).all()
        assert torch.allclose(rec["beta"].double(), b, rtol=1e-5)
        k, v = rec["k"].double(), rec["v"].double()
        for n in range(N):
            kn, vn = k[:, n], v[:, n]                              # [B, H, d]
            Sk = torch.einsum("bhvk,bhk->bhv", S, kn)
            decay = a[..., None, None] if n == 0 else 1.0
            S = decay * (S - b[..., None, None] * Sk[..., None] * kn[..., None, :]) \
                + b[..., None, None] * vn[..., None] * kn[..., None, :]
        assert rel(rec["state"], S) < 1e-5, f"state after frame {t}"


def test_linear_and_stm_memories_match_float64_loops():
    stream = clip_stream(T=3)
    x = stream[0].train.x
    lin, tr = build("linear_kvm", stream), []
    with torch.no_grad():
        lin(x, trace=tr)
    B, N, H, d = tr[0]["q"].shape
    S = torch.zeros(B, H, d, d, dtype=torch.float64)
    for t, rec in enumerate(tr):
        if t:
            assert rel(rec["readout"], torch.einsum("bhvk,bnhk->bnhv", S, rec["q"].double())) < 1e-5
        if "state" in rec:
            for n in range(N):                                      # no decay, no delta
                S = S + rec["v"][:, n].double()[..., None] * rec["k"][:, n].double()[..., None, :] / N
            assert rel(rec["state"], S) < 1e-5
    stm, tr = build("stm", stream), []
    with torch.no_grad():
        stm.key_proj.weight.mul_(30)      # affinities far from uniform, so the scale matters
        stm(x, trace=tr)
    keys, vals = [], []
    for t, rec in enumerate(tr):
        q = rec["key_map"].double()                                 # STM: q . k / sqrt(d)
        if t:
            mk, mv = torch.cat(keys, 1), torch.cat(vals, 1)         # every stored pixel
            out = torch.zeros_like(q)
            for bi in range(B):
                for h in range(H):
                    w = torch.softmax(q[bi, :, h] @ mk[bi, :, h].T / d ** 0.5, dim=-1)
                    out[bi, :, h] = w @ mv[bi, :, h].double()
            assert rel(rec["readout"], out) < 1e-5
        if "k" in rec:
            keys.append(rec["key_map"].double())
            vals.append(rec["v"].double())
    assert tr[-1]["q"].shape[1] * 2 == sum(k.shape[1] for k in keys)  # T - 1 frames stored


def test_output_depends_on_earlier_frames_only_through_the_memory():
    """Changing frame 0 changes frame 1 and 2's output for the memory models and leaves
    frame_unet's untouched; frame 0's own output is the same for all (empty memory); with one
    set of weights, the memories give different readouts (decay/delta matter)."""
    stream = clip_stream(T=3)
    x = stream[0].train.x
    x2 = x.clone()
    x2[:, 0] = 4 * torch.randn_like(x2[:, 0])     # a very different first frame
    ref = build("gdkvm", stream)
    outs = {}
    for name in MODELS:
        m = build(name, stream)
        m.load_state_dict(ref.state_dict())
        with torch.no_grad():
            outs[name] = (m(x), m(x2))
        a, b = outs[name]
        change = float((a[:, 1:] - b[:, 1:]).abs().max())
        if name == "frame_unet":
            assert change == 0.0
        else:
            assert change > 1e-6, name
            tr, tr2 = [], []
            with torch.no_grad():
                m(x, trace=tr)
                m(x2, trace=tr2)
            assert rel(tr2[1]["readout"], tr[1]["readout"]) > 1e-3, name
    for name in MODELS[1:]:
        assert torch.allclose(outs[name][0][:, 0], outs["gdkvm"][0][:, 0], atol=1e-6)
        assert float((outs[name][0][:, 1:] - outs["gdkvm"][0][:, 1:]).abs().max()) > 1e-6, name
    tr_g, tr_l = [], []
    lin = build("linear_kvm", stream)
    lin.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref(x, trace=tr_g)
        lin(x, trace=tr_l)
    assert rel(tr_g[1]["readout"], tr_l[1]["readout"]) > 1e-3
    # on keys that are not near-collinear (an untrained encoder's are), the gap is large
    g = torch.Generator().manual_seed(1)
    k = [F.normalize(torch.randn(2, 16, 2, 4, generator=g), dim=-1) for _ in range(3)]
    v = [torch.randn(2, 16, 2, 4, generator=g) for _ in range(3)]
    gate, beta = torch.full((2, 2), -0.5), torch.full((2, 2), 0.6)
    reads = {}
    for mem in (video.GDRMemory("torch"), video.LinearMemory("torch")):
        S = None
        for t in range(2):
            S = mem.write(S, k[t], v[t], gate, beta)
        reads[mem.name] = mem.read(S, k[2])
    assert rel(reads["gdr"], reads["linear"]) > 0.3


def test_parameter_counts_are_equal_and_as_counted_by_hand():
    """hidden=8, heads=2 (d=4), C=1, K=3: widths c1=2, c2=4."""
    conv = lambda cin, cout, k=3: cout * cin * k * k + cout
    key_encoder = conv(1, 2) + conv(2, 2) + conv(2, 4) + conv(4, 4) + conv(4, 8) + conv(8, 8)
    key_proj = conv(8, 8, 1)
    value_encoder = conv(1 + 3, 4) + conv(4, 8) + conv(8, 8, 1) + conv(8, 8) + conv(8, 8, 1)
    gates = 2 * (8 * 2 + 2) + 2 + 2                     # a_proj, b_proj, A_log, dt_bias
    kpff = conv(8, 1, 1) + 3 * conv(8, 8, 1) + conv(8, 8)
    decoder = conv(8 + 4, 4) + conv(4 + 2, 2) + conv(2, 3, 1)
    expected = key_encoder + key_proj + value_encoder + gates + kpff + decoder
    counts = {n: sum(p.numel() for p in build(n).parameters()) for n in MODELS}
    assert expected == 3810
    assert counts == {n: 3810 for n in MODELS}
    # the default width: equal too
    assert len({sum(p.numel() for p in build(n, hidden=32, heads=2).parameters())
                for n in MODELS}) == 1


def test_memory_bytes_constant_for_linear_memories_and_growing_for_stm():
    for T in (3, 6):
        s = clip_stream(T=T)                               # 16x16 -> 16 tokens, heads 2, d 4
        assert build("gdkvm", s).memory_bytes() == build("linear_kvm", s).memory_bytes() \
            == 2 * 4 * 4 * 4
        assert build("stm", s).memory_bytes() == (T - 1) * 16 * 2 * (4 + 4) * 4
        assert build("frame_unet", s).memory_bytes() == 0
        assert build("gdkvm", s).uses_task_id is False


def _triton_ready() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_ready(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
def test_gdkvm_triton_path_matches_torch_path_forward_and_backward():
    stream = clip_stream(T=2, H=16, W=16, N=1)
    x, y = stream[0].train.x, stream[0].train.y
    grads, outs = {}, {}
    for backend in ("torch", "triton"):
        m = build("gdkvm", stream, hidden=16, heads=1, backend=backend)
        out = m(x)
        F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1)).backward()
        outs[backend] = out.detach()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters()
                          if p.grad is not None}
    assert rel(outs["triton"], outs["torch"]) < 1e-4
    assert set(grads["triton"]) == set(grads["torch"])
    for n in ("A_log", "dt_bias", "a_proj.weight", "b_proj.weight", "value_encoder.out.weight",
              "key_proj.weight"):
        assert grads["torch"][n].abs().sum() > 0, n       # the memory's parameters learn
    for n, gt in grads["torch"].items():     # an absolute floor for gradients near 0 at init
        assert float((grads["triton"][n] - gt).norm()) <= 1e-3 * float(gt.norm()) + 1e-9, n


def _stream(**kw):
    return clip_stream(**kw)


@pytest.mark.parametrize("name", MODELS)
def test_bad_streams_are_refused_with_the_key_and_the_fix(name):
    with pytest.raises(ConfigError, match=r"multiples? of 4.*18x18.*benchmark.height=16 benchmark.width=16"):
        build(name, _stream(H=18, W=18))
    image_seg = TaskStream("img", [Task(0, "a", TensorData(torch.rand(2, 1, 8, 8),
                                                           torch.zeros(2, 8, 8, dtype=torch.long)),
                                         TensorData(torch.rand(2, 1, 8, 8),
                                                    torch.zeros(2, 8, 8, dtype=torch.long)),
                                         (0, 1))], "domain-il", 2, (1, 8, 8), kind="segmentation")
    with pytest.raises(ConfigError, match=f"model={name} segments video clips.*benchmark=img"):
        build(name, image_seg)
    images = TaskStream("digits", [Task(0, "a", TensorData(torch.rand(2, 1, 8, 8),
                                                           torch.tensor([0, 1])),
                                        TensorData(torch.rand(2, 1, 8, 8), torch.tensor([0, 1])),
                                        (0, 1))], "class-il", 2, (1, 8, 8))
    with pytest.raises(ConfigError, match="classification tasks"):
        build(name, images)
    with pytest.raises(ConfigError, match="model.hidden=9 is not a multiple of model.heads=2"):
        build(name, hidden=9)
    if name == "frame_unet":
        assert build(name, _stream(T=1))(torch.rand(1, 1, 1, 16, 16)).shape == (1, 1, 3, 16, 16)
    else:
        with pytest.raises(ConfigError, match=r"at least 2 frame.*T=1.*benchmark.frames=2 or more.*model=frame_unet"):
            build(name, _stream(T=1))
    with pytest.raises(ValueError, match=r"clips x \[B, T, C, H, W\]"):
        build(name)(torch.rand(2, 1, 16, 16))


def test_runner_refuses_video_models_on_image_streams_by_their_task_kinds():
    with pytest.raises(ConfigError, match="model=gdkvm cannot take.*segmentation"):
        check_model_kind("gdkvm", "classification", "split_digits")
    with pytest.raises(ConfigError, match="model=stm cannot take"):
        check_model_kind("stm", "tokens", "mqar")
    with pytest.raises(ConfigError, match="model.backend='cuda'"):
        build("gdkvm", backend="cuda")
