"""The one training loop. Every method trains through it: supervised strategies, KCL's
extractor, GKCL's generator, merge fine-tuning, aTLAS coefficients and a probe's study steps.

A method supplies its data (``batches(epoch)``) and its loss (``loss(batch)``); the trainer owns
everything around them, so that they cannot drift apart between methods:

- the model's auxiliary loss (e.g. MoM's load balancing) added to every step's loss;
- the finite check, with one message naming where the loss diverged;
- mixed precision (``precision=bf16|fp16``, autocast on a GPU; fp16 with a gradient scaler) and
  gradient clipping (``grad_clip``, the global L2 norm), set by the top-level ``trainer`` keys;
- the hooks (``before_epoch``, ``after_batch``, ``after_epoch``) that step logging and probes
  see, and progress reporting;
- the epoch boundary for the model itself: a model with an ``end_epoch(epoch, epochs)`` method
  is told after the last step of every epoch of a fit (before the ``after_epoch`` hooks), so
  that what it does per epoch (e.g. the market models' averaging of the last epochs'
  parameters) follows the real epochs whatever data a strategy passes (replayed samples, the
  union of tasks). Optional: a model without it is untouched.

`Trainer.step` is the single place where a training loss is back-propagated. It is also what a
strategy's ``train_step`` (the contract a probe uses) calls, so a probe's extra steps get the
same treatment as the strategy's own. A distributed engine (Lightning Fabric, torch DDP) would
wrap the model and optimizer once and replace ``_backward`` and ``_optimizer_step``; no method
needs to change for it.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError, NonFiniteLossError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULT = object()


def aux_loss(model: nn.Module | None) -> torch.Tensor | float:
    """The model's auxiliary loss from its last forward (already weighted), or 0."""
    aux = getattr(model, "aux_loss", None) if model is not None else None
    return 0.0 if aux is None else aux


def check_settings(precision: str, grad_clip: float | None, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}; fp32 trains without autocast.")
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"trainer.precision={precision} needs a GPU (device=cuda); on "
                          f"{device.type} use trainer.precision=fp32.")
    if grad_clip is not None and not grad_clip > 0:
        raise ConfigError(f"trainer.grad_clip={grad_clip} must be > 0 (the largest global "
                          "gradient L2 norm), or null for no clipping.")


class Trainer:
    """Training steps and epochs for one run; ``ctx`` is the run's `RunContext` (device, hooks,
    progress), read at every call so that hooks a probe adds later are seen."""

    def __init__(self, ctx: Any, precision: str = "fp32", grad_clip: float | None = None):
        self.ctx, self.precision, self.grad_clip = ctx, precision, grad_clip
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self):
        """Autocast context of the run's precision (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=_DTYPES[self.precision])

    def step(self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, *,
             model: nn.Module | None, where: str, lr_key: str = "strategy.lr",
             grad_clip: Any = _DEFAULT, params: Sequence[torch.Tensor] | None = None
             ) -> torch.Tensor:
        """One optimiser step on ``loss_fn() + model's aux loss``; returns the loss.

        ``model=None``: no auxiliary loss (e.g. a generator's step, where the model's last aux
        loss belongs to another forward). ``grad_clip`` overrides the run's setting for this
        step (aTLAS clips its coefficients with its own recipe); ``params`` are what is clipped
        (default: every parameter the optimiser holds)."""
        with self.autocast():
            loss = loss_fn()
            loss = loss + aux_loss(model)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"Loss became {loss.item()} in {where}. Results of the tasks finished before "
                f"it are saved. Lower the learning rate ({lr_key}), check the inputs for "
                "NaN/Inf, or clip gradients (trainer.grad_clip=1.0).")
        optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        clip = self.grad_clip if grad_clip is _DEFAULT else grad_clip
        if clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if params is None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self._optimizer_step(optimizer)
        return loss

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def fit(self, *, optimizer: torch.optim.Optimizer, epochs: int,
            batches: Callable[[int], Iterable[tuple]],
            loss: Callable[[tuple], torch.Tensor], what: str,
            model: nn.Module | None = None, modules: Sequence[nn.Module] | None = None,
            strategy: Any = None, task: Any = None, steps_per_epoch: int | None = None,
            after_step: Callable[[], None] | None = None, lr_key: str = "strategy.lr",
            hooks: bool = True) -> None:
        """``epochs`` passes over ``batches(epoch)`` (tuples of tensors, moved to the run's
        device here), one `step` per batch on ``loss(batch)``. ``modules`` (default:
        ``model``) are in train mode during the fit and in eval mode after it. With ``hooks``,
        the run's hooks see every epoch and step (with ``strategy`` and ``task``) and progress
        is reported; ``hooks=False`` is for an inner phase (a generator's steps) that shows
        neither. ``what`` names the phase in error messages, e.g. ``"task 1 ('t1')"``."""
        ctx, dev = self.ctx, self.ctx.device
        modules = [model] if modules is None and model is not None else list(modules or [])
        for m in modules:
            m.train()
        call = ctx.hooks.call if hooks else None
        try:
            for epoch in range(epochs):
                if call:
                    call("before_epoch", strategy=strategy, task=task, epoch=epoch)
                for step, batch in enumerate(batches(epoch)):
                    batch = tuple(b.to(dev, non_blocking=True) if isinstance(b, torch.Tensor)
                                  and b.device != dev else b for b in batch)
                    value = self.step(lambda: loss(batch), optimizer, model=model,
                                      where=f"{what}, epoch {epoch}, step {step}",
                                      lr_key=lr_key)
                    if after_step is not None:
                        after_step()
                    if call:
                        ctx.advance("step", steps_per_epoch)
                    if call and ctx.hooks.after_batch:
                        call("after_batch", strategy=strategy, task=task, epoch=epoch,
                             step=step, loss=value)
                end_epoch = getattr(model, "end_epoch", None)
                if end_epoch is not None:
                    end_epoch(epoch, epochs)
                if call:
                    call("after_epoch", strategy=strategy, task=task, epoch=epoch)
                    ctx.advance("epoch", epochs)
        finally:
            for m in modules:
                m.eval()


def warm_up() -> float:
    """Pay the one-time costs of a process's first training step before any task is timed, and
    return the seconds they took. The first ``torch.optim.Optimizer`` imports ``torch._dynamo``
    (1.5-4 s on 2 cores), which used to land in the first task's ``train_s``. It touches no
    random number generator and no parameter of the run (a zero tensor of its own), so no
    number a run computes changes; a second call costs microseconds."""
    t0 = time.perf_counter()
    import torch._dynamo  # what torch.optim imports lazily

    scratch = torch.zeros(2, requires_grad=True)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 lambda p: torch.optim.AdamW(p, lr=0.1)):
        optimizer = make([scratch])
        (scratch * scratch).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
