"""`MergeStrategy`, the base of every merge strategy: continual model merging over a task stream.

Every task yields a fine-tuned model, the strategy folds it into one merged model, and
``predict`` evaluates that merged model, so merging methods get the same accuracy matrix and
forgetting report as training strategies. A method (one file each: `average`,
`task_arithmetic`, `ties`, `opcm`, `atlas`) implements two things, `merge_` (fold a task vector
into its state) and `merged_update` (the update applied to the base), and names the attributes
that hold its state in ``state_attrs``; this class saves, loads and counts them.

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
name prefixes; default: every parameter) for ``epochs`` through the run's trainer (the one
training loop: aux loss, finite check, hooks, progress); or, if ``checkpoints`` maps the task's
name to a file, it is loaded from there instead. Its score on its own test set (the stream's
task kind's primary metric) is kept as a reference row (`reference_accuracy`). Task order is
the stream's: shuffle it by seed in the stream builder to get mean +- std over orders.

Memory: the strategy keeps ``theta_0`` and its method state (a merged update, or all task
vectors for aTLAS); the fine-tuned model is the strategy's own model, whose tensors are turned
into the task vector in place and then overwritten with the merged weights, so OPCM, TA, TIES
and averaging hold three model-sized buffers in all (TIES adds two flat, vector-sized
temporaries while it ranks a vector's magnitudes).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cl_toolkit.errors import ConfigError, suggest
from cl_toolkit.strategy import Strategy, make_optimizer
from cl_toolkit.config import SCENARIOS
from cl_toolkit.stream import Task, TensorData
from cl_toolkit.validation import above, at_least

from .task_vectors import (assign_, check_compatible, check_finite, clone, combine_into_,
                           floating_keys, load_checkpoint, nbytes, subtract_)

# Rows per batch when a fine-tuned model is scored on its own test set.
EVAL_BATCH = 256


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _saved(value: Any) -> Any:
    """``value`` as plain containers of tensors (what ``torch.load(weights_only=True)`` reads):
    a `TensorData` becomes its ``(x, y, t)``."""
    if isinstance(value, TensorData):
        return (value.x, value.y, value.t)
    if isinstance(value, dict):
        return {k: _saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_saved(v) for v in value]
    return value


def state_bytes(value: Any) -> int:
    """Bytes of a method's state: tensors by their storage, 8 per Python number (e.g. one norm
    kept per task), containers and `TensorData` summed over what they hold."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, TensorData):
        return state_bytes((value.x, value.y, value.t))
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    if isinstance(value, (int, float)):
        return 8
    raise TypeError(f"Cannot count the bytes of a {type(value).__name__} in a merge "
                    "strategy's state; keep tensors, numbers, lists or dicts of them there.")


class MergeStrategy(Strategy):
    """Fine-tune per task from ``theta_0``; subclasses fold each task vector into their state
    (`merge_`) and say which update is applied to the base (`merged_update`).

    Supports: classification tasks (fine-tuning is cross-entropy on class logits) in every
    scenario; no ``train_step`` (a merged model is not trained by gradient steps, so a probe
    that needs them, such as ``probe=retention``, is refused by the runner)."""

    scenarios = SCENARIOS
    task_kinds = ("classification",)
    capabilities: frozenset[str] = frozenset()
    # Attributes holding the method's state (absent or None until the first task): saved in
    # `state_dict`, restored in `load_state_dict`, counted by `memory_bytes`.
    state_attrs: tuple[str, ...] = ()
    ranges = {"pretrain_lr": above(0), "pretrain_epochs": at_least(0)}
    smoke = {"pretrain_epochs": 1}

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

    def setup(self, stream, model, ctx) -> None:
        from cl_toolkit.task_kinds import task_kind

        super().setup(stream, model, ctx)
        self.kind = task_kind(stream.kind)
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
            task = stream[self.pretrain_task]
            self._train(task, self.pretrain_epochs, self.pretrain_lr, trainable=None,
                        what=f"pretraining on task {task.index} ({task.name!r})",
                        lr_key="strategy.pretrain_lr")
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
        (``state_attrs``, see `state_bytes`)."""
        return nbytes(self.base) + nbytes(self.fixed) + sum(
            state_bytes(getattr(self, name, None)) for name in self.state_attrs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "base": self.base, "fixed": self.fixed,
                "tasks_seen": self.tasks_seen, "finetuned_acc": dict(self.finetuned_acc),
                "method": {name: _saved(getattr(self, name, None))
                           for name in self.state_attrs}}

    def load_state_dict(self, state: dict) -> None:
        """Restores the model, ``theta_0`` and every attribute of ``state_attrs`` saved (a
        `TensorData` comes back as its ``(x, y, t)``; a method that keeps one converts it)."""
        self.model.load_state_dict(state["model"])
        self.base = {k: v.to(self.ctx.device) for k, v in state["base"].items()}
        self.fixed = {k: v.to(self.ctx.device) for k, v in state["fixed"].items()}
        self.tasks_seen = state["tasks_seen"]
        self.finetuned_acc = dict(state["finetuned_acc"])
        # Checkpoints load on the CPU; the method's tensors must live where the model does.
        method = _to_device(state["method"], self.ctx.device)
        for name in self.state_attrs:
            if method.get(name) is not None:
                setattr(self, name, method[name])

    def _entries(self) -> dict[str, torch.Tensor]:
        """The model's merged entries as tensors sharing its storage."""
        state = self.model.state_dict()
        return {k: state[k] for k in self.keys}

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of the model; task ids only for a model that uses them."""
        return self.model(x, t) if getattr(self.model, "uses_task_id", False) else self.model(x)

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
            self._train(task, self.epochs, self.lr, self.finetune_params,
                        f"fine-tuning task {task.index} ({task.name!r})")
            state = self.model.state_dict()
            assign_({k: state[k] for k in self.fixed}, self.fixed)
        self.model.eval()
        self.finetuned_acc[task.name] = self._score(task.test)
        return subtract_(entries, self.base)

    def _train(self, task: Task, epochs: int, lr: float, trainable: list[str] | None,
               what: str, lr_key: str = "strategy.lr") -> None:
        """``epochs`` of cross-entropy on ``task.train`` through the run's trainer, only the
        parameters named by the prefixes ``trainable`` (None: all) left trainable."""
        data, model = task.train, self.model
        chosen = [p for n, p in model.named_parameters()
                  if trainable is None or n.startswith(tuple(trainable))]
        frozen = [p for p in model.parameters() if all(p is not c for c in chosen)]
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        opt = make_optimizer(self.optimizer_name, chosen, lr, self.momentum, self.weight_decay)
        try:
            self.ctx.trainer.fit(
                optimizer=opt, epochs=epochs, model=model, strategy=self, task=task,
                batches=lambda epoch: data.batches(self.batch_size, self.ctx.generator, True),
                loss=lambda b: F.cross_entropy(self._forward(b[0], b[2]), b[1]), what=what,
                steps_per_epoch=-(-len(data) // self.batch_size), lr_key=lr_key)
        finally:
            for p, flag in zip(frozen, flags):
                p.requires_grad_(flag)

    @torch.no_grad()
    def _score(self, data: TensorData) -> float:
        """The task kind's primary metric (accuracy) of the current model on ``data``."""
        dev = self.ctx.device
        scores = self.kind.score(lambda x, t: self._forward(x.to(dev), t.to(dev)), data,
                                 EVAL_BATCH)
        return scores[self.kind.metric.key]
