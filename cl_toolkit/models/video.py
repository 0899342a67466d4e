"""Video segmentation models for ``segmentation`` clip streams: GDKVM and three ablations that
differ only in the memory across frames, at equal parameters.

GDKVM (Wang et al., ICCV 2025, "Echocardiography Video Segmentation via Spatiotemporal Key-Value
Memory with Gated Delta Rule", https://arxiv.org/abs/2512.10252). Ours is a reconstruction from
the paper, its abstract and project page (https://wangrui2025.github.io/GDKVM/): the issue was
filed when the authors had released no code. A code drop has since appeared
(github.com/wangrui2025/gdkvm_code, a Cutie-derived ResNet network with an object transformer);
we read it, copied nothing, and kept the design below, noting where it differs.

Input ``x [B, T, C, H, W]``, output class logits ``[B, T, K, H, W]`` (K incl. background 0). No
first-frame mask is given (GDKVM's echo setting): every frame is segmented from its image and
the memory of the frames before it. Per clip:

1. Key encoder (all frames at once): a small conv encoder with pixel features at strides 1, 2,
   4 (``f1, f2, f4``); a 1x1 projection of ``f4`` gives the key map, ``heads`` heads of width
   ``d = hidden / heads``, one key per pixel of the stride-4 grid (``N = H W / 16`` tokens).
2. For frame t = 0 .. T-1 (a Python loop: T is small; batched over clips and heads):
   read the memory of frames < t with the frame's keys as queries; fuse the readout with key
   and pixel features (KPFF) and decode to logits at full resolution; then encode the frame's
   value from the frame and its own predicted mask (softmax probabilities, detached: our
   choice, so the prediction enters the value like a given mask would and no gradient runs
   back through the argmax-like path of earlier frames' masks; the gradient still reaches the
   value encoder through later frames' readouts) and write it into the memory.
   The last frame is not written (nothing reads it).

Memories (``memory=``):

- ``gdr`` (model ``gdkvm``): LKVA + GDR. Per head a state ``S [d, d]``; frame t is written as
  ``S_t = a_t S_{t-1} (I - b_t k k^T) + b_t v k^T`` over its N pixels, in one call of our
  `chunk_gated_delta_rule` kernel with the pixels as tokens, ``initial_state = S_{t-1}``: the
  log-decay ``g = log a_t`` sits on the frame's first pixel token and 0 on the others (the
  decay applied once per frame), ``beta = b_t`` on every pixel. So the write is the delta rule
  pixel after pixel inside the frame. The paper's formula, read with K the frame's N x d key
  matrix, would write ``a S (I - b K^T K) + b V^T K`` at once; with N > d unit keys ``K^T K``
  has eigenvalues up to N/d and ``I - b K^T K`` is no contraction (the state can blow up),
  while each pixel step with a unit key and b in [0, 1] is one. Both equal the paper's rule
  for one pixel; ours is the stable one our kernels compute exactly (our choice). Keys are
  L2-normalised per head (our choice; the delta rule needs unit keys for ``I - b k k^T`` to be
  a projection; the code drop uses a softmax over channels). Gates per frame from the frame's
  pooled value features ``p`` (mean over pixels of the value encoder's hidden map):
  ``log a_t = -exp(A_log) softplus(W_a p + dt_bias)`` (Gated DeltaNet's parametrisation,
  https://arxiv.org/abs/2412.06464; the code drop uses it too, on the state instead of the
  frame), ``b_t = sigmoid(W_b p)``. Read: ``r = S_{t-1} q`` (unit q, no scale).
- ``linear`` (``linear_kvm``): plain linear attention, no decay, no delta:
  ``S_t = S_{t-1} + (1/N) sum_pixels v k^T`` through our `chunk_linear_attn` kernel (the 1/N
  keeps a frame's write the size of one unit write, so the readout does not grow with the
  pixel count: our choice). Same keys and read as ``gdr``; the gate layers go unused.
- ``stm`` (``stm``): space-time memory (Oh et al., ICCV 2019, https://arxiv.org/abs/1904.00607):
  every stored frame's keys and values are kept, and a query pixel reads
  ``softmax_m(q . k_m / sqrt(d)) v_m`` over all (T' N) stored pixels: memory and time grow with
  the frames stored, the read is quadratic in clip length over a clip. Keys are the key map
  unnormalised (STM's dot-product affinity, scaled: our choice).
- ``none`` (``frame_unet``): the readout is zero; the value encoder and gates are not run (they
  would not change the output). A per-frame U-Net with the same parameters.

KPFF (Key-Pixel Feature Fusion): the key map plus its global mean (local and global key
features) sets a per-pixel sigmoid gate that mixes the projected key with the projected pixel
features ``f4``; the readout is projected and added, then a 3x3 conv. The decoder goes to
strides 2 and 1, each step fusing the pixel features of that scale (``f2``, ``f1``), and ends in
a 1x1 conv to K logits. Widths, depths and the exact fusion are our choices (the paper's
network is ResNet-based and much larger).

``memory_bytes()``: the memory one clip of the stream's length carries at its end (float32): a
``d x d`` state per head for ``gdr`` / ``linear`` (constant in T), every written frame's keys
and values for ``stm`` (linear in T), 0 for ``none``. ``uses_task_id = False``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels.gated_delta_rule import chunk_gated_delta_rule
from ..kernels.linear_attn import chunk_linear_attn
from ..validation import at_least, one_of

STRIDE = 4          # total stride of the key encoder (the memory's pixel grid)
MEMORIES = ("gdr", "linear", "stm", "none")
BACKENDS = ("auto", "triton", "torch", "naive")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class KeyEncoder(nn.Module):
    """Frames ``[M, C, H, W]`` -> pixel features ``f1 [M, c1, H, W]``, ``f2 [M, c2, H/2, W/2]``,
    ``f4 [M, hidden, H/4, W/4]``."""

    def __init__(self, C: int, c1: int, c2: int, hidden: int):
        super().__init__()
        self.s1 = nn.Sequential(_conv(C, c1), nn.ReLU(), _conv(c1, c1), nn.ReLU())
        self.s2 = nn.Sequential(_conv(c1, c2, 2), nn.ReLU(), _conv(c2, c2), nn.ReLU())
        self.s4 = nn.Sequential(_conv(c2, hidden, 2), nn.ReLU(), _conv(hidden, hidden), nn.ReLU())

    def forward(self, x):
        f1 = self.s1(x)
        f2 = self.s2(f1)
        return f1, f2, self.s4(f2)


class ValueEncoder(nn.Module):
    """A frame ``[B, C, H, W]``, its mask probabilities ``[B, K, H, W]`` and its pixel features
    ``f4`` -> values ``[B, heads * d, H/4, W/4]`` and the pooled hidden map ``[B, hidden]`` (the
    gates' input)."""

    def __init__(self, C: int, K: int, c2: int, hidden: int, out: int):
        super().__init__()
        self.down = nn.Sequential(_conv(C + K, c2, 2), nn.ReLU(), _conv(c2, hidden, 2))
        self.pix = nn.Conv2d(hidden, hidden, 1)
        self.mix = _conv(hidden, hidden)
        self.out = nn.Conv2d(hidden, out, 1)

    def forward(self, frame, probs, f4):
        h = F.relu(self.down(torch.cat([frame, probs], 1)) + self.pix(f4))
        h = F.relu(self.mix(h))
        return self.out(h), h.mean((2, 3))


class KPFF(nn.Module):
    """Key-Pixel Feature Fusion at stride 4 (see the module docstring)."""

    def __init__(self, key_dim: int, value_dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Conv2d(key_dim, 1, 1)
        self.key = nn.Conv2d(key_dim, hidden, 1)
        self.pix = nn.Conv2d(hidden, hidden, 1)
        self.mem = nn.Conv2d(value_dim, hidden, 1)
        self.out = _conv(hidden, hidden)

    def forward(self, kmap, f4, readout):
        key = kmap + kmap.mean((2, 3), keepdim=True)
        w = torch.sigmoid(self.gate(key))
        fused = w * self.key(key) + (1 - w) * self.pix(f4)
        return F.relu(self.out(fused + self.mem(readout)))


def _heads(m: torch.Tensor, heads: int) -> torch.Tensor:
    """A map ``[B, heads * d, h, w]`` -> tokens ``[B, h * w, heads, d]`` (row-major pixels)."""
    B, D, h, w = m.shape
    return m.reshape(B, heads, D // heads, h * w).permute(0, 3, 1, 2).contiguous()


def _unheads(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[B, h * w, heads, d]`` -> a map ``[B, heads * d, h, w]``."""
    B, _, H, d = t.shape
    return t.permute(0, 2, 3, 1).reshape(B, H * d, h, w)


class GDRMemory:
    """LKVA state written by the gated delta rule (our chunk kernel); state ``[B, heads, d, d]``
    (the kernels' ``[N, H, V, K]``) or None while empty."""

    name = "gdr"

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def keys(self, k):
        return F.normalize(k, dim=-1)

    def read(self, state, q):
        """``r = S q`` for every query pixel: ``q [B, N, H, d]`` -> ``[B, N, H, d]``."""
        if state is None:
            return torch.zeros_like(q)
        return torch.einsum("bhvk,bnhk->bnhv", state.to(q.dtype), q)

    def write(self, state, k, v, g, beta):
        """One frame: ``k, v [B, N, H, d]``, ``g`` (log a_t) and ``beta`` ``[B, H]``."""
        B, N, H, _ = k.shape
        g_tok = torch.cat([g[:, None], g.new_zeros(B, N - 1, H)], 1)
        b_tok = beta[:, None].expand(B, N, H).contiguous()
        _, final = chunk_gated_delta_rule(k, k, v, g_tok, b_tok, initial_state=state,
                                          output_final_state=True, backend=self.backend)
        return final

    def state_bytes(self, frames, tokens, heads, d):
        return heads * d * d * 4


class LinearMemory(GDRMemory):
    """Plain linear attention: ``S += (1/N) sum v k^T`` per frame (our `chunk_linear_attn`)."""

    name = "linear"

    def write(self, state, k, v, g, beta):
        _, final = chunk_linear_attn(k, k, v / k.shape[1], initial_state=state,
                                     output_final_state=True, backend=self.backend)
        return final


class STMMemory:
    """Space-time memory: the stored frames' keys and values ``([B, M, H, d], [B, M, H, d])``
    with M = stored frames x N; read by a softmax over all M."""

    name = "stm"

    def keys(self, k):
        # q . k / sqrt(d) as a plain dot product of keys scaled by d^-1/4 on each side
        return k * k.shape[-1] ** -0.25

    def read(self, state, q):
        if state is None:
            return torch.zeros_like(q)
        mk, mv = state
        attn = torch.softmax(torch.einsum("bnhk,bmhk->bhnm", q, mk), dim=-1)
        return torch.einsum("bhnm,bmhv->bnhv", attn, mv)

    def write(self, state, k, v, g, beta):
        if state is None:
            return k, v
        return torch.cat([state[0], k], 1), torch.cat([state[1], v], 1)

    def state_bytes(self, frames, tokens, heads, d):
        return max(frames - 1, 0) * tokens * heads * 2 * d * 4


class VideoSegmenter(nn.Module):
    """Key encoder, value encoder, gates, KPFF and decoder; ``memory`` picks what carries frames
    forward (``gdr`` | ``linear`` | ``stm`` | ``none``). See the module docstring."""

    uses_task_id = False

    def __init__(self, frames: int, C: int, H: int, W: int, num_classes: int, hidden: int,
                 heads: int, memory: str, backend: str = "auto"):
        super().__init__()
        self.frames, self.heads, self.d = frames, heads, hidden // heads
        self.tokens = (H // STRIDE) * (W // STRIDE)
        c1, c2 = max(hidden // 4, 2), max(hidden // 2, 2)
        self.encoder = KeyEncoder(C, c1, c2, hidden)
        self.key_proj = nn.Conv2d(hidden, hidden, 1)
        self.value_encoder = ValueEncoder(C, num_classes, c2, hidden, hidden)
        self.a_proj = nn.Linear(hidden, heads)
        self.b_proj = nn.Linear(hidden, heads)
        # Gated DeltaNet's init: A ~ U(1, 16), softplus(dt_bias) = dt ~ logU(1e-3, 1e-1)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(heads) * (torch.log(torch.tensor(0.1)) - torch.log(
            torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.kpff = KPFF(hidden, hidden, hidden)
        self.dec2 = _conv(hidden + c2, c2)
        self.dec1 = _conv(c2 + c1, c1)
        self.head = nn.Conv2d(c1, num_classes, 1)
        self.memory_kind = memory
        self.memory = {"gdr": GDRMemory(backend), "linear": LinearMemory(backend),
                       "stm": STMMemory(), "none": None}[memory]

    def gates(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per frame and head: ``log a_t`` (<= 0) and ``b_t`` in (0, 1), each ``[B, heads]``."""
        g = -self.A_log.exp() * F.softplus(self.a_proj(pooled) + self.dt_bias)
        return g, torch.sigmoid(self.b_proj(pooled))

    def decode(self, f1, f2, f4, kmap, readout):
        """One frame's features and readout map -> logits ``[B, K, H, W]``."""
        z = self.kpff(kmap, f4, readout)
        z = F.relu(self.dec2(torch.cat([F.interpolate(z, size=f2.shape[-2:], mode="bilinear",
                                                      align_corners=False), f2], 1)))
        z = F.relu(self.dec1(torch.cat([F.interpolate(z, size=f1.shape[-2:], mode="bilinear",
                                                      align_corners=False), f1], 1)))
        return self.head(z)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None,
                trace: list | None = None) -> torch.Tensor:
        """``x [B, T, C, H, W]`` -> logits ``[B, T, K, H, W]``. With ``trace`` (a list), one dict
        per frame is appended: its unscaled key map (``key_map [B, N, H, d]``), queries, readout,
        and (frames written) keys, values, gates,
        pooled features and the state after the write, for tests and inspection."""
        if x.dim() != 5 or x.shape[1] < 1 or x.shape[-1] % STRIDE or x.shape[-2] % STRIDE:
            raise ValueError(f"model input: clips x [B, T, C, H, W] with T >= 1 and H, W "
                             f"multiples of {STRIDE}; got {tuple(x.shape)}")
        B, T, _, H, W = x.shape
        h, w = H // STRIDE, W // STRIDE
        f1, f2, f4 = (f.reshape(B, T, *f.shape[1:]) for f in self.encoder(x.flatten(0, 1)))
        kmap = self.key_proj(f4.flatten(0, 1)).reshape(B, T, -1, h, w)
        mem = self.memory
        keys = mem.keys(_heads(kmap.flatten(0, 1), self.heads)).reshape(
            B, T, h * w, self.heads, self.d) if mem is not None else None
        state, out = None, []
        for i in range(T):
            rec = {}
            if mem is None:
                readout = kmap.new_zeros(B, self.heads * self.d, h, w)
            else:
                q = keys[:, i].contiguous()
                r = mem.read(state, q)
                readout = _unheads(r, h, w)
                rec.update(q=q, readout=r, key_map=_heads(kmap[:, i], self.heads))
            logits = self.decode(f1[:, i], f2[:, i], f4[:, i], kmap[:, i], readout)
            out.append(logits)
            if mem is not None and i < T - 1:
                probs = torch.softmax(logits, 1).detach()
                vmap, pooled = self.value_encoder(x[:, i], probs, f4[:, i])
                v = _heads(vmap, self.heads)
                g, beta = self.gates(pooled)
                state = mem.write(state, q, v, g, beta)
                rec.update(k=q, v=v, g=g, beta=beta, pooled=pooled, state=state)
            if trace is not None:
                trace.append(rec)
        return torch.stack(out, 1)

    def memory_bytes(self) -> int:
        """Bytes of memory one clip of the stream's length carries at its end (module
        docstring)."""
        if self.memory is None:
            return 0
        return self.memory.state_bytes(self.frames, self.tokens, self.heads, self.d)


def _video_layout(stream, model: str, min_frames: int) -> tuple[int, int, int, int]:
    """(frames, channels, height, width) of a clip segmentation stream; a ConfigError naming
    the fix for any other stream."""
    shape = tuple(getattr(stream, "input_shape", ()) or ())
    if getattr(stream, "kind", None) != "segmentation" or len(shape) != 4:
        what = f"{stream.kind} tasks" + (f" of shape {shape}" if shape else "")
        raise ConfigError(
            f"model={model} segments video clips and needs a segmentation stream of clips "
            f"x [N, T, C, H, W] with masks [N, T, H, W]; benchmark={stream.name} holds {what}. "
            "Use a video stream (e.g. benchmark=echo_phantom), or an image or sequence model "
            "for this one (model=mlp, cnn, gdn, ...).")
    T, C, H, W = shape
    if H % STRIDE or W % STRIDE or H < STRIDE or W < STRIDE:
        raise ConfigError(
            f"model={model}: its encoder has a total stride of {STRIDE}, so the frame height and "
            f"width must be multiples of {STRIDE}; benchmark={stream.name} gives {H}x{W}. Set "
            f"benchmark.height and benchmark.width to multiples of {STRIDE} (e.g. "
            f"benchmark.height={max(STRIDE, H // STRIDE * STRIDE)} "
            f"benchmark.width={max(STRIDE, W // STRIDE * STRIDE)}).")
    if T < min_frames:
        fix = "set benchmark.frames=2 or more, or use model=frame_unet (no memory)" \
            if min_frames > 1 else "set benchmark.frames=1 or more"
        raise ConfigError(
            f"model={model} needs clips of at least {min_frames} frame(s) (its memory reads the "
            f"frames before the current one); benchmark={stream.name} gives T={T}: {fix}.")
    if stream.num_classes < 2:
        raise ConfigError(f"model={model}: benchmark={stream.name} has num_classes="
                          f"{stream.num_classes}; segmentation needs background and at least "
                          "one foreground class.")
    return T, C, H, W


def _build(stream, model: str, memory: str, hidden: int, heads: int, backend: str):
    T, C, H, W = _video_layout(stream, model, 1 if memory == "none" else 2)
    if hidden % heads:
        raise ConfigError(f"model.hidden={hidden} is not a multiple of model.heads={heads}: the "
                          "heads split the key and value width; choose hidden = heads x d.")
    if backend not in BACKENDS:
        raise ConfigError(f"model.backend={backend!r}; choose one of {', '.join(BACKENDS)}.")
    return VideoSegmenter(T, C, H, W, stream.num_classes, hidden, heads, memory, backend)


def gdkvm(stream, hidden: int = 32, heads: int = 2, backend: str = "auto") -> nn.Module:
    """GDKVM: the gated-delta-rule key-value memory (LKVA + GDR + KPFF)."""
    return _build(stream, "gdkvm", "gdr", hidden, heads, backend)


def linear_kvm(stream, hidden: int = 32, heads: int = 2, backend: str = "auto") -> nn.Module:
    """The same network with plain linear attention as the memory (no decay, no delta)."""
    return _build(stream, "linear_kvm", "linear", hidden, heads, backend)


def stm(stream, hidden: int = 32, heads: int = 2) -> nn.Module:
    """The same network with a softmax space-time memory over every stored frame (STM)."""
    return _build(stream, "stm", "stm", hidden, heads, "auto")


def frame_unet(stream, hidden: int = 32, heads: int = 2) -> nn.Module:
    """The same network with the memory cut (readout zero): a per-frame U-Net."""
    return _build(stream, "frame_unet", "none", hidden, heads, "auto")


def _smoke_hidden(node: dict) -> int:
    """smoke=true's width: 8 per head (heads split it)."""
    return 8 * int(node.get("heads", 1) or 1)


for _f in (gdkvm, linear_kvm, stm, frame_unet):
    _f.needs_stream = True
    _f.task_kinds = ("segmentation",)
    _f.ranges = {"hidden": at_least(1), "heads": at_least(1)}
    _f.smoke = {"hidden": _smoke_hidden}
gdkvm.ranges = linear_kvm.ranges = {"hidden": at_least(1), "heads": at_least(1),
                                    "backend": one_of(*BACKENDS)}
