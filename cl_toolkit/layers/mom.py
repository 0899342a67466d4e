"""Mixture-of-Memories (MoM) layer on the chunk kernels of ``cl_toolkit.kernels``.

MoM (Du et al., 2025, https://arxiv.org/abs/2502.13685): a router sends every token to k of E
memories; each memory is a gated-delta-rule (https://arxiv.org/abs/2412.06464) or gated
linear-attention state with its own k/v/beta/gate projections (q is shared) and is updated
only by its own tokens. A shared memory sees every token and is added with weight 1.

Efficient form: (token, memory) pairs are sorted with a *stable* sort so time order inside a
memory survives (an unstable sort scrambles it), each (memory, batch) run becomes one segment
of a packed variable-length batch, one kernel call processes all of them, and the outputs are
permuted back to token order and summed with the routing weights. Segments are ordered
memory-major (key = memory * B + batch), which keeps each memory's tokens contiguous so its
projections are one matmul; the segment order does not change the result.

Decoding reuses the same path with T = 1: a memory that receives no token has an empty
segment, and an empty segment returns its initial state untouched (no decay), so only the
activated memories change. The short convolution runs inside each segment and carries the
last ``conv_size - 1`` inputs of every memory in the cache, so training and decoding agree.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.common.utils import check_hidden_states, l2norm
from ..kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
from ..kernels.gated_delta_rule.recurrent import fused_recurrent_gated_delta_rule
from ..kernels.linear_attn.chunk import chunk_linear_attn
from ..kernels.linear_attn.recurrent import fused_recurrent_linear_attn
from ..kernels.short_conv import segment_conv

MEMORY_TYPES = ("gated_delta", "gla")
ROUTE_PER = ("token", "sample")


def switch_aux_loss(probs: torch.Tensor, topi: torch.Tensor, num_memories: int) -> torch.Tensor:
    """Switch-Transformer load balancing, E * sum_e f_e P_e (https://arxiv.org/abs/2101.03961).

    probs: [N, E] router probabilities; topi: [N, k] chosen memories. f_e is the fraction of the
    N*k assignments that went to e, P_e the mean probability of e. Equals 1 when balanced.
    """
    counts = torch.zeros(num_memories, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, topi.reshape(-1), torch.ones(topi.numel(), device=probs.device))
    frac = counts / topi.numel()
    return num_memories * (frac * probs.float().mean(0)).sum()


def routing_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router's block choice: the mean over tokens of
    ``-log sum_{e in block} softmax(logits)_e``.

    logits: [B, T, E] router logits (unmasked); target: [B, E] bool, the memories of each
    sample's block (its task's). 0 when every token puts all its mass in its block."""
    lse_all = logits.logsumexp(-1)
    lse_in = logits.masked_fill(~target[:, None, :], float("-inf")).logsumexp(-1)
    return (lse_all - lse_in).mean()


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, index) where each output row is one of ``group`` copies of an input
    row and ``inv`` maps the copies back (a permutation of [N * group]). The backward is a
    gather and a sum over the copies: deterministic, and on GPUs much faster than the
    scatter-add that index_select's own backward runs."""

    @staticmethod
    def forward(ctx, x, index, inv, group: int):
        ctx.save_for_backward(inv)
        ctx.group = group
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inv, = ctx.saved_tensors
        g = grad.index_select(0, inv)
        if ctx.group > 1:
            g = g.view(-1, ctx.group, *g.shape[1:]).sum(1)
        return g, None, None, None


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim, then multiplied by silu(gate): keeps memory outputs in scale."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype) * F.silu(gate.to(xf.dtype))).to(x.dtype)


class MoMLayer(nn.Module):
    """Token mixer with E routed memories plus an optional shared one. x: [B, T, D] -> [B, T, D].

    forward returns (y, aux_loss, cache); aux_loss is already multiplied by aux_loss_weight.
    memory_mask [B, E] (bool) restricts the router per sample (task routing); each row must
    allow at least ``topk`` memories. ``routing_target`` [B, E] (bool), set by the model for
    one forward, adds `routing_loss` of the unmasked router times ``routing_loss_weight`` to
    aux_loss (task-free routing learns to find each task's block). With ``record_routes`` the
    chosen memories of the last forward stay in ``last_routes`` [B, T, k].
    ``route_per='sample'`` routes every token of a sample by the mean of its tokens' router
    logits (one choice per sample and layer, from the whole sequence: not causal, so not
    for cached decoding); ``'token'`` (the default) is MoM's per-token routing. cache (from
    ``use_cache=True``) holds one state per (memory, sample) and the convolution tails.

    ``PER_MEMORY`` names the parameters that hold one slice per memory along dim 0 (the
    router's E rows; E + 1 slots for the others, the shared memory last): what a task-routed
    model gives each task. The rest (q, gate and output projections, the q convolution, the
    output norm) is used by every memory.
    """

    PER_MEMORY = ("router.weight", "k_proj", "v_proj", "a_proj", "b_proj", "A_log", "dt_bias",
                  "k_conv", "v_conv")

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: Optional[int] = None,
                 expand_v: float = 1.0, num_memories: int = 4, topk: int = 2,
                 shared_memory: bool = True, memory_type: str = "gated_delta",
                 use_short_conv: bool = True, conv_size: int = 4, aux_loss_weight: float = 0.01,
                 norm_eps: float = 1e-5, chunk_size: int = 64, backend: str = "auto",
                 routing_loss_weight: float = 0.0, route_per: str = "token"):
        super().__init__()
        if route_per not in ROUTE_PER:
            raise ValueError(f"route_per={route_per!r} is not one of {ROUTE_PER}")
        if memory_type not in MEMORY_TYPES:
            raise ValueError(f"memory_type={memory_type!r} is not one of {MEMORY_TYPES}")
        if not 1 <= topk <= num_memories:
            raise ValueError(f"topk={topk} must be in [1, num_memories={num_memories}]")
        if conv_size < 2 and use_short_conv:
            raise ValueError(f"conv_size={conv_size} must be >= 2 with use_short_conv")
        if head_dim is None and (num_heads < 1 or hidden_size % num_heads):
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of "
                             f"num_heads={num_heads} (each head takes hidden_size / num_heads "
                             "channels); change one of them or pass head_dim")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k = head_dim or hidden_size // num_heads
        self.head_v = int(self.head_k * expand_v)
        self.num_memories, self.topk, self.shared_memory = num_memories, topk, shared_memory
        self.num_slots = num_memories + int(shared_memory)
        self.memory_type, self.delta = memory_type, memory_type == "gated_delta"
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.aux_loss_weight, self.chunk_size, self.backend = aux_loss_weight, chunk_size, backend
        self.routing_loss_weight, self.route_per = routing_loss_weight, route_per
        self.routing_target: Optional[torch.Tensor] = None
        self.record_routes, self.last_routes = False, None
        H, K, V, M = num_heads, self.head_k, self.head_v, self.num_slots
        self.router = nn.Linear(hidden_size, num_memories, bias=False)
        self.q_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.k_proj = nn.Parameter(torch.empty(M, H * K, hidden_size))
        self.v_proj = nn.Parameter(torch.empty(M, H * V, hidden_size))
        self.a_proj = nn.Parameter(torch.empty(M, H, hidden_size))
        self.b_proj = nn.Parameter(torch.empty(M, H, hidden_size)) if self.delta else None
        for p in (self.k_proj, self.v_proj, self.a_proj, self.b_proj):
            if p is not None:
                nn.init.uniform_(p, -hidden_size ** -0.5, hidden_size ** -0.5)
        # Mamba-2 / Gated DeltaNet decay init: A in [1, 16], dt in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.empty(M, H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(M, H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if use_short_conv:
            self.q_conv = nn.Parameter(torch.empty(H * K, conv_size))
            self.k_conv = nn.Parameter(torch.empty(M, H * K, conv_size))
            self.v_conv = nn.Parameter(torch.empty(M, H * V, conv_size))
            for p in (self.q_conv, self.k_conv, self.v_conv):
                nn.init.uniform_(p, -conv_size ** -0.5, conv_size ** -0.5)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, norm_eps)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)

    def per_memory_parameters(self) -> Dict[str, nn.Parameter]:
        """{name: parameter} of the ``PER_MEMORY`` parameters this layer has (b_proj only with
        the gated delta rule, k_conv / v_conv only with the short convolution)."""
        params = dict(self.named_parameters())
        return {name: params[name] for name in self.PER_MEMORY if name in params}

    def route(self, x: torch.Tensor, memory_mask: Optional[torch.Tensor] = None):
        """Router in fp32 (fp64 for fp64 inputs).

        Returns the renormalised top-k weights [B, T, k], memory ids [B, T, k], weighted aux.
        """
        B, T, _ = x.shape
        logits = self.router(x).to(torch.promote_types(x.dtype, torch.float32))
        if self.route_per == "sample":
            logits = logits.mean(1, keepdim=True).expand(B, T, -1)
        extra = None
        if self.routing_target is not None and self.routing_loss_weight > 0:
            extra = routing_loss(logits, self.routing_target) * self.routing_loss_weight
        if memory_mask is not None:
            if memory_mask.shape != (B, self.num_memories):
                raise ValueError(f"memory_mask must be [B, E] = [{B}, {self.num_memories}], "
                                 f"got {tuple(memory_mask.shape)}")
            logits = logits.masked_fill(~memory_mask[:, None, :], float("-inf"))
        probs = logits.softmax(-1)
        topv, topi = probs.topk(self.topk, dim=-1)
        weights = topv / topv.sum(-1, keepdim=True)
        aux = switch_aux_loss(probs.reshape(B * T, -1), topi.reshape(B * T, -1),
                              self.num_memories) * self.aux_loss_weight
        return weights, topi, aux if extra is None else aux + extra

    def init_cache(self, batch_size: int, device=None,
                   dtype=torch.float32) -> Dict[str, torch.Tensor]:
        """Zero states [(E+1)*B, H, V, K] (memory-major) and zero convolution tails."""
        H, K, V, M, W = self.num_heads, self.head_k, self.head_v, self.num_slots, self.conv_size
        cache = {"state": torch.zeros(M * batch_size, H, V, K, device=device, dtype=torch.float32)}
        if self.use_short_conv:
            cache["conv_q"] = torch.zeros(batch_size, H * K, W - 1, device=device, dtype=dtype)
            cache["conv_k"] = torch.zeros(M * batch_size, H * K, W - 1, device=device, dtype=dtype)
            cache["conv_v"] = torch.zeros(M * batch_size, H * V, W - 1, device=device, dtype=dtype)
        return cache

    def forward(self, x: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
                cache: Optional[Dict[str, torch.Tensor]] = None, use_cache: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        check_hidden_states(x, self.hidden_size, self.q_proj.weight.device,
                            self.q_proj.weight.dtype)
        B, T, D = x.shape
        H, K, V, E, M = self.num_heads, self.head_k, self.head_v, self.num_memories, self.num_slots
        dev = x.device
        if use_cache and self.route_per == "sample":
            raise ValueError("route_per='sample' routes by the whole sequence, which cached "
                             "decoding does not have; use route_per='token'")
        if cache is None and use_cache:
            cache = self.init_cache(B, dev, x.dtype)
        weights, topi, aux = self.route(x, memory_mask)
        if self.record_routes:
            self.last_routes = topi.detach()

        # (token, memory) pairs in token-major order: topk routed, then the shared memory,
        # which takes every token with weight 1.
        N, R = B * T, self.topk + int(self.shared_memory)
        pair_mem = topi.reshape(N, self.topk)
        if self.shared_memory:
            pair_mem = torch.cat([pair_mem, pair_mem.new_full((N, 1), E)], 1)
        key = (pair_mem * B + (torch.arange(N, device=dev) // T)[:, None]).reshape(-1)
        order = torch.sort(key, stable=True).indices  # stable: time order inside a segment
        P = N * R
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(P, device=dev))
        lens = torch.zeros(M * B, dtype=torch.long, device=dev).scatter_add_(
            0, key, torch.ones_like(key))
        counts = F.pad(lens.cumsum(0), (1, 0))
        if memory_mask is not None:  # its check rides on the same transfer
            counts = torch.cat([counts, memory_mask.sum(-1)])
        counts = counts.cpu()  # the layer's one device sync
        cu = counts[:M * B + 1]
        if memory_mask is not None and (counts[M * B + 1:] < self.topk).any():
            raise ValueError(f"every sample must allow at least topk={self.topk} memories; "
                             f"allowed counts {counts[M * B + 1:].tolist()}")
        cu_host = cu.tolist()
        sizes = [cu_host[(m + 1) * B] - cu_host[m * B] for m in range(M)]

        def to_pairs(t: torch.Tensor) -> torch.Tensor:
            """Rows per token -> rows per (token, memory) pair, in segment order."""
            return _GatherRows.apply(t, order // R, inv, R)

        def per_row(p: torch.Tensor) -> torch.Tensor:
            """[M, H] per-memory parameter -> [P, H], each pair row with its memory's."""
            return torch.cat([r.expand(n, -1) for r, n in zip(p.unbind(0), sizes)])

        xf = x.reshape(N, D)
        acc = torch.promote_types(x.dtype, torch.float32)  # router/gates: fp32 or better
        q = self.q_proj(xf)
        new_cache: Dict[str, torch.Tensor] = {}
        conv = dict(return_tail=use_cache, backend=self.backend)
        if self.use_short_conv:
            q = segment_conv(q, self.q_conv, range(0, N + 1, T),
                             cache.get("conv_q") if cache else None, **conv)
            if use_cache:
                q, new_cache["conv_q"] = q

        # Per memory, one matmul for k, v, the gate logit and beta (weights concatenated), and
        # one convolution for k and v together. unbind / split rather than indexing per
        # memory: indexing would zero-fill the whole gradient once per memory.
        HK, HV = H * K, H * V
        w_all = torch.cat([self.k_proj, self.v_proj, self.a_proj]
                          + ([self.b_proj] if self.delta else []), 1).unbind(0)
        conv_w = (torch.cat([self.k_conv, self.v_conv], 1).unbind(0) if self.use_short_conv
                  else None)
        ks, vs, rest, conv_tails = [], [], [], []
        for m, xm in enumerate(to_pairs(xf).split(sizes)):
            kv, ab = (xm @ w_all[m].T).split([HK + HV, w_all[m].shape[0] - HK - HV], 1)
            if self.use_short_conv:
                sl = slice(m * B, (m + 1) * B)
                tail = (torch.cat([cache["conv_k"][sl], cache["conv_v"][sl]], 1)
                        if cache else None)
                seg_cu = [c - cu_host[m * B] for c in cu_host[m * B:(m + 1) * B + 1]]
                kv = segment_conv(kv, conv_w[m], seg_cu, tail, **conv)
                if use_cache:
                    kv, tail = kv
                    conv_tails.append(tail)
            k_m, v_m = kv.split([HK, HV], 1)  # one backward node (slices would zero-fill twice)
            ks.append(k_m)
            vs.append(v_m)
            rest.append(ab)
        if self.use_short_conv and use_cache:
            new_cache["conv_k"], new_cache["conv_v"] = torch.cat(conv_tails).split([HK, HV], 1)
        a_logit, *b_logit = torch.cat(rest).view(P, -1, H).unbind(1)
        gp = -per_row(self.A_log.to(acc).exp()) * F.softplus(
            a_logit.to(acc) + per_row(self.dt_bias.to(acc)))
        qp = to_pairs(q).view(1, P, H, K)
        kp = torch.cat(ks).view(1, P, H, K)
        vp = torch.cat(vs).view(1, P, H, V)
        h0 = cache["state"] if cache is not None else None
        kw = dict(initial_state=h0, output_final_state=use_cache, cu_seqlens=cu,
                  backend=self.backend)
        if cache is not None and T == 1 and not torch.is_grad_enabled():
            # Decoding step: one launch over all (memory, sample) states; forward only.
            run = fused_recurrent_gated_delta_rule if self.delta else fused_recurrent_linear_attn
        else:
            run = chunk_gated_delta_rule if self.delta else chunk_linear_attn
            kw["chunk_size"] = self.chunk_size
        if run is chunk_gated_delta_rule:
            kw["use_qk_l2norm"] = True  # fused into the kernels
        else:
            qp, kp = l2norm(qp), l2norm(kp)
        gates = [gp.reshape(1, P, H)]
        if self.delta:
            gates.append(torch.sigmoid(b_logit[0]).reshape(1, P, H))
        o, state = run(qp, kp, vp, *gates, **kw)
        # Back to token-major pairs (a permutation), then the routing-weighted sum.
        o = _GatherRows.apply(o[0], inv, order, 1).view(N, R, H, V)
        routed, *shared = o.split([self.topk] + ([1] if self.shared_memory else []), 1)
        out = (routed * weights.reshape(N, self.topk, 1, 1).to(o.dtype)).sum(1)
        if shared:
            out = out + shared[0][:, 0]
        gate = self.g_proj(xf).view(N, H, V)
        y = self.o_proj(self.o_norm(out, gate).reshape(N, H * V)).view(B, T, D)
        if use_cache:
            new_cache["state"] = state
            return y, aux, new_cache
        return y, aux, None


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
