"""MoM backbones for task streams ("memory-partitioned learners", DESIGN.md section 7).

- :class:`MoMImageClassifierBackbone`: image [B, C, H, W] -> patch (or pixel) sequence ->
  MoM blocks -> mean pool -> features [B, feat_dim].
- :class:`MoMLanguageModel`: token ids [B, T] -> logits [B, T, vocab], with cached decoding.

With ``task_routing=True`` each task owns a disjoint block of ``memories_per_task`` memories
and the router of every layer may only pick inside the block of the sample's task, so tasks
cannot overwrite each other's memories (the shared memory, if any, stays shared).
MoM: https://arxiv.org/abs/2502.13685.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .mom import MoMLayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * \
            self.weight


class MoMBlock(nn.Module):
    """Pre-norm residual block: x + MoM(norm(x)), then x + MLP(norm(x)) (SwiGLU)."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 2.0, **mom_kwargs):
        super().__init__()
        self.mix_norm = RMSNorm(hidden_size)
        self.mom = MoMLayer(hidden_size, **mom_kwargs)
        self.mlp_norm = RMSNorm(hidden_size)
        inner = int(hidden_size * mlp_ratio)
        self.up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x, memory_mask=None, cache=None, use_cache=False):
        y, aux, cache = self.mom(self.mix_norm(x), memory_mask, cache, use_cache)
        x = x + y
        a, b = self.up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(a) * b), aux, cache


class _TaskRouting:
    """Disjoint memory blocks per task: task t owns memories [t*m, (t+1)*m)."""

    def _setup_routing(self, task_routing: bool, num_tasks: Optional[int],
                       memories_per_task: int, num_memories: int, topk: int) -> int:
        self.uses_task_id = bool(task_routing)
        self.num_tasks = num_tasks
        if not task_routing:
            return num_memories
        if not num_tasks or num_tasks < 1:
            raise ValueError(f"task_routing needs num_tasks >= 1, got {num_tasks}")
        if memories_per_task < topk:
            raise ValueError(f"memories_per_task={memories_per_task} must be >= topk={topk}")
        return num_tasks * memories_per_task

    def memory_mask(self, t: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        """[B, E] mask from task ids t [B] (LongTensor); None (all memories) when t is None."""
        if not self.uses_task_id or t is None:
            return None
        t = torch.as_tensor(t, device=device).long().reshape(-1)
        if t.numel() == 1 and batch > 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"task ids must be [B] = [{batch}], got {t.numel()} ids")
        if (t < 0).any() or (t >= self.num_tasks).any():
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}), got {t.tolist()}")
        owner = torch.arange(self.num_tasks * self.memories_per_task, device=device) // \
            self.memories_per_task
        return owner[None, :] == t[:, None]


class MoMImageClassifierBackbone(nn.Module, _TaskRouting):
    """Images as sequences for MoM: [B, C, H, W] -> features [B, feat_dim].

    patch_size p cuts p x p patches (p = 1: one token per pixel) in raster order, embeds them
    linearly with a learned position embedding, runs ``num_layers`` MoM blocks and mean-pools.
    With task_routing, ``forward(x, t)`` takes task ids t [B] (see module doc).
    """

    def __init__(self, input_shape: Sequence[int], patch_size: Optional[int] = None,
                 hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                 num_memories: int = 4, topk: int = 2, shared_memory: bool = True,
                 memory_type: str = "gated_delta", use_short_conv: bool = True,
                 task_routing: bool = False, num_tasks: Optional[int] = None,
                 memories_per_task: int = 2, aux_loss_weight: float = 0.01,
                 backend: str = "auto"):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        C, H, W = (int(s) for s in input_shape)
        if patch_size is None:
            patch_size = 1 if max(H, W) <= 8 else (2 if max(H, W) <= 16 else 4)
        if H % patch_size or W % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image size {H}x{W}")
        self.input_shape, self.patch_size = (C, H, W), patch_size
        self.memories_per_task = memories_per_task
        num_memories = self._setup_routing(task_routing, num_tasks, memories_per_task,
                                           num_memories, topk)
        self.num_tokens = (H // patch_size) * (W // patch_size)
        self.embed = nn.Linear(C * patch_size * patch_size, hidden_size)
        self.pos = nn.Parameter(torch.randn(self.num_tokens, hidden_size) * 0.02)
        self.blocks = nn.ModuleList([
            MoMBlock(hidden_size, num_heads=num_heads, num_memories=num_memories, topk=topk,
                     shared_memory=shared_memory, memory_type=memory_type,
                     use_short_conv=use_short_conv, aux_loss_weight=aux_loss_weight,
                     backend=backend)
            for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_size)
        self.feat_dim = hidden_size
        self.aux_loss = torch.zeros(())

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C*p*p] patches in raster order."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, C, H, W]; t: task ids [B] or None. Sets ``self.aux_loss`` (a scalar tensor
        that a strategy may add to its loss) and returns features [B, feat_dim]."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape {self.input_shape}, "
                             f"got {tuple(x.shape[1:])}")
        h = self.embed(self.tokens(x)) + self.pos
        mask = self.memory_mask(t, x.shape[0], x.device)
        aux = h.new_zeros(())
        for block in self.blocks:
            h, a, _ = block(h, mask)
            aux = aux + a
        self.aux_loss = aux
        return self.norm(h).mean(1)


class MoMLanguageModel(nn.Module, _TaskRouting):
    """Small MoM language model for token streams: ids [B, T] -> logits [B, T, vocab_size].

    forward returns (logits, aux_loss, caches); pass ``use_cache=True`` and feed back the
    caches to decode token by token (one recurrent state per memory per layer).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 2, num_memories: int = 4, topk: int = 2,
                 shared_memory: bool = True, memory_type: str = "gated_delta",
                 use_short_conv: bool = True, task_routing: bool = False,
                 num_tasks: Optional[int] = None, memories_per_task: int = 2,
                 aux_loss_weight: float = 0.01, tie_embeddings: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.memories_per_task = memories_per_task
        num_memories = self._setup_routing(task_routing, num_tasks, memories_per_task,
                                           num_memories, topk)
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList([
            MoMBlock(hidden_size, num_heads=num_heads, num_memories=num_memories, topk=topk,
                     shared_memory=shared_memory, memory_type=memory_type,
                     use_short_conv=use_short_conv, aux_loss_weight=aux_loss_weight,
                     backend=backend)
            for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.feat_dim = hidden_size

    def forward(self, input_ids: torch.Tensor, t: Optional[torch.Tensor] = None,
                caches: Optional[List[Dict[str, torch.Tensor]]] = None, use_cache: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[Dict[str, torch.Tensor]]]]:
        h = self.embed(input_ids)
        mask = self.memory_mask(t, input_ids.shape[0], input_ids.device)
        aux = h.new_zeros(())
        new_caches = []
        for i, block in enumerate(self.blocks):
            h, a, c = block(h, mask, caches[i] if caches is not None else None, use_cache)
            aux = aux + a
            new_caches.append(c)
        return self.lm_head(self.norm(h)), aux, new_caches if use_cache else None
