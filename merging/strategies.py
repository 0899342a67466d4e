"""Merge strategies: continual model merging over a task stream.

Every task yields a fine-tuned model, the strategy folds it into one merged model, and
``predict`` evaluates that merged model, so merging methods get the same accuracy matrix and
forgetting report as training strategies.

The base model ``theta_0`` is fixed in `setup`, before the runner's "before training" row, so
that row is the base model's accuracy:

- ``base_checkpoint``: load it from a file (e.g. a pretrained backbone); otherwise
- the model the runner hands over (for CLIP: the pretrained tower), further trained for
  ``pretrain_epochs`` on the training set of stream task ``pretrain_task`` (all parameters).
  With ``pretrain_epochs > 0`` that task is still fine-tuned and merged like every other one:
  like a CLIP task the zero-shot model already solves, its task vector is small. To keep the
  evaluated tasks on an equal footing, build the stream with a base domain as task 0 (e.g.
  the unrotated images) and pretrain on it. On resume, `setup` pretrains again (seeded, so
  the same) before `load_state_dict` restores the saved ``theta_0``.

Per task, the fine-tuned model starts from ``theta_0`` and trains ``finetune_params`` (state-dict
name prefixes; default: every parameter) for ``epochs``; or, if ``checkpoints`` maps the task's
name to a file, it is loaded from there instead. Its accuracy on its own test set is kept as a
reference row (`reference_accuracy`). Task order is the stream's: shuffle it by seed in the
stream builder to get mean +- std over orders.

Memory: the strategy keeps ``theta_0`` and its method state (a merged update, or all task
vectors for aTLAS); the fine-tuned model is the strategy's own model, whose tensors are turned
into the task vector in place and then overwritten with the merged weights, so OPCM, TA, TIES
and averaging hold three model-sized buffers in all (TIES adds two flat, vector-sized
temporaries while it ranks a vector's magnitudes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError, NonFiniteLossError, suggest
from cl_toolkit.strategy import Strategy, make_optimizer, tensor_bytes
from cl_toolkit.stream import Task, TensorData

from . import atlas as atlas_fn
from .average import average_step_
from .opcm import linear_weights, opcm_step_
from .task_arithmetic import task_arithmetic_step_
from .task_vectors import (assign_, check_compatible, check_finite, clone, combine_into_,
                           floating_keys, load_checkpoint, nbytes, subtract_)
from .ties import REDUCTIONS, majority_sign, ties_tensor, trim_threshold


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class MergeStrategy(Strategy):
    """Fine-tune per task from ``theta_0``; subclasses fold each task vector into their state
    (`merge_`) and say which update is applied to the base (`merged_update`)."""

    def __init__(self, epochs: int = 1, batch_size: int = 64, lr: float = 1e-3,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 finetune_params: list[str] | None = None, pretrain_epochs: int = 0,
                 pretrain_task: int = 0, pretrain_lr: float | None = None,
                 base_checkpoint: str | None = None,
                 checkpoints: dict[str, str] | None = None):
        if epochs < 0 or pretrain_epochs < 0:
            raise ConfigError(f"epochs ({epochs}) and pretrain_epochs ({pretrain_epochs}) must "
                              "be >= 0.")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay
        self.finetune_params = None if finetune_params is None else list(finetune_params)
        self.pretrain_epochs, self.pretrain_task = pretrain_epochs, pretrain_task
        self.pretrain_lr = lr if pretrain_lr is None else pretrain_lr
        self.base_checkpoint = base_checkpoint
        self.checkpoints = dict(checkpoints or {})
        self.tasks_seen = 0
        self.finetuned_acc: dict[str, float] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, stream, model, ctx) -> None:
        super().setup(stream, model, ctx)
        names = [t.name for t in stream]
        for name in self.checkpoints:
            if name not in names:
                raise ConfigError(f"checkpoints names task {name!r}, which is not in stream "
                                  f"{stream.name!r}.{suggest(name, names)} Its tasks: "
                                  f"{', '.join(names)}.")
        state = self.model.state_dict()
        self.keys = floating_keys(state, self.finetune_params)
        if not self.keys:
            raise ConfigError(
                f"finetune_params {self.finetune_params!r} matches no floating-point entry of "
                f"the model. Entries start with e.g. {', '.join(list(state)[:4])}."
            )
        if self.base_checkpoint is not None:
            loaded = load_checkpoint(self.base_checkpoint, ctx.device)
            every = floating_keys(state)
            check_compatible(state, loaded, every, f"base checkpoint {self.base_checkpoint!r}")
            self.model.load_state_dict({**state, **{k: loaded[k] for k in every}})
        elif self.pretrain_epochs > 0:
            if not 0 <= self.pretrain_task < len(stream):
                raise ConfigError(f"pretrain_task {self.pretrain_task} is not a task index of "
                                  f"stream {stream.name!r} (0..{len(stream) - 1}).")
            self._train(stream[self.pretrain_task].train, self.pretrain_epochs,
                        self.pretrain_lr, trainable=None, what="pretraining")
        self.model.eval()
        self.base = clone(self._entries())
        # Buffers outside finetune_params (BatchNorm statistics of a frozen backbone) still move
        # in train mode; they are put back after every fine-tuning so no task leaks into them.
        buffers = {n for n, _ in self.model.named_buffers()}
        self.fixed = clone({k: v for k, v in self.model.state_dict().items()
                            if k in buffers and k not in self.base and v.is_floating_point()})

    def learn(self, task: Task) -> None:
        tau = self._finetune(task)
        check_finite(tau, f"task vector of task {task.index} ({task.name!r})")
        self.merge_(tau, task)
        update, scale = self.merged_update()
        combine_into_(self._entries(), self.base, update, scale)
        self.tasks_seen += 1

    def merge_(self, tau: dict[str, torch.Tensor], task: Task) -> None:
        """Fold ``tau`` (may be overwritten: it is the model's own storage) into the state."""
        raise NotImplementedError

    def merged_update(self) -> tuple[dict[str, torch.Tensor], float]:
        """``(update, scale)``: the merged model is ``theta_0 + scale * update``."""
        raise NotImplementedError

    def reference_accuracy(self) -> dict[str, dict[str, float]]:
        """Reference rows for reports: each fine-tuned model on its own task's test set."""
        return {"finetuned": dict(self.finetuned_acc)}

    def memory_bytes(self) -> int:
        """theta_0 (and the frozen buffers put back after fine-tuning) plus the method's state
        (see subclasses)."""
        return nbytes(self.base) + nbytes(self.fixed) + self.method_bytes()

    def method_bytes(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "base": self.base, "fixed": self.fixed,
                "tasks_seen": self.tasks_seen, "finetuned_acc": dict(self.finetuned_acc),
                "method": self.method_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.base = {k: v.to(self.ctx.device) for k, v in state["base"].items()}
        self.fixed = {k: v.to(self.ctx.device) for k, v in state["fixed"].items()}
        self.tasks_seen = state["tasks_seen"]
        self.finetuned_acc = dict(state["finetuned_acc"])
        # Checkpoints load on the CPU; the method's tensors must live where the model does.
        self.load_method_state(_to_device(state["method"], self.ctx.device))

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    # ---- helpers ---------------------------------------------------------------------------
    def _entries(self) -> dict[str, torch.Tensor]:
        """The model's merged entries as tensors sharing its storage."""
        state = self.model.state_dict()
        return {k: state[k] for k in self.keys}

    def _finetune(self, task: Task) -> dict[str, torch.Tensor]:
        entries = self._entries()
        assign_(entries, self.base)
        path = self.checkpoints.get(task.name)
        if path is not None:
            loaded = load_checkpoint(path, self.ctx.device)
            check_compatible(self.base, loaded, self.keys,
                             f"checkpoint {path!r} of task {task.name!r}")
            for k in self.keys:
                entries[k].copy_(loaded[k])
            del loaded
        elif self.epochs > 0:
            self._train(task.train, self.epochs, self.lr, self.finetune_params,
                        f"fine-tuning task {task.index} ({task.name!r})")
            state = self.model.state_dict()
            assign_({k: state[k] for k in self.fixed}, self.fixed)
        self.model.eval()
        self.finetuned_acc[task.name] = self._accuracy(task.test)
        return subtract_(entries, self.base)

    def _train(self, data: TensorData, epochs: int, lr: float, trainable: list[str] | None,
               what: str) -> None:
        model, dev = self.model, self.ctx.device
        chosen = [p for n, p in model.named_parameters()
                  if trainable is None or n.startswith(tuple(trainable))]
        frozen = [p for p in model.parameters() if all(p is not c for c in chosen)]
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        opt = make_optimizer(self.optimizer_name, chosen, lr, self.momentum, self.weight_decay)
        uses_t = getattr(model, "uses_task_id", False)
        model.train()
        try:
            for epoch in range(epochs):
                for step, (x, y, t) in enumerate(data.batches(self.batch_size,
                                                              self.ctx.generator, True)):
                    x, y, t = x.to(dev), y.to(dev), t.to(dev)
                    loss = F.cross_entropy(model(x, t) if uses_t else model(x), y)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"Loss became {loss.item()} while {what}, epoch {epoch}, step "
                            f"{step}. Lower the learning rate (strategy.lr / pretrain_lr) or "
                            "check the inputs for NaN/Inf."
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.ctx.advance("epoch", epochs)
        finally:
            for p, flag in zip(frozen, flags):
                p.requires_grad_(flag)
            model.eval()

    @torch.no_grad()
    def _accuracy(self, data: TensorData) -> float:
        correct = 0
        for x, y, t in data.batches(256):
            x, y = x.to(self.ctx.device), y.to(self.ctx.device)
            logits = self.model(x, t.to(x.device)) if getattr(self.model, "uses_task_id",
                                                              False) else self.model(x)
            correct += int((logits.argmax(-1) == y).sum())
        return correct / max(1, len(data))


class MergeAverage(MergeStrategy):
    """Weight averaging (https://arxiv.org/abs/2203.05482): running mean of task vectors."""

    name = "merge_average"

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.mean = clone(tau)
        else:
            average_step_(self.mean, tau, self.tasks_seen)

    def merged_update(self):
        return self.mean, 1.0

    def method_bytes(self):
        return nbytes(getattr(self, "mean", {}))

    def method_state(self):
        return {"mean": getattr(self, "mean", None)}

    def load_method_state(self, state):
        if state["mean"] is not None:
            self.mean = state["mean"]


class MergeTA(MergeStrategy):
    """Continual task arithmetic (https://arxiv.org/abs/2212.04089):
    ``theta_t = theta_0 + lam * sum_{i<=t} tau_i``."""

    name = "merge_ta"

    def __init__(self, lam: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.lam = lam

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.total = clone(tau)
        else:
            task_arithmetic_step_(self.total, tau)

    def merged_update(self):
        return self.total, self.lam

    def method_bytes(self):
        return nbytes(getattr(self, "total", {}))

    def method_state(self):
        return {"total": getattr(self, "total", None)}

    def load_method_state(self, state):
        if state["total"] is not None:
            self.total = state["total"]


class MergeTIES(MergeStrategy):
    """Continual TIES (https://arxiv.org/abs/2306.01708), the sound default:
    ``S_t = TIES(S_{t-1}, tau_t)``, ``theta_t = theta_0 + lam * S_t`` (``S_0 = 0``): every step
    is one TIES merge of two vectors, so the merged update stays on the scale of one task vector.
    With the disjoint mean, ``lam = 1`` is the TIES paper's default. The OPCM paper's baseline is
    `MergeTIESFusionBench`."""

    name = "merge_ties"

    def __init__(self, lam: float = 1.0, density: float = 0.2, reduce: str = "mean",
                 **kwargs):
        super().__init__(**kwargs)
        if reduce not in REDUCTIONS:
            raise ConfigError(f"Unknown TIES reduce {reduce!r}; use one of {REDUCTIONS}.")
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"TIES density must be in (0, 1], got {density}.")
        self.lam, self.density, self.reduce = lam, density, reduce

    def _ties_with(self, tau) -> tuple[list, float]:
        """Per-vector trim thresholds of ``[merged, tau]`` and their majority sign."""
        vectors = [self.merged, tau]
        thresholds = [trim_threshold(v.values(), self.density) for v in vectors]
        return thresholds, majority_sign(vectors, thresholds)

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.merged = {k: torch.zeros_like(v) for k, v in tau.items()}
        thresholds, majority = self._ties_with(tau)
        for k, s in self.merged.items():
            self.merged[k] = ties_tensor([s, tau[k]], thresholds, majority, self.reduce)

    def merged_update(self):
        return self.merged, self.lam

    def method_bytes(self):
        return nbytes(getattr(self, "merged", {}))

    def method_state(self):
        return {"merged": getattr(self, "merged", None)}

    def load_method_state(self, state):
        if state["merged"] is not None:
            self.merged = state["merged"]


class MergeTIESFusionBench(MergeTIES):
    """The continual TIES baseline of the OPCM paper (https://arxiv.org/abs/2501.09522), as
    FusionBench runs it (``ContinualTiesMergingForCLIP``, fusion_bench/method/opcm/
    ties_merging.py, https://github.com/tanganke/fusion_bench):
    ``theta_1 = theta_0 + s * tau_1`` (untrimmed), then
    ``theta_t = theta_{t-1} + s * TIES_sum(theta_{t-1} - theta_0, tau_t)``, ``s = lam`` = 0.3
    for 8 tasks and 0.1 for 14/20. Kept for comparability with the paper's C-TIES numbers: the
    previous merge is added again at every step (where it agrees with tau_t), so the merged
    update grows with the number of tasks instead of staying on one task vector's scale."""

    name = "merge_ties_fusionbench"

    def __init__(self, lam: float = 0.3, density: float = 0.2, reduce: str = "sum", **kwargs):
        super().__init__(lam=lam, density=density, reduce=reduce, **kwargs)

    def merge_(self, tau, task):
        if self.tasks_seen == 0:
            self.merged = {k: v.mul(self.lam) for k, v in tau.items()}
            return
        # Thresholds and majority sign are fixed before the in-place update: each tensor's TIES
        # reads only that tensor of the previous merge.
        thresholds, majority = self._ties_with(tau)
        for k, s in self.merged.items():
            s.add_(ties_tensor([s, tau[k]], thresholds, majority, self.reduce), alpha=self.lam)

    def merged_update(self):
        return self.merged, 1.0


class OPCM(MergeStrategy):
    """OPCM (https://arxiv.org/abs/2501.09522): each Linear's update projected orthogonally to
    the merged update, rescaled to the mean task-vector norm (see `merging.opcm`)."""

    name = "opcm"

    def __init__(self, alpha: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if alpha < 0:
            raise ConfigError(f"OPCM alpha must be >= 0, got {alpha}; the paper uses 0.5.")
        self.alpha = alpha
        self.update: dict[str, torch.Tensor] = {}
        self.tau_norms: list[float] = []
        self.lam = 1.0

    def setup(self, stream, model, ctx):
        super().setup(stream, model, ctx)
        self.linear = {k: c for k, c in linear_weights(self.model).items() if k in self.keys}

    def merge_(self, tau, task):
        self.lam = opcm_step_(self.update, tau, self.tau_norms, self.alpha, self.linear)

    def merged_update(self):
        return self.update, 1.0 / self.lam

    def method_bytes(self):
        return nbytes(self.update) + 8 * len(self.tau_norms)

    def method_state(self):
        return {"update": self.update, "tau_norms": list(self.tau_norms), "lam": self.lam}

    def load_method_state(self, state):
        self.update, self.tau_norms = state["update"], list(state["tau_norms"])
        self.lam = state["lam"]


class ATLAS(MergeStrategy):
    """aTLAS (https://arxiv.org/abs/2407.02880) as a continual strategy: after each task,
    re-learn one coefficient per (task vector, parameter tensor) for all task vectors so far,
    from 0 as in the paper (``warm_start=True``: earlier ones start at their last values), with
    the authors' recipe (AdamW, ``coef_lr`` 1e-3, ``coef_weight_decay`` 0.1, gradient norm
    clipped to ``coef_grad_clip`` 1.0) and the coefficients that score best on a validation
    split, checked every ``coef_eval_every`` steps (see `merging.atlas`).

    The buffer keeps ``k_shot`` labelled training samples per class of every seen task;
    ``val_fraction`` of each class's shots (at least one, at most ``k_shot - 1``) are held out
    as the validation split, the rest train the coefficients. (The paper selects on each
    dataset's validation set; a continual run keeps only what its buffer holds.) ``k_shot = 0``
    keeps ``unlabeled_per_task`` unlabelled inputs per task instead, split the same way, and
    uses the ``unsupervised`` objective: ``"entropy"`` (AdaMerging's) or ``"pseudo_label"``
    (plain self-training, not the paper's UFM). ``val_fraction = 0``: no validation split, the
    last coefficients are kept.

    Floating-point buffers among the merged entries (BatchNorm running statistics) get no
    coefficient: the merged model keeps theta_0's, as the authors' code runs the composed
    parameters with the pretrained model's buffers."""

    name = "atlas"

    def __init__(self, k_shot: int = 16, unlabeled_per_task: int = 64,
                 unsupervised: str = "entropy", coef_steps: int = 200, coef_lr: float = 1e-3,
                 coef_weight_decay: float = 0.1, coef_grad_clip: float | None = 1.0,
                 coef_batch_size: int = 128, val_fraction: float = 0.25,
                 coef_eval_every: int = 10, warm_start: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.warm_start = warm_start
        if unsupervised not in ("entropy", "pseudo_label"):
            raise ConfigError(f"Unknown aTLAS unsupervised objective {unsupervised!r}; use "
                              "'entropy' or 'pseudo_label'.")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"aTLAS val_fraction must be in [0, 1), got {val_fraction}; the "
                              "default 0.25 holds out a quarter of each class's shots.")
        if coef_eval_every < 1:
            raise ConfigError(f"aTLAS coef_eval_every must be >= 1, got {coef_eval_every}.")
        self.k_shot, self.unlabeled_per_task = k_shot, unlabeled_per_task
        self.unsupervised, self.coef_steps = unsupervised, coef_steps
        self.coef_lr, self.coef_batch_size = coef_lr, coef_batch_size
        self.coef_weight_decay, self.coef_grad_clip = coef_weight_decay, coef_grad_clip
        self.val_fraction, self.coef_eval_every = val_fraction, coef_eval_every
        self.task_vectors: list[dict[str, torch.Tensor]] = []
        self.coefs: torch.Tensor | None = None
        self.buffer: list[TensorData] = []
        self.val_buffer: list[TensorData] = []

    def setup(self, stream, model, ctx):
        super().setup(stream, model, ctx)
        self.coef_keys = atlas_fn.parameter_keys(self.model, self.keys)
        if not self.coef_keys:
            raise ConfigError(f"aTLAS needs parameters to scale; finetune_params "
                              f"{self.finetune_params!r} matches buffers only.")

    def _n_val(self, n: int) -> int:
        if self.val_fraction == 0.0 or n < 2:
            return 0
        return min(n - 1, max(1, round(self.val_fraction * n)))

    def _shots(self, task: Task) -> tuple[TensorData, TensorData]:
        """``(train, validation)`` samples of ``task`` for the buffer."""
        g, data = self.ctx.generator, task.train
        if self.k_shot == 0:
            picks = [torch.randperm(len(data), generator=g)[:self.unlabeled_per_task]]
        else:
            picks = []
            for c in torch.unique(data.y):
                idx = (data.y == c).nonzero().flatten()
                picks.append(idx[torch.randperm(len(idx), generator=g)[:self.k_shot]])
        val = [p[:self._n_val(len(p))] for p in picks]
        train = [p[self._n_val(len(p)):] for p in picks]
        return data.subset(torch.cat(train)), data.subset(torch.cat(val))

    def merge_(self, tau, task):
        self.task_vectors.append({k: tau[k].clone() for k in self.coef_keys})
        train, val = self._shots(task)
        self.buffer.append(train)
        self.val_buffer.append(val)
        start = torch.zeros(len(self.task_vectors), len(self.coef_keys), device=self.ctx.device)
        if self.warm_start and self.coefs is not None:
            start[:len(self.coefs)] = self.coefs
        assign_(self._entries(), self.base)
        val_data = TensorData.cat(self.val_buffer)
        self.coefs = atlas_fn.fit_coefficients(
            self.model, {k: self.base[k] for k in self.coef_keys}, self.task_vectors,
            TensorData.cat(self.buffer), "supervised" if self.k_shot > 0 else self.unsupervised,
            start, steps=self.coef_steps, lr=self.coef_lr, batch_size=self.coef_batch_size,
            use_task_ids=getattr(self.model, "uses_task_id", False),
            generator=self.ctx.generator, weight_decay=self.coef_weight_decay,
            grad_clip=self.coef_grad_clip, val_data=val_data if len(val_data) else None,
            eval_every=self.coef_eval_every)

    @torch.no_grad()
    def merged_update(self):
        update = {k: torch.zeros_like(v) for k, v in self.base.items()}
        composed = atlas_fn.compose({k: update[k] for k in self.coef_keys}, self.task_vectors,
                                    self.coefs)
        return {**update, **composed}, 1.0

    def method_bytes(self):
        return (sum(nbytes(tv) for tv in self.task_vectors) + tensor_bytes(self.coefs)
                + sum(tensor_bytes(b.x, b.y, b.t) for b in self.buffer + self.val_buffer))

    def method_state(self):
        return {"task_vectors": self.task_vectors, "coefs": self.coefs,
                "buffer": [(b.x, b.y, b.t) for b in self.buffer],
                "val_buffer": [(b.x, b.y, b.t) for b in self.val_buffer]}

    def load_method_state(self, state):
        self.task_vectors, self.coefs = state["task_vectors"], state["coefs"]
        self.buffer = [TensorData(x, y, t) for x, y, t in state["buffer"]]
        self.val_buffer = [TensorData(x, y, t) for x, y, t in state["val_buffer"]]
