"""Sequence backbones for task streams ("memory-partitioned learners", DESIGN.md section 7).

One block family, pre-norm residual: x + mixer(norm(x)), then x + SwiGLU(norm(x)). Only the
token mixer changes, so the memory is the only variable between the four backbones:

- ``mom``: Mixture-of-Memories, a router sends each token to ``topk`` of ``num_memories``
  gated memories plus an optional shared one (https://arxiv.org/abs/2502.13685);
- ``gdn``: one gated-delta-rule memory, no router (https://arxiv.org/abs/2412.06464);
- ``gla``: one gated linear-attention memory, no router (https://arxiv.org/abs/2312.06635);
- ``transformer``: softmax attention through ``F.scaled_dot_product_attention`` with rotary
  positions, causal or bidirectional (https://arxiv.org/abs/1706.03762).

On this block: :class:`SequenceImageBackbone` (images [B, C, H, W] -> features [B, feat_dim])
and :class:`SequenceLanguageModel` (token ids [B, L] -> logits [B, L, V]).

With ``task_routing=True`` (mixer ``mom``) task t owns memories [t*m, (t+1)*m) with
m = ``memories_per_task`` and every router may only pick inside the block of the sample's
task, so tasks cannot overwrite each other's memories. What still leaks is everything no task
owns; ``shared_memory`` (off by default under routing) and ``freeze_shared`` close it.
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mom import MoMLayer

MIXERS = ("mom", "gdn", "gla", "transformer")
READOUTS = ("mean", "cls")
Cache = Dict[str, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * \
            self.weight


class SingleMemory(MoMLayer):
    """One gated memory and no router (mixers ``gdn`` and ``gla``): the MoM layer with a single
    memory that takes every token with weight 1, so its projections, convolutions, gates and
    output path are exactly those of one MoM memory."""

    def __init__(self, hidden_size: int, num_heads: int, memory_type: str, **kwargs):
        super().__init__(hidden_size, num_heads=num_heads, num_memories=1, topk=1,
                         shared_memory=False, memory_type=memory_type, aux_loss_weight=0.0,
                         **kwargs)
        del self.router

    def route(self, x: torch.Tensor, memory_mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        return (x.new_ones(B, T, 1, dtype=acc), torch.zeros(B, T, 1, dtype=torch.long,
                                                            device=x.device), x.new_zeros(()))


def rotary(x: torch.Tensor, offset: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (https://arxiv.org/abs/2104.09864) of x [B, H, T, K],
    positions offset .. offset + T - 1 (half-split pairing)."""
    K, T = x.shape[-1], x.shape[-2]
    acc = torch.promote_types(x.dtype, torch.float32)
    freq = base ** (-torch.arange(0, K // 2, device=x.device, dtype=acc) / (K // 2))
    ang = torch.arange(offset, offset + T, device=x.device, dtype=acc)[:, None] * freq
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :K // 2], x[..., K // 2:2 * (K // 2)]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., 2 * (K // 2):]], -1)


class Attention(nn.Module):
    """Multi-head softmax attention with rotary positions (mixer ``transformer``).

    Same call as MoMLayer: (x [B, T, D], memory_mask, cache, use_cache) -> (y, aux = 0, cache);
    the cache holds keys and values [B, H, T, K] of every position seen.
    """

    def __init__(self, hidden_size: int, num_heads: int, causal: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of "
                             f"num_heads={num_heads}")
        self.num_heads, self.head_dim, self.causal = num_heads, hidden_size // num_heads, causal
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, use_cache: bool = False):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = cache["k"].shape[2] if cache is not None else 0
        q, k = rotary(q, past), rotary(k, past)
        if cache is not None:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        mask, is_causal = None, self.causal and T > 1
        if is_causal and past:  # queries at past .. past+T-1 see keys up to their own position
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            is_causal = False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, D))
        return y, x.new_zeros(()), ({"k": k, "v": v} if use_cache else None)


def make_mixer(mixer: str, hidden_size: int, num_heads: int, causal: bool, mom: dict,
               memory: dict) -> nn.Module:
    """The token mixer of one block; ``mom`` holds the router keys, ``memory`` the keys every
    gated memory takes (short convolution, chunk size, backend)."""
    if mixer == "mom":
        return MoMLayer(hidden_size, num_heads=num_heads, **mom, **memory)
    if mixer in ("gdn", "gla"):
        return SingleMemory(hidden_size, num_heads,
                            "gated_delta" if mixer == "gdn" else "gla", **memory)
    if mixer == "transformer":
        return Attention(hidden_size, num_heads, causal)
    raise ValueError(f"mixer={mixer!r} is not one of {MIXERS}")


class SequenceBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x)) (SwiGLU)."""

    def __init__(self, hidden_size: int, mixer: nn.Module, mlp_ratio: float = 2.0):
        super().__init__()
        self.mix_norm = RMSNorm(hidden_size)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(hidden_size)
        inner = int(hidden_size * mlp_ratio)
        self.up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x, memory_mask=None, cache=None, use_cache=False):
        y, aux, cache = self.mixer(self.mix_norm(x), memory_mask, cache, use_cache)
        x = x + y
        a, b = self.up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(a) * b), aux, cache


class SequenceModel(nn.Module):
    """The block stack with task routing; subclasses embed inputs and read outputs.

    Keys: ``mixer`` (one of MIXERS), width/depth keys, the MoM router keys (num_memories, topk,
    shared_memory, memory_type, aux_loss_weight, task_routing, num_tasks, memories_per_task,
    freeze_shared) and the gated-memory keys (use_short_conv, chunk_size, backend).
    ``shared_memory=None`` means: on without task routing, off with it; ``chunk_size=None``
    lets the subclass choose (the image backbone: the shortest chunk that holds an image).
    """

    def __init__(self, mixer: str = "mom", hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 2, mlp_ratio: float = 2.0, causal: bool = True,
                 num_memories: int = 4, topk: int = 2, shared_memory: Optional[bool] = None,
                 memory_type: str = "gated_delta", aux_loss_weight: float = 0.01,
                 task_routing: bool = False, num_tasks: Optional[int] = None,
                 memories_per_task: int = 2, freeze_shared: bool = False,
                 use_short_conv: bool = True, chunk_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is not one of {MIXERS}")
        if (task_routing or freeze_shared) and mixer != "mom":
            raise ValueError(f"task_routing / freeze_shared need mixer='mom' (the router picks "
                             f"memories per task); mixer={mixer!r} has no router")
        if freeze_shared and not task_routing:
            raise ValueError("freeze_shared=true needs task_routing=true: without it no "
                             "parameter would be left to learn later tasks")
        if not causal and mixer != "transformer":
            raise ValueError(f"causal=false needs mixer='transformer'; the {mixer!r} memory "
                             "reads the sequence in order")
        self.mixer_name, self.hidden_size = mixer, hidden_size
        self.uses_task_id, self.num_tasks = bool(task_routing), num_tasks
        self.memories_per_task, self.freeze_shared = memories_per_task, freeze_shared
        if shared_memory is None:
            shared_memory = not task_routing
        if freeze_shared and shared_memory:
            raise ValueError("model.freeze_shared=true cannot freeze the shared memory (it "
                             "lives in the same tensors as the task memories); set "
                             "model.shared_memory=false")
        if task_routing:
            if not num_tasks or num_tasks < 1:
                raise ValueError(f"task_routing needs num_tasks >= 1 (the runner passes the "
                                 f"stream's task count), got num_tasks={num_tasks}")
            if memories_per_task < topk:
                raise ValueError(f"model.memories_per_task={memories_per_task} must be >= "
                                 f"model.topk={topk}: the router picks topk memories inside "
                                 "the task's block; raise memories_per_task or lower topk")
            num_memories = num_tasks * memories_per_task
        mom = dict(num_memories=num_memories, topk=topk, shared_memory=shared_memory,
                   memory_type=memory_type, aux_loss_weight=aux_loss_weight)
        memory = dict(use_short_conv=use_short_conv, chunk_size=chunk_size or 64, backend=backend)
        self.blocks = nn.ModuleList([
            SequenceBlock(hidden_size, make_mixer(mixer, hidden_size, num_heads, causal, mom,
                                                  memory), mlp_ratio)
            for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_size)
        self.feat_dim = hidden_size
        self.aux_loss: Optional[torch.Tensor] = None
        self.register_buffer("shared_frozen", torch.zeros((), dtype=torch.bool))

    def memory_mask(self, t: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        """[B, E] mask from task ids t [B] (LongTensor); None (all memories) without routing."""
        if not self.uses_task_id:
            return None
        if t is None:
            raise ValueError("task_routing=true needs the task id of every sample (t); this "
                             "stream gives none at test time: use benchmark.scenario=task-il "
                             "or model.task_routing=false")
        t = torch.as_tensor(t, device=device).long().reshape(-1)
        if t.numel() == 1 and batch > 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"task ids must be [B] = [{batch}], got {t.numel()} ids")
        if (t < 0).any() or (t >= self.num_tasks).any():
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}) (model.num_tasks), "
                             f"got {sorted(set(t.tolist()))}; build the model for the stream's "
                             "task count")
        owner = torch.arange(self.num_tasks * self.memories_per_task, device=device) // \
            self.memories_per_task
        return owner[None, :] == t[:, None]

    def task_owned(self) -> Dict[str, torch.Tensor]:
        """{parameter name: owner [rows]}: the parameters split by task along dim 0, with the
        task that owns each row (-1: the shared memory). Parameters not listed are shared."""
        if not self.uses_task_id:
            return {}
        owned = {}
        for name, p in self.named_parameters():
            if ".mixer." not in name or name.endswith(("q_proj.weight", "q_conv", "g_proj.weight",
                                                       "o_proj.weight", "o_norm.weight")):
                continue
            rows = torch.arange(p.shape[0]) // self.memories_per_task
            owned[name] = rows.masked_fill(rows >= self.num_tasks, -1)
        return owned

    def memory_bytes(self) -> int:
        """Bytes of the task-owned parameters (the shared memory's rows excluded): what the
        partition spends to protect old tasks, growing with num_tasks."""
        params = dict(self.named_parameters())
        return sum(int((rows >= 0).sum()) * params[n][0].numel() * params[n].element_size()
                   for n, rows in self.task_owned().items())

    def shared_parameters(self) -> List[nn.Parameter]:
        """Every parameter no task owns (embeddings, norms, MLPs, q/g/o projections)."""
        owned = self.task_owned()
        return [p for n, p in self.named_parameters() if n not in owned]

    def _maybe_freeze(self, t: Optional[torch.Tensor]) -> None:
        """freeze_shared: the first training forward with a task id beyond 0 stops the shared
        parameters (requires_grad off, so no optimizer, weight decay included, moves them)."""
        if not self.freeze_shared:
            return
        if self.training and t is not None and not bool(self.shared_frozen):
            if bool((torch.as_tensor(t) > 0).any()):
                self.shared_frozen.fill_(True)
        if bool(self.shared_frozen):
            for p in self.shared_parameters():
                p.requires_grad_(False)

    def run_blocks(self, h: torch.Tensor, t: Optional[torch.Tensor],
                   caches: Optional[List[Cache]] = None, use_cache: bool = False
                   ) -> Tuple[torch.Tensor, Optional[List[Cache]]]:
        """h [B, T, D] through the blocks; sets ``self.aux_loss`` (weighted, summed)."""
        self._maybe_freeze(t)
        mask = self.memory_mask(t, h.shape[0], h.device)
        aux = h.new_zeros(())
        new_caches = []
        for i, block in enumerate(self.blocks):
            h, a, c = block(h, mask, caches[i] if caches is not None else None, use_cache)
            aux = aux + a
            new_caches.append(c)
        self.aux_loss = aux
        return self.norm(h), (new_caches if use_cache else None)


_BLOCK_KEYS = list(inspect.signature(SequenceModel.__init__).parameters)[1:]


class SequenceImageBackbone(SequenceModel):
    """Images as sequences: [B, C, H, W] -> features [B, feat_dim].

    ``patch_size`` p cuts p x p patches in raster order (None: 2 up to 16 px, else 4, so a
    token carries several pixels), embeds them linearly with a learned position embedding and
    reads out either the mean over tokens (``readout='mean'``) or a learned CLS token appended
    last (``readout='cls'``; last, so causal memories have read the whole image there).
    ``centre`` subtracts each image's mean token embedding, which removes the component that
    is common to every sample. ``forward(x, t)`` takes task ids t [B] under task routing.
    """

    def __init__(self, input_shape: Sequence[int], patch_size: Optional[int] = None,
                 readout: str = "mean", centre: bool = True, **block_kwargs):
        mixer = block_kwargs.get("mixer", "mom")
        if len(input_shape) != 3:
            raise ValueError(f"model={mixer} is an image backbone: input_shape must be "
                             f"(C, H, W), got {tuple(input_shape)}; for token streams use a "
                             "language model (SequenceLanguageModel)")
        if readout not in READOUTS:
            raise ValueError(f"model.readout={readout!r} is not one of {READOUTS}")
        C, H, W = (int(s) for s in input_shape)
        if patch_size is None:
            patch_size = 2 if max(H, W) <= 16 else 4
        if H % patch_size or W % patch_size:
            raise ValueError(f"model.patch_size={patch_size} must divide the image size "
                             f"{H}x{W}; choose a divisor of both sides")
        num_tokens = (H // patch_size) * (W // patch_size)
        block_kwargs.setdefault("causal", mixer != "transformer")
        if block_kwargs.get("chunk_size") is None:  # no chunk longer than the sequence
            length = num_tokens + int(readout == "cls")
            block_kwargs["chunk_size"] = next((c for c in (16, 32) if length <= c), 64)
        super().__init__(**block_kwargs)
        self.input_shape, self.patch_size, self.num_tokens = (C, H, W), patch_size, num_tokens
        self.readout, self.centre = readout, centre
        D = self.hidden_size
        self.embed = nn.Linear(C * patch_size * patch_size, D)
        self.pos = nn.Parameter(torch.randn(num_tokens, D) * 0.02)
        self.cls = nn.Parameter(torch.randn(D) * 0.02) if readout == "cls" else None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C*p*p] patches in raster order."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, C, H, W]; t: task ids [B] or None. Sets ``self.aux_loss`` and returns
        features [B, feat_dim]."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape {self.input_shape}, "
                             f"got {tuple(x.shape[1:])}")
        h = self.embed(self.tokens(x))
        if self.centre:
            h = h - h.mean(1, keepdim=True)
        h = h + self.pos
        if self.cls is not None:
            h = torch.cat([h, self.cls.expand(h.shape[0], 1, -1)], 1)
        h, _ = self.run_blocks(h, t)
        return h[:, -1] if self.cls is not None else h.mean(1)


class SequenceLanguageModel(SequenceModel):
    """Language model on the shared block: token ids [B, L] -> logits [B, L, vocab_size].

    ``forward(input_ids, t=None)`` returns logits and sets ``self.aux_loss`` (the weighted
    load-balancing loss of the MoM routers, 0 for the other mixers). ``step(input_ids,
    caches, t)`` continues a sequence from ``caches`` and returns (logits, caches): cached
    decoding, one recurrent state per memory (or the keys/values for ``transformer``).
    """

    def __init__(self, vocab_size: int, tie_embeddings: bool = True, **block_kwargs):
        super().__init__(**block_kwargs)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, self.hidden_size)
        self.lm_head = nn.Linear(self.hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _logits(self, input_ids, t, caches, use_cache):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        # Values are checked on the CPU only: on a GPU reading them costs a device sync per
        # forward (token streams check their ids once, when they are built).
        if input_ids.device.type == "cpu" and input_ids.numel() and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (model vocab_size), "
                             f"got ids in [{int(input_ids.min())}, {int(input_ids.max())}]; "
                             "build the model with the stream's vocab_size")
        h, caches = self.run_blocks(self.embed(input_ids), t, caches, use_cache)
        return self.lm_head(h), caches

    def forward(self, input_ids: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._logits(input_ids, t, None, False)[0]

    def step(self, input_ids: torch.Tensor, caches: Optional[List[Cache]] = None,
             t: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[Cache]]:
        return self._logits(input_ids, t, caches, True)


class MoMLanguageModel(SequenceLanguageModel):
    """SequenceLanguageModel with mixer='mom' and the tuple interface of earlier code:
    forward returns (logits, aux_loss, caches) (caches only with ``use_cache=True``)."""

    def __init__(self, vocab_size: int, **kwargs):
        super().__init__(vocab_size, mixer="mom", **kwargs)

    def forward(self, input_ids, t=None, caches=None, use_cache=False):
        logits, caches = self._logits(input_ids, t, caches, use_cache)
        return logits, self.aux_loss, caches


def _named_backbone(mixer: str, keys: Sequence[str]):
    """Registry builder for the image backbone with one mixer; its signature lists the keys
    that mixer takes, so the registry refuses the others (e.g. model.topk for gdn) by name."""

    def build(input_shape, **kwargs):
        return SequenceImageBackbone(input_shape, mixer=mixer, **kwargs)

    own = list(inspect.signature(SequenceImageBackbone.__init__).parameters.values())[1:-1]
    block = inspect.signature(SequenceModel.__init__).parameters
    build.__signature__ = inspect.Signature(own + [block[k] for k in keys])
    build.__name__ = build.__qualname__ = f"{mixer}_backbone"
    build.__doc__ = f"SequenceImageBackbone with mixer={mixer!r} (keys: {', '.join(keys)})."
    return build


_WIDTH = ["hidden_size", "num_layers", "num_heads", "mlp_ratio"]
_MEMORY = ["use_short_conv", "chunk_size", "backend"]
mom_backbone = _named_backbone("mom", _WIDTH + [k for k in _BLOCK_KEYS if k not in
                                                ("mixer", "causal", *_WIDTH)])
gdn_backbone = _named_backbone("gdn", _WIDTH + _MEMORY)
gla_backbone = _named_backbone("gla", _WIDTH + _MEMORY)
transformer_backbone = _named_backbone("transformer", _WIDTH + ["causal"])


class MoMImageClassifierBackbone(SequenceImageBackbone):
    """SequenceImageBackbone with mixer='mom' (the name earlier code imports)."""

    def __init__(self, input_shape: Sequence[int], **kwargs):
        super().__init__(input_shape, mixer="mom", **kwargs)
