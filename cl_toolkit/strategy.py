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
import torch.nn.functional as F
from torch import nn

from .errors import NonFiniteLossError
from .stream import IGNORE_INDEX, Task, TaskStream, TensorData

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
        model must not learn to rely on an id it will not get at test time)."""
        return t if self.stream.task_il and getattr(self.model, "uses_task_id", False) else None

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
    one (``IGNORE_INDEX`` = no loss)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, y)


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


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The model's auxiliary loss from its last forward (already weighted), or 0."""
    aux = getattr(model, "aux_loss", None)
    return 0.0 if aux is None else aux


class SupervisedStrategy(Strategy):
    """Mini-batch training with cross-entropy; subclasses change the data or add loss terms.

    The loop indexes in-memory tensors, moves a batch to the device once and checks the loss for
    NaN/Inf at every step (a scalar compare; it stops a run at the step that diverged, naming
    task, epoch and step, while every finished task's results stay on disk).
    """

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.01,
                 optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
                 lr_decay: float = 1.0, reset_optimizer: bool = True):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay
        self.lr_decay, self.reset_optimizer = lr_decay, reset_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.tasks_seen = 0

    def train_data(self, task: Task) -> TensorData:
        return task.train

    def loss(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, task: Task) -> torch.Tensor:
        return supervised_loss(self.model(x, self.train_task_ids(t)), y)

    def after_task(self, task: Task) -> None:
        """Update buffers etc. once the task has been learned."""

    def current_lr(self) -> float:
        return self.lr * self.lr_decay ** self.tasks_seen

    def learn(self, task: Task) -> None:
        ctx, model = self.ctx, self.model
        if self.optimizer is None or self.reset_optimizer:
            self.optimizer = make_optimizer(self.optimizer_name, model.parameters(),
                                            self.current_lr(), self.momentum, self.weight_decay)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr()
        opt, data, dev = self.optimizer, self.train_data(task), ctx.device
        hooks = ctx.hooks
        steps = -(-len(data) // self.batch_size)  # per epoch, for progress within an epoch
        model.train()
        for epoch in range(self.epochs):
            hooks.call("before_epoch", strategy=self, task=task, epoch=epoch)
            for step, (x, y, t) in enumerate(data.batches(self.batch_size, ctx.generator, True)):
                if x.device != dev:
                    x, y, t = x.to(dev, non_blocking=True), y.to(dev), t.to(dev)
                loss = self.loss(x, y, t, task)
                loss = loss + aux_loss(model)  # e.g. MoM load balancing, for every strategy
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"Loss became {loss.item()} in task {task.index} ({task.name!r}), epoch "
                        f"{epoch}, step {step}. Results of the tasks finished before it are "
                        "saved. Lower the learning rate (strategy.lr), check the inputs for "
                        "NaN/Inf, or add gradient clipping."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ctx.advance("step", steps)
                if hooks.after_batch:
                    hooks.call("after_batch", strategy=self, task=task, epoch=epoch, step=step,
                               loss=loss)
            hooks.call("after_epoch", strategy=self, task=task, epoch=epoch)
            ctx.advance("epoch", self.epochs)
        model.eval()
        self.after_task(task)
        self.tasks_seen += 1

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
