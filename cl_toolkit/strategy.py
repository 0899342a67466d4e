"""The `Strategy` interface and the lean supervised training loop most strategies share.

A strategy owns everything it learns and keeps (model, optimizer state, buffers, generators).
The runner only calls the lifecycle below and never reaches into a strategy's state:

    setup(stream, model, ctx) -> learn(task) ... predict(x, task) ... state_dict()

Add-ons (replay buffers, regularisers, generators) are plain objects that a strategy holds and
that return loss terms; they do not mutate the runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .config import SCENARIOS
from .stream import Task, TaskStream, TensorData
from .task_kinds import Classification, Tokens, task_kind
from .trainer import Trainer, aux_loss  # noqa: F401  (aux_loss: re-exported for plugins)

Hook = Callable[..., None]
HOOK_EVENTS = ("before_task", "after_task", "before_epoch", "after_epoch", "after_batch")


@dataclass
class Hooks:
    """Callbacks for plugins (probes, loggers). Empty lists cost nothing on the hot path;
    ``after_batch`` is called only when someone registered for it."""

    before_task: list[Hook] = field(default_factory=list)
    after_task: list[Hook] = field(default_factory=list)
    before_epoch: list[Hook] = field(default_factory=list)
    after_epoch: list[Hook] = field(default_factory=list)
    after_batch: list[Hook] = field(default_factory=list)

    def call(self, event: str, **kwargs: Any) -> None:
        for hook in getattr(self, event):
            hook(**kwargs)


@dataclass
class RunContext:
    """What the runner lends a strategy: device, seeded generator, hooks, progress reporting."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    hooks: Hooks = field(default_factory=Hooks)
    progress: Any = None  # cl_toolkit.progress.Progress-like; None = silent
    precision: str = "fp32"  # trainer.precision: fp32 | bf16 | fp16 (autocast on a GPU)
    grad_clip: float | None = None  # trainer.grad_clip: max global gradient L2 norm

    def __post_init__(self):
        self.trainer = Trainer(self, self.precision, self.grad_clip)

    def advance(self, what: str, total: int | None = None) -> None:
        if self.progress is not None:
            self.progress.step(what, total)


class Strategy:
    """Base class of every continual-learning strategy (training, merging, kernel replay).

    Subclasses take their hyperparameters as keyword arguments in ``__init__`` (the registry
    checks config keys against that signature) and implement `learn`. ``predict`` returns
    logits over the stream's global label space ``[B, num_classes]``.
    """

    name: str = ""
    # What the strategy supports, checked before anything runs: scenarios and task kinds
    # (`cl_toolkit.task_kinds`), and the capabilities a probe may require ("train_step": the
    # strategy takes one step of its own objective on given data, see `train_step`).
    scenarios: tuple[str, ...] = SCENARIOS
    task_kinds: tuple[str, ...] = ("classification",)
    capabilities: frozenset[str] = frozenset()

    def setup(self, stream: TaskStream, model: nn.Module, ctx: RunContext) -> None:
        self.stream, self.model, self.ctx = stream, model.to(ctx.device), ctx

    def learn(self, task: Task) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """Logits for ``x``; ``task`` is used only in task-il (the task id is known there)."""
        t = self._task_ids(x, task)
        return self.model(x, t)

    def _task_ids(self, x: torch.Tensor, task: Task) -> torch.Tensor | None:
        """Test-time task ids: given in task-il only (`train_task_ids` matches it)."""
        if not self.stream.task_il:
            return None
        return torch.full((x.shape[0],), task.index, dtype=torch.long, device=x.device)

    def train_task_ids(self, t: torch.Tensor) -> torch.Tensor | None:
        """Training-time task ids, handed to the model exactly when `predict` hands them (a
        model must not learn to rely on an id it will not get at test time), and always to a
        model that declares ``trains_with_task_id`` (it reads them in training only, e.g. the
        routing loss of task-free MoM routing, and ignores them at test time)."""
        if getattr(self.model, "trains_with_task_id", False):
            return t
        return t if self.stream.task_il and getattr(self.model, "uses_task_id", False) else None

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   task: Task) -> torch.Tensor:
        """One step of the strategy's own objective on ``(x, y, t)`` (on the run's device),
        through the run's trainer; returns the loss. Strategies that declare the capability
        ``"train_step"`` implement it (a probe's study steps use it)."""
        raise NotImplementedError(f"{type(self).__name__} does not train by gradient steps.")

    def state_dict(self) -> dict:
        """Everything needed to continue after the last finished task."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def memory_bytes(self) -> int:
        """Bytes kept besides the model (coresets, buffers, generators, task vectors)."""
        return 0

    def reference_accuracy(self) -> dict[str, dict[str, float]]:
        """Reference rows for reports, ``{row name: {task name: accuracy}}`` (merging: each
        fine-tuned model on its own task). Empty for most strategies."""
        return {}


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def supervised_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits ``[B, C]`` against labels ``[B]``, or of token logits
    ``[B, L, V]`` against per-position targets ``[B, L]`` averaged over the positions that have
    one (``IGNORE_INDEX`` = no loss): the classification and token kinds' loss."""
    return (Tokens() if logits.dim() == 3 else Classification()).loss(logits, y)


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from .errors import unknown_name

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise unknown_name("optimizer", name, ["sgd", "adam", "adamw"])


class SupervisedStrategy(Strategy):
    """Mini-batch training on the task kind's loss; subclasses change the data or add loss
    terms. Data are in-memory tensors indexed per batch and moved to the device once per batch;
    the trainer adds the model's auxiliary loss and checks every loss for NaN/Inf (a run stops
    at the step that diverged, naming task, epoch and step, with every finished task saved).
    """

    task_kinds = ("classification", "tokens", "cross_section", "segmentation")
    capabilities = frozenset({"train_step"})

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.01,
                 optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
                 lr_decay: float = 1.0, reset_optimizer: bool = True):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay
        self.lr_decay, self.reset_optimizer = lr_decay, reset_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.tasks_seen = 0

    def setup(self, stream: TaskStream, model: nn.Module, ctx: RunContext) -> None:
        super().setup(stream, model, ctx)
        self.kind = task_kind(stream.kind)

    def train_data(self, task: Task) -> TensorData:
        return task.train

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, task: Task) -> torch.Tensor:
        return self.kind.loss(self.model(x, self.train_task_ids(t)), y)

    def after_task(self, task: Task) -> None:
        """Update buffers etc. once the task has been learned."""

    def current_lr(self) -> float:
        return self.lr * self.lr_decay ** self.tasks_seen

    def _prepare_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None or self.reset_optimizer:
            self.optimizer = make_optimizer(self.optimizer_name, self.model.parameters(),
                                            self.current_lr(), self.momentum, self.weight_decay)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr()
        return self.optimizer

    def learn(self, task: Task) -> None:
        opt, data = self._prepare_optimizer(), self.train_data(task)
        self.ctx.trainer.fit(
            optimizer=opt, epochs=self.epochs, model=self.model, strategy=self, task=task,
            batches=lambda epoch: data.batches(self.batch_size, self.ctx.generator, True),
            loss=lambda b: self.loss(*b, task), what=f"task {task.index} ({task.name!r})",
            steps_per_epoch=-(-len(data) // self.batch_size))
        self.after_task(task)
        self.tasks_seen += 1

    def train_step(self, x, y, t, task):
        if self.optimizer is None:
            self._prepare_optimizer()
        was_training = self.model.training
        self.model.train()
        try:
            return self.ctx.trainer.step(lambda: self.loss(x, y, t, task), self.optimizer,
                                         model=self.model,
                                         where=f"a probe's step in task {task.index}")
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "tasks_seen": self.tasks_seen,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.tasks_seen = state["tasks_seen"]
        if state.get("optimizer") is not None:
            self.optimizer = make_optimizer(self.optimizer_name, self.model.parameters(),
                                            self.current_lr(), self.momentum, self.weight_decay)
            self.optimizer.load_state_dict(state["optimizer"])
