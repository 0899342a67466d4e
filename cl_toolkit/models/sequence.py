"""Sequence models for task streams ("memory-partitioned learners", DESIGN.md section 7).

`SequenceModel` stacks the pre-norm residual blocks of ``cl_toolkit.layers.block``, whose token
mixer (``mom``, ``gdn``, ``gla`` or ``transformer``) is the only variable between the four
models. On it: :class:`SequenceImageBackbone` here (images [B, C, H, W] -> features
[B, feat_dim]) and ``SequenceLanguageModel`` in ``cl_toolkit.models.language`` (token ids
[B, L] -> logits [B, L, V]). :func:`preset` builds the registry entry of one mixer for either.

With ``task_routing=True`` (mixer ``mom``) task t owns memories [t*m, (t+1)*m) with
m = ``memories_per_task`` and every router may only pick inside the block of the sample's
task, so tasks cannot overwrite each other's memories. What still leaks is everything no task
owns; ``shared_memory`` (off by default under routing) and ``freeze_shared`` close it.

With ``task_free=True`` as well, the task id is used in training only: the block of the
sample's task is still the only one its tokens may write, and a routing loss
(``routing_loss_weight`` times the cross-entropy of the router's mass on that block, added to
the model's aux loss) teaches the router to find the block. At test time no task id is read:
every router picks its top-k among all memories, so the router itself infers the task (and,
being shared, can forget how to; `router_task_inference` measures it).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..kernels.common.utils import BACKENDS, CHUNK_SIZES, is_interpreter, triton_available
from ..layers.block import MIXERS, Cache, SequenceBlock, make_mixer
from ..layers.mom import MEMORY_TYPES, ROUTE_PER, MoMLayer
from ..layers.norm import RMSNorm
from ..validation import above, at_least, declared, one_of

READOUTS = ("mean", "cls")
TASK_FREE_TRAINING = ("oracle", "router")
# The SequenceModel keys each mixer takes (the others are refused by name, e.g. model.topk
# for gdn): width and depth, the MoM router, the gated memories.
WIDTH_KEYS = ["hidden_size", "num_layers", "num_heads", "mlp_ratio"]
# Task-free routing (the task id in training only) is wired for image classifiers, whose
# strategies hand the id in training (`Classifier.trains_with_task_id`); not for language models.
TASK_FREE_KEYS = ["task_free", "routing_loss_weight", "route_per", "task_free_training"]
ROUTER_KEYS = ["num_memories", "topk", "shared_memory", "memory_type", "aux_loss_weight",
               "task_routing", "num_tasks", "memories_per_task", "freeze_shared", *TASK_FREE_KEYS]
MEMORY_KEYS = ["use_short_conv", "chunk_size", "backend"]
MIXER_KEYS = {"mom": WIDTH_KEYS + ROUTER_KEYS + MEMORY_KEYS, "gdn": WIDTH_KEYS + MEMORY_KEYS,
              "gla": WIDTH_KEYS + MEMORY_KEYS, "transformer": WIDTH_KEYS}


def _smoke_width(node: dict) -> int:
    """smoke=true's hidden_size: 16, or the next multiple of num_heads (heads split it)."""
    heads = node.get("num_heads")
    heads = heads if isinstance(heads, int) and heads >= 1 else 1
    return -(-16 // heads) * heads


class SequenceModel(nn.Module):
    """The block stack with task routing; subclasses embed inputs and read outputs.

    Keys: ``mixer`` (one of MIXERS), width/depth keys, the MoM router keys (num_memories, topk,
    shared_memory, memory_type, aux_loss_weight, task_routing, num_tasks, memories_per_task,
    freeze_shared) and the gated-memory keys (use_short_conv, chunk_size, backend).
    ``shared_memory=None`` means: on without task routing, off with it; ``chunk_size=None``
    lets the subclass choose (the image backbone: the shortest chunk that holds an image).
    """

    # Checked before anything is built (cl_toolkit/validation.py); `check_config` below adds
    # the relations between keys.
    ranges = {
        "hidden_size": at_least(1), "num_heads": at_least(1), "mlp_ratio": above(0),
        "num_layers": at_least(1, note="num_layers=0 would leave the embedding alone"),
        "num_memories": at_least(1), "topk": at_least(1), "memories_per_task": at_least(1),
        "memory_type": one_of(*MEMORY_TYPES), "aux_loss_weight": at_least(0),
        "routing_loss_weight": at_least(0),
        "task_free_training": one_of(*TASK_FREE_TRAINING, note="oracle: in training the task's "
                                     "block is the only one its tokens write; router: the "
                                     "router's own choice, tied to the block by the routing "
                                     "loss alone"),
        "route_per": one_of(*ROUTE_PER, note="token: MoM's per-token routing; sample: one "
                            "choice per sample from its tokens' mean router logits"),
        "num_tasks": at_least(1),
        "chunk_size": one_of(*CHUNK_SIZES, note="the lengths the chunk kernels tile a sequence "
                             "into; null picks the shortest that holds a sequence"),
        "backend": one_of(*BACKENDS),
    }
    smoke = {"hidden_size": _smoke_width, "num_layers": 1}

    @staticmethod
    def check_config(node: dict, cfg: dict) -> None:
        """Relations between the keys of a ``model`` node (every default filled in), checked
        with the whole config ``cfg`` before anything is built: the width splits into heads,
        the router picks topk of the memories it may use, the keys that only task routing
        reads are not set without it, and the backend runs on the configured device."""

        def number(key):
            value = node.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        width, heads, topk = number("hidden_size"), number("num_heads"), number("topk")
        per_task, memories = number("memories_per_task"), number("num_memories")
        if width is not None and heads is not None and width % heads:
            raise ConfigError(
                f"model.hidden_size={width} must be a multiple of model.num_heads={heads} (each "
                f"head takes hidden_size / num_heads channels); set model.hidden_size="
                f"{-(-width // heads) * heads}, or a num_heads that divides {width}.")
        routing = node.get("task_routing")
        if routing and topk is not None and per_task is not None and per_task < topk:
            raise ConfigError(
                f"model.memories_per_task={per_task} must be >= model.topk={topk}: the router "
                "picks topk memories inside the task's block; raise memories_per_task or lower "
                "topk.")
        if not routing and topk is not None and memories is not None and topk > memories:
            raise ConfigError(
                f"model.topk={topk} must be <= model.num_memories={memories}: the router picks "
                "topk of the memories; lower model.topk or raise model.num_memories.")
        defaults = inspect.signature(SequenceModel.__init__).parameters
        unused = [key for key in ("memories_per_task", "num_tasks")
                  if key in node and node[key] != defaults[key].default]
        if "task_routing" in node and not routing and unused:
            raise ConfigError(
                f"{' and '.join(f'model.{k}={node[k]}' for k in unused)} "
                f"{'applies' if len(unused) == 1 else 'apply'} only with model.task_routing=true "
                f"(task t then owns its own block of memories); without routing the router "
                f"picks among model.num_memories={memories}. Set model.task_routing=true (with "
                f"benchmark.scenario=task-il), or leave "
                f"{' and '.join(f'model.{k}' for k in unused)} out.")
        free, weight = node.get("task_free"), node.get("routing_loss_weight")
        if free and not routing:
            raise ConfigError(
                "model.task_free=true needs model.task_routing=true: task-free routing is a "
                "router trained with the task id (each task's block of memories) and used "
                "without it at test time. Set model.task_routing=true model.routing_loss_weight="
                "1.0, or leave model.task_free out.")
        if weight and not routing:
            raise ConfigError(
                f"model.routing_loss_weight={weight} needs the task id in training, i.e. "
                "model.task_routing=true (the loss pushes each token's router mass into its "
                "task's block of memories); set model.task_routing=true model.task_free=true, "
                "or model.routing_loss_weight=0.")
        if free and routing and not weight:
            raise ConfigError(
                "model.task_free=true with model.routing_loss_weight=0 would leave the router "
                "untrained across tasks (the training mask hides the other blocks from it), so "
                "test-time routing would be arbitrary; set model.routing_loss_weight > 0, e.g. "
                "1.0.")
        if node.get("backend") == "triton":
            device = cfg.get("device") or "cpu"
            if torch.device(device).type != "cuda" and not is_interpreter():
                raise ConfigError(
                    f"model.backend=triton runs the Triton kernels, which need a CUDA device, "
                    f"but device={device}. Use model.backend=auto (Triton on a GPU, torch on the "
                    "CPU) or model.backend=torch; TRITON_INTERPRET=1 runs the Triton kernels on "
                    "the CPU (slowly, for tests).")
            if not triton_available():
                raise ConfigError("model.backend=triton but Triton is not installed here; use "
                                  "model.backend=auto (the torch kernels where Triton is "
                                  "missing) or install triton.")

    def __init__(self, mixer: str = "mom", hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 2, mlp_ratio: float = 2.0, causal: bool = True,
                 num_memories: int = 4, topk: int = 2, shared_memory: Optional[bool] = None,
                 memory_type: str = "gated_delta", aux_loss_weight: float = 0.01,
                 task_routing: bool = False, num_tasks: Optional[int] = None,
                 memories_per_task: int = 2, freeze_shared: bool = False,
                 use_short_conv: bool = True, chunk_size: Optional[int] = None,
                 backend: str = "auto", task_free: bool = False,
                 routing_loss_weight: float = 0.0, route_per: str = "token",
                 task_free_training: str = "oracle"):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is not one of {MIXERS}")
        if (task_routing or freeze_shared) and mixer != "mom":
            raise ValueError(f"task_routing / freeze_shared need mixer='mom' (the router picks "
                             f"memories per task); mixer={mixer!r} has no router")
        if (task_free or routing_loss_weight) and not task_routing:
            raise ValueError("model.task_free / model.routing_loss_weight need "
                             "model.task_routing=true (the task id in training picks the "
                             "block the routing loss pushes the router to)")
        if freeze_shared and not task_routing:
            raise ValueError("freeze_shared=true needs task_routing=true: without it no "
                             "parameter would be left to learn later tasks")
        if not causal and mixer != "transformer":
            raise ValueError(f"causal=false needs mixer='transformer'; the {mixer!r} memory "
                             "reads the sequence in order")
        self.mixer_name, self.hidden_size = mixer, hidden_size
        self.task_routing, self.task_free = bool(task_routing), bool(task_free)
        # uses_task_id: the model reads the task id at test time (the runner refuses it on
        # streams without one); trains_with_task_id: it reads it in training only.
        self.uses_task_id = self.task_routing and not self.task_free
        self.trains_with_task_id = self.task_routing and self.task_free
        self.oracle_at_test = False  # `oracle_routing()`: the isolation upper bound
        if task_free_training not in TASK_FREE_TRAINING:
            raise ValueError(f"model.task_free_training={task_free_training!r} is not one of "
                             f"{TASK_FREE_TRAINING}")
        # "router": task-free training routes by the router too (the task id only sets the
        # routing loss's target), so no later router can read which block the oracle chose.
        self.task_free_training = task_free_training
        self.num_tasks = num_tasks
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
        if routing_loss_weight:
            mom["routing_loss_weight"] = routing_loss_weight
        if route_per != "token":
            mom["route_per"] = route_per
        memory = dict(use_short_conv=use_short_conv, chunk_size=chunk_size or 64, backend=backend)
        self.blocks = nn.ModuleList([
            SequenceBlock(hidden_size, make_mixer(mixer, hidden_size, num_heads, causal, mom,
                                                  memory), mlp_ratio)
            for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_size)
        self.feat_dim = hidden_size
        self.aux_loss: Optional[torch.Tensor] = None
        self.register_buffer("shared_frozen", torch.zeros((), dtype=torch.bool))

    def oracle_routes(self) -> bool:
        """Whether this forward routes by the given task id: always under task routing, only
        in training under task-free routing (or inside `oracle_routing`)."""
        if self.task_free and self.training and self.task_free_training == "router":
            return False
        return self.task_routing and (not self.task_free or self.training or
                                      self.oracle_at_test)

    def memory_mask(self, t: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        """[B, E] mask from task ids t [B] (LongTensor); None (all memories) without routing
        and at test time under task-free routing (t is then ignored)."""
        if not self.oracle_routes():
            return None
        return self._block_mask(t, batch, device)

    def _block_mask(self, t: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """[B, E]: True on the memories of each sample's task (the routing loss's target)."""
        if t is None:
            if self.task_free:
                raise ValueError("model.task_free=true trains the router with the task id of "
                                 "every sample (t), and this training step got none: the "
                                 "strategy must hand task ids to a model that declares "
                                 "trains_with_task_id")
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
        """{parameter name: owner [rows]}: the parameters each MoM layer declares per memory
        (``MoMLayer.PER_MEMORY``), split by task along dim 0, with the task that owns each row
        (-1: the shared memory). Parameters not listed are shared."""
        if not self.task_routing:
            return {}
        per_memory = {f"{prefix}.{name}" for prefix, layer in self.named_modules()
                      if isinstance(layer, MoMLayer) for name in layer.per_memory_parameters()}
        owned = {}
        for name, p in self.named_parameters():
            if name in per_memory:
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
        target = None
        if self.task_free and self.training:
            target = mask if mask is not None else self._block_mask(t, h.shape[0], h.device)
        aux = h.new_zeros(())
        new_caches = []
        for i, block in enumerate(self.blocks):
            if isinstance(block.mixer, MoMLayer):
                block.mixer.routing_target = target
            try:
                h, a, c = block(h, mask, caches[i] if caches is not None else None, use_cache)
            finally:
                if isinstance(block.mixer, MoMLayer):
                    block.mixer.routing_target = None
            aux = aux + a
            new_caches.append(c)
        self.aux_loss = aux
        return self.norm(h), (new_caches if use_cache else None)

    @contextlib.contextmanager
    def oracle_routing(self):
        """Inside it a task-free model routes by the given task id at test time too: the same
        trained model as a parameter-isolation learner with oracle task ids (an upper bound)."""
        old, self.oracle_at_test = self.oracle_at_test, True
        try:
            yield self
        finally:
            self.oracle_at_test = old

    def owner_of(self, memories: torch.Tensor) -> torch.Tensor:
        """Task that owns each memory id (the shared memory and ids beyond the blocks: -1)."""
        owner = memories // self.memories_per_task
        return owner.masked_fill(owner >= self.num_tasks, -1)

    @torch.no_grad()
    def task_scores(self, classifier: nn.Module, stream, score) -> Dict[str, List[float]]:
        """Per task of ``stream`` (`Classifier.task_scores`): ``router_task_inference``, the
        share of its test samples whose routes land in its block by majority (1 by
        construction when the task id routes at test time), and, under task-free routing,
        ``oracle_routing``, the score of the same model routed by the true task id (the
        parameter-isolation bound the router's inference is measured against). {} without
        task routing."""
        if not self.task_routing:
            return {}
        device = next(self.parameters()).device
        out = {"router_task_inference": [
            self.router_task_inference(t.test.x.to(device), t.index)["sample"] for t in stream]}
        if self.task_free:
            def oracle(task):
                def predict(x):
                    ids = torch.full((x.shape[0],), task.index, dtype=torch.long,
                                     device=x.device)
                    return classifier.classify(self(x, ids), ids if stream.task_il else None)
                with self.oracle_routing():
                    return score(predict, task)
            out["oracle_routing"] = [oracle(t) for t in stream]
        return out

    @torch.no_grad()
    def router_task_inference(self, inputs: torch.Tensor, task: int,
                              batch_size: int = 512) -> Dict[str, object]:
        """How well the routers find task ``task``'s block on ``inputs`` (its test set), routing
        as at test time (no task id under task-free routing; the model is put in eval mode).

        Returns ``token``: the share of (layer, token, choice) routes that land in the task's
        block; ``sample``: the share of samples whose majority task over all their routes is
        ``task`` (ties to the lowest id); ``token_per_layer``; ``predicted``: how many samples
        each task won (the collapse toward the latest task shows here); ``memory_share``: the
        share of all routes taken by each memory (a memory its block never picks is dead)."""
        if not self.task_routing:
            raise ValueError("router_task_inference needs model.task_routing=true (the blocks "
                             "that the router's choices are scored against)")
        layers = [b.mixer for b in self.blocks if isinstance(b.mixer, MoMLayer)]
        was_training = self.training
        self.eval()
        per_layer = torch.zeros(len(layers))
        usage = torch.zeros(self.num_tasks * self.memories_per_task)
        votes, n_routes = [], 0
        try:
            for layer in layers:
                layer.record_routes = True
            for s in range(0, inputs.shape[0], batch_size):
                x = inputs[s:s + batch_size]
                t = torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)
                self(x, t)
                owners = [self.owner_of(layer.last_routes).flatten(1) for layer in layers]
                per_layer += torch.stack([(o == task).float().sum() for o in owners]).cpu()
                n_routes += owners[0].numel()
                for layer in layers:
                    usage += torch.bincount(layer.last_routes.flatten().cpu(),
                                            minlength=usage.numel())[:usage.numel()]
                allowed = torch.cat(owners, 1)
                counts = torch.zeros(x.shape[0], self.num_tasks, device=x.device)
                counts.scatter_add_(1, allowed.clamp(min=0),
                                    (allowed >= 0).to(counts.dtype))
                votes.append(counts.argmax(1).cpu())
        finally:
            for layer in layers:
                layer.record_routes, layer.last_routes = False, None
            self.train(was_training)
        vote = torch.cat(votes)
        return {"token": float(per_layer.sum() / (n_routes * len(layers))),
                "sample": float((vote == task).float().mean()),
                "token_per_layer": (per_layer / n_routes).tolist(),
                "predicted": torch.bincount(vote, minlength=self.num_tasks).tolist(),
                "memory_share": (usage / usage.sum()).tolist()}



class SequenceImageBackbone(SequenceModel):
    """Images as sequences: [B, C, H, W] -> features [B, feat_dim].

    ``patch_size`` p cuts p x p patches in raster order (None: 2 up to 16 px, else 4, so a
    token carries several pixels), embeds them linearly with a learned position embedding and
    reads out either the mean over tokens (``readout='mean'``) or a learned CLS token appended
    last (``readout='cls'``; last, so causal memories have read the whole image there).
    ``centre`` subtracts each image's mean token embedding, which removes the component that
    is common to every sample. ``forward(x, t)`` takes task ids t [B] under task routing.
    """

    ranges = {"patch_size": at_least(1), "readout": one_of(*READOUTS)}

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


def preset(model: Callable, mixer: str, name: str, keys: Sequence[str], what: str,
           needs_stream: bool = False) -> Callable:
    """The registry builder ``name``: ``model(..., mixer=mixer, **kwargs)``. Its signature is
    ``model``'s own parameters (``mixer`` and ``**kwargs`` left out) followed by the
    SequenceModel ``keys`` this mixer takes, so the registry refuses every other key by name.
    ``needs_stream``: the registry hands ``model`` the stream instead of an input shape."""

    def build(*args, **kwargs):
        return model(*args, mixer=mixer, **kwargs)

    own = [p for p in inspect.signature(model).parameters.values()
           if p.name != "mixer" and p.kind is not p.VAR_KEYWORD]
    block = inspect.signature(SequenceModel.__init__).parameters
    build.__signature__ = inspect.Signature(own + [block[k] for k in keys])
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{what} with mixer={mixer!r} (keys: {', '.join(keys)})."
    # The declarations of its keys (cl_toolkit/validation.py, cl_toolkit/smoke.py): the
    # block's, then ``model``'s own.
    for attribute in ("ranges", "smoke"):
        both = {**declared(SequenceModel, attribute), **declared(model, attribute)}
        setattr(build, attribute, {k: v for k, v in both.items()
                                   if k in build.__signature__.parameters})
    build.check_config = SequenceModel.check_config
    if needs_stream:
        build.needs_stream = True
    return build


mom_backbone = preset(SequenceImageBackbone, "mom", "mom_backbone", MIXER_KEYS["mom"],
                      "SequenceImageBackbone")
gdn_backbone = preset(SequenceImageBackbone, "gdn", "gdn_backbone", MIXER_KEYS["gdn"],
                      "SequenceImageBackbone")
gla_backbone = preset(SequenceImageBackbone, "gla", "gla_backbone", MIXER_KEYS["gla"],
                      "SequenceImageBackbone")
transformer_backbone = preset(SequenceImageBackbone, "transformer", "transformer_backbone",
                              MIXER_KEYS["transformer"] + ["causal"], "SequenceImageBackbone")
