"""Shared helpers for the kernels: validation, chunk bookkeeping, autotune policy.

Everything here depends on torch (and triton only where a kernel is launched).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "triton", "torch", "naive")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Chunk lengths the chunk kernels tile a sequence into (the Triton kernels' block sizes; the
# torch path takes the same ones, so every backend gives the same chunking).
CHUNK_SIZES = (16, 32, 64, 128)


def is_interpreter() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def autotune_configs(configs: Sequence):
    """Under the interpreter there is no driver to time on: keep a single config."""
    return list(configs[:1]) if is_interpreter() else list(configs)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': CUDA -> 'triton', CPU -> 'torch'. 'triton' on CPU needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if backend == "triton" and device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 "
            "to run the Triton kernels on CPU, or use backend='torch'"
        )
    return backend


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], total: int,
                     batch: int) -> Optional[list]:
    """cu_seqlens must be a 1-D integer tensor, start at 0, never decrease, end at ``total``.

    Zero-length sequences are allowed (the MoM layer packs possibly empty segments). Returns
    cu_seqlens as a host list (None without it), so the layout needs no second device sync.
    """
    if cu_seqlens is None:
        return None
    check_is_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(
            f"with cu_seqlens the inputs must be packed as [1, total, H, D]; got batch size {batch}"
        )
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the total length {total}, got {cu[-1]}")
    bad = [i for i in range(1, len(cu)) if cu[i] < cu[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"cu_seqlens must be non-decreasing; "
            f"cu_seqlens[{i - 1}]={cu[i - 1]} > cu_seqlens[{i}]={cu[i]}"
        )
    return cu


def check_is_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        kind = type(x)
        raise ValueError(f"{name} must be a torch.Tensor, got {kind.__module__}.{kind.__name__}; "
                         "convert it with torch.as_tensor")


def check_tensor(name: str, x: torch.Tensor, shape: Sequence[int], device: torch.device,
                 dtypes: Optional[Sequence[torch.dtype]] = None, contiguous: bool = True) -> None:
    check_is_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; "
                         "move it with .to(q.device)")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {list(dtypes)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {x.stride()}); "
                         "call .contiguous() first")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; one floating dtype, one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_is_tensor(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    B, T, H, K = q.shape
    if B == 0:
        raise ValueError(f"q holds a batch of 0 sequences (shape {tuple(q.shape)}); pass at "
                         "least one")
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got shape {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}; expected {q.dtype} (q's dtype)")
        check_tensor(name, x, tuple(x.shape), q.device, contiguous=False)


def check_log_decay(g: torch.Tensor) -> None:
    """g is a log-decay: finite and <= 0.

    A positive g grows the state without bound, and the chunk paths' exp(G_t - G_i) then
    overflows to inf and NaN without an error; -inf and NaN break them too. The values are read
    on CPU tensors only (the torch/naive paths, the Triton interpreter): on a GPU the check
    would be a device sync per call, which the layers avoid (their gates are <= 0 by
    construction). On a GPU a positive g is the caller's error.
    """
    if g.device.type != "cpu":
        return
    bad = ~(g <= 0) | torch.isneginf(g)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"g is a log-decay and must be finite and <= 0, got g{i} = {g[tuple(i)].item()}; "
            "pass log(a) of a decay a in (0, 1] (e.g. F.logsigmoid(x)), or gate logits as "
            "gate_logits= with A_log and dt_bias"
        )


def check_beta(beta: torch.Tensor) -> None:
    """beta is the delta rule's step size: in [0, 1]. Outside it the update
    S (I - beta k k^T) no longer contracts along k and the state grows without bound (beta = 3
    gives outputs of 1e31 after a few hundred tokens). Read on CPU tensors only, as
    :func:`check_log_decay` (the layers make beta with a sigmoid)."""
    if beta.device.type != "cpu":
        return
    bad = ~((beta >= 0) & (beta <= 1))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"beta is the delta rule's step size and must lie in [0, 1], got beta{i} = "
            f"{beta[tuple(i)].item()}; pass sigmoid(x) of the beta logits"
        )


def check_scale(scale) -> None:
    """scale multiplies q: a finite number, or None for K ** -0.5."""
    if scale is None:
        return
    try:
        finite = math.isfinite(float(scale))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"scale must be a finite number (it multiplies q), got {scale!r}; "
                         "pass None for the default K ** -0.5")


def check_inputs(q, k, v, g=None, beta=None, initial_state=None, cu_seqlens=None, *,
                 g_is_log_decay: bool = True, scale=None) -> Optional[list]:
    """Shapes, dtypes and devices of one op call (every public entry point runs it).

    q, k [B, T, H, K] (B >= 1), v [B, T, H, V], g and beta [B, T, H], initial_state
    [N, H, V, K], cu_seqlens [N+1], scale finite or None; g's values as
    :func:`check_log_decay` unless it holds gate logits, beta's as :func:`check_beta`.
    Returns cu_seqlens as a host list (None without it), as :func:`check_cu_seqlens`.
    """
    check_scale(scale)
    check_qkv(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    cu_host = check_cu_seqlens(cu_seqlens, T, B)
    if cu_seqlens is not None and cu_seqlens.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; "
                         "pass it on q's device or on the CPU")
    n = B if cu_host is None else len(cu_host) - 1
    for name, x, shape in (("g", g, (B, T, H)), ("beta", beta, (B, T, H)),
                           ("initial_state", initial_state, (n, H, V, K))):
        if x is not None:
            check_tensor(name, x, shape, q.device, FLOATS, contiguous=False)
    if g is not None and g_is_log_decay:
        check_log_decay(g)
    if beta is not None:
        check_beta(beta)
    return cu_host


def check_triton_inputs(**tensors) -> None:
    """What the Triton kernels need beyond :func:`check_inputs`: q (so k, v) in
    float16/bfloat16/float32, and every tensor given contiguous."""
    q = tensors["q"]
    if q.dtype not in TRITON_FLOATS:
        raise ValueError(f"the Triton path supports float16/bfloat16/float32, got {q.dtype}; "
                         "use backend='torch' or 'naive' for float64")
    for name, x in tensors.items():
        if x is not None and not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {x.stride()}); "
                             "call .contiguous() first")


@dataclass(frozen=True)
class SeqLayout:
    """How the flattened [B*T] token axis splits into sequences and chunks.

    cu_seqlens: [N+1] int32 sequence starts; chunk_indices: [NT, 2] int32 (sequence, chunk
    within sequence) for every chunk; chunk_offsets: [N+1] int32 first global chunk of each
    sequence. Chunks never straddle two sequences.
    """
    cu_seqlens: torch.Tensor
    chunk_indices: torch.Tensor
    chunk_offsets: torch.Tensor
    num_seqs: int
    num_chunks: int
    chunk_size: int


def make_layout(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int,
                device: torch.device, cu_host: Optional[Sequence[int]] = None) -> SeqLayout:
    """cu_host: cu_seqlens already on the host (from :func:`check_cu_seqlens`); either one
    gives a varlen layout, neither the equal-length one."""
    if cu_seqlens is None and cu_host is None:
        return _equal_layout(batch, seqlen, chunk_size, torch.device(device))
    cu = cu_seqlens.tolist() if cu_host is None else list(cu_host)
    nts = [(b - a + chunk_size - 1) // chunk_size for a, b in zip(cu[:-1], cu[1:])]
    n = len(nts)
    offsets = [0]
    for c in nts:
        offsets.append(offsets[-1] + c)
    pairs = [v for i, c in enumerate(nts) for j in range(c) for v in (i, j)]
    # One copy for all three; each part starts 16-byte aligned, as Triton specialises on it.
    a = -(-(n + 1) // 4) * 4
    pad = [0] * (a - n - 1)
    flat = host_to_device(cu + pad + offsets + pad + pairs, device)
    return SeqLayout(flat[:n + 1], flat[2 * a:].view(-1, 2), flat[a:a + n + 1], n,
                     offsets[-1], chunk_size)


def host_to_device(values: Sequence[int], device) -> torch.Tensor:
    """int32 tensor of host ints on ``device`` without a device sync: a blocking copy from
    pageable memory waits for the stream to drain, which would stall the host each call
    (the MoM layer builds several layouts per forward). Pinned memory from torch's caching
    host allocator, copied asynchronously; the allocator keeps the block until the copy is
    done."""
    t = torch.tensor(values, dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _equal_layout(batch: int, seqlen: int, chunk_size: int, device: torch.device) -> SeqLayout:
    """Equal lengths: pure arithmetic, no host sync; cached because on a GPU its five small
    kernel launches cost about as much host time as the chunk kernels' own launches."""
    nt = (seqlen + chunk_size - 1) // chunk_size
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen
    seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(nt)
    chk = torch.arange(nt, device=device, dtype=torch.int32).repeat(batch)
    offsets = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * nt
    return SeqLayout(cu, torch.stack([seq, chk], 1).contiguous(), offsets, batch, batch * nt,
                     chunk_size)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the H100's 132 elsewhere (the interpreter),
    so launch shapes there match the common GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). Plain Python: ``triton.cdiv`` is a constexpr function whose call
    costs microseconds, and the host work of a kernel call adds up (kernel_host_overhead.py)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of two >= n (n >= 1), plain Python as :func:`cdiv`."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=1)
def _poison() -> bool:
    """CLTK_KERNELS_POISON, read at the first buffer (environment lookups cost microseconds)."""
    return os.environ.get("CLTK_KERNELS_POISON", "0") == "1"


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, but NaN-filled when CLTK_KERNELS_POISON=1 (tests) so unwritten outputs fail."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dim in fp32 or better (the delta rule needs ||k|| = 1)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-decay of Gated DeltaNet: g = -exp(A_log) * softplus(a + dt_bias), in fp32 or better
    (float64 for float64 logits, so the float64 reference path stays float64).

    a: [B, T, H]; A_log, dt_bias: [H]. https://arxiv.org/abs/2412.06464
    """
    dt = torch.promote_types(a.dtype, torch.float32)
    return -A_log.to(dt).exp() * torch.nn.functional.softplus(a.to(dt) + dt_bias.to(dt))


def check_hidden_states(x, hidden_size: int, device: torch.device,
                        dtype: Optional[torch.dtype] = None) -> None:
    """A layer's input: a floating tensor [B, T, hidden_size] on the layer's device, in the
    dtype of its weights (``dtype``) unless autocast chooses the dtypes."""
    check_is_tensor("x", x)
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must be [B, T, hidden_size={hidden_size}], got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype} (token ids go through an "
                         "embedding first)")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the layer is on {device}; move one of them")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"x has dtype {x.dtype} but the layer's weights are {dtype}; convert "
                         f"one of them (layer.to({x.dtype}) or x.to({dtype}))")


def split_seqs(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int):
    """List of (batch index, start, end) triples that the token loops of the references walk."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
