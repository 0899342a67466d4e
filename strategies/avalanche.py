"""Any Avalanche strategy, by class name and keyword arguments, trained on our stream and scored
by our evaluator: ``strategy=avalanche strategy.cls=EWC strategy.kwargs={ewc_lambda: 1.0}``.

Avalanche owns the training (its loop, plugins, buffers); we hand it our model wrapped as a
multi-task module so task-il masks and multi-head models see the task labels.

Resume: Avalanche strategies keep state that cannot be serialised generically (plugins and
their buffers hold closures and typing sentinels), so a resumed run re-trains the finished tasks
from the same random state. That costs their training time again but gives exactly the weights
and buffers of the uninterrupted run.
"""
from __future__ import annotations

import torch
from torch import nn

from cl_toolkit.errors import ConfigError
from cl_toolkit.strategy import Strategy, make_optimizer


def _task_aware_wrapper(model: nn.Module) -> nn.Module:
    from avalanche.models import MultiTaskModule

    class TaskAware(MultiTaskModule):
        """Passes Avalanche's per-sample task labels to our ``model(x, t)``."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x, task_labels=None):
            if not self.inner.uses_task_id or task_labels is None:
                return self.inner(x)
            t = torch.as_tensor(task_labels, device=x.device)
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            return self.inner(x, t.long())

        def forward_single_task(self, x, task_label):
            return self.forward(x, task_label)

    return TaskAware(model)


# Arguments of every Avalanche strategy that the adapter sets itself.
_OWN = {"model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size",
        "device", "evaluator", "plugins", "eval_every"}


class AvalancheStrategy(Strategy):
    """Training defaults are naive's (conf/strategy/naive.yaml), so an Avalanche baseline runs
    with the same budget as ours unless the config says otherwise."""

    name = "avalanche"

    def __init__(self, cls: str = "Naive", kwargs: dict | None = None, epochs: int = 5,
                 batch_size: int = 32, lr: float = 0.05, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0):
        self.cls, self.kwargs = cls, dict(kwargs or {})
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay

    def hyperparameters(self) -> dict:
        """The Avalanche class's own parameters in effect: its signature's defaults updated by
        ``kwargs`` (recorded in results.json, since ``--cfg job`` cannot know them)."""
        import inspect

        from avalanche import training

        params = inspect.signature(getattr(training, self.cls)).parameters.values()
        own = {p.name: p.default for p in params if p.name not in _OWN
               and p.default is not p.empty and p.kind is not p.VAR_KEYWORD}
        own = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
               for k, v in own.items()}
        return {"cls": self.cls, **own, **self.kwargs}

    def setup(self, stream, model, ctx):
        super().setup(stream, model, ctx)
        from avalanche import training
        from avalanche.training.plugins import EvaluationPlugin

        from cl_toolkit.benchmarks.avalanche_adapter import to_avalanche

        if not hasattr(training, self.cls):
            valid = sorted(n for n in dir(training) if n[0].isupper())
            raise ConfigError(f"avalanche.training has no strategy {self.cls!r}; choose one of "
                              f"{', '.join(valid)}.")
        self.benchmark = to_avalanche(stream)
        wrapped = _task_aware_wrapper(self.model)
        opt = make_optimizer(self.optimizer_name, wrapped.parameters(), self.lr, self.momentum,
                             self.weight_decay)
        self.avl = getattr(training, self.cls)(
            model=wrapped, optimizer=opt, criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.batch_size, train_epochs=self.epochs, eval_mb_size=1024,
            device=ctx.device, evaluator=EvaluationPlugin(loggers=[]), **self.kwargs)

        self.tasks_learned = 0

    def learn(self, task) -> None:
        self.avl.train(self.benchmark.train_stream[task.index], num_workers=0)
        self.model.eval()
        self.tasks_learned += 1

    def state_dict(self) -> dict:
        return {"tasks_learned": self.tasks_learned}

    def load_state_dict(self, state: dict) -> None:
        for task in self.stream.tasks[: state["tasks_learned"]]:
            self.learn(task)
