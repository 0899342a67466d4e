"""Kernel continual learning (KCL): Derakhshani, Zhen, Shao, Snoek, Gavves, ICML 2021,
https://arxiv.org/abs/2107.05757.

One feature extractor h = f(x) (``model.backbone``; the model's linear head is not used) is shared
by all tasks; every task's classifier is kernel ridge regression on a support set
(`kernel_machine.KernelMachine`), so there are no task-specific weights to forget, only the
extractor drifts.

- ``learn(task)``: take a coreset of ``coreset_per_class`` samples per class *out of* the task's
  training data and keep it as raw inputs. Train extractor + kernel machine on the rest: at every
  step a support and a query are formed, the query is classified by the machine solved on the
  support, loss = CE + tau * KL (the KL is non-zero for the ``vrf`` kernel only).
  ``support="coreset"`` (default) uses the task's coreset as the support and the whole batch as
  the query, as KCL's public reference code does; ``support="batch"`` splits the batch itself in
  two halves (meta-learning style; cheaper, but a 5-sample support is weak at batch size 10).
  Support and query go through the extractor in two forward passes, as in the reference code,
  so BatchNorm statistics never mix them.
- Learning rate of task t (from 0): ``max(lr * lr_decay^t, lr_min)``; with
  ``decay_first_task=True`` ``max(lr * lr_decay^(t+1), lr_min)``, the reference code's schedule
  (``lr * gamma^task_id`` with task ids from 1: the first task already at lr * gamma), which
  the protocol configs (``experiment=kcl_*``, ``gkcl_*``) use.
- Features are normalised before the kernel (``feature_norm``, default per-sample L2; the
  reference min-max-normalises each batch, ``batch_minmax``): without it the scale of ReLU
  features drifts and the shift-invariant kernels collapse to K = I (loss stuck at log C).
- ``predict(x, task)`` (task-il): rebuild the task's machine from its coreset with the *current*
  extractor and the task's *own* lambda/gamma/beta (the public reference scores every task with
  the current task's values; we do not). Logits are placed at the task's global class ids and
  are -inf elsewhere.
- Extension, not in the paper: when the task id is not given (class-il / domain-il), every
  learned task's machine scores the input and each class keeps its best calibrated logit
  (gamma_t, beta_t make the tasks' scores comparable), so argmax picks the best task and class.

``memory_bytes()`` = bytes of the stored coresets (inputs and labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_toolkit.errors import ConfigError
from cl_toolkit.strategy import RunContext, Strategy, make_optimizer, tensor_bytes
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.validation import at_least

from .kernel_machine import KernelMachine, KernelSolveError, Solution

FEATURE_NORMS = ("none", "l2", "minmax", "batch_minmax")


def normalise_features(h: torch.Tensor, how: str) -> torch.Tensor:
    """Bound the features ``[N, d]`` before the kernel: the scale of raw ReLU features drifts
    during training, and shift-invariant kernels (gaussian, laplacian, rff, vrf) degenerate to
    K = I when the distances grow. ``l2``: unit norm per sample; ``minmax``: per sample to [0, 1];
    ``batch_minmax``: one min and max over the whole batch (what KCL's reference code does; it
    makes a sample's features depend on the rest of its batch)."""
    if how == "l2":
        return F.normalize(h, dim=1)
    if how == "minmax":
        lo, hi = h.min(1, keepdim=True).values, h.max(1, keepdim=True).values
        return (h - lo) / (hi - lo).clamp_min(1e-6)
    if how == "batch_minmax":
        return (h - h.min()) / (h.max() - h.min()).clamp_min(1e-6)
    return h


class KCL(Strategy):
    name = "kcl"
    support_modes = ("coreset", "batch")
    # cl_toolkit.metrics.not_applicable: metrics this method cannot measure.
    not_applicable = {"fwt": "structurally zero: a task has no kernel machine before it is "
                             "learned, so R[j-1, j] and b[j] are the same constant prediction"}
    ranges = {"lr_min": at_least(0), "eval_batch_size": at_least(1)}
    smoke = {"num_features": 32, "vrf_hidden": 16, "coreset_per_class": 2}

    def __init__(self, kernel: str = "vrf", coreset_per_class: int = 20, num_features: int = 1024,
                 bandwidth: float = 1.0, tau: float = 1e-4, lambda_init: float = 0.1,
                 lambda_min: float = 0.01, vrf_hidden: int = 256, support: str = "coreset",
                 epochs: int = 1, batch_size: int = 10, lr: float = 0.1, lr_decay: float = 0.5,
                 lr_min: float = 5e-5, decay_first_task: bool = False, optimizer: str = "sgd",
                 momentum: float = 0.8, weight_decay: float = 0.0, feature_norm: str = "l2",
                 eval_batch_size: int = 1024):
        if support == "batch" and batch_size < 2:
            raise ConfigError(f"support='batch' splits each batch into support and query, so "
                              f"batch_size must be >= 2; got {batch_size}.")
        if support not in self.support_modes:
            raise ConfigError(f"support={support!r} is not valid for {self.name}; choose one of "
                              f"{', '.join(self.support_modes)}.")
        if feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"feature_norm={feature_norm!r}; choose one of "
                              f"{', '.join(FEATURE_NORMS)}.")
        self.feature_norm = feature_norm
        if coreset_per_class < 1:
            raise ConfigError(f"coreset_per_class must be at least 1, got {coreset_per_class}.")
        self.kernel, self.coreset_per_class = kernel, coreset_per_class
        self.machine_kwargs = dict(num_features=num_features, bandwidth=bandwidth,
                                   lambda_init=lambda_init, lambda_min=lambda_min,
                                   vrf_hidden=vrf_hidden)
        self.tau, self.support = tau, support
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.lr, self.lr_decay, self.lr_min = lr, lr_decay, lr_min
        self.decay_first_task = bool(decay_first_task)
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay

    def setup(self, stream: TaskStream, model: nn.Module, ctx: RunContext) -> None:
        super().setup(stream, model, ctx)
        self.machine = KernelMachine(self.kernel, model.feat_dim, len(stream), seed=ctx.seed,
                                     **self.machine_kwargs).to(ctx.device)
        self.coresets: list[TensorData | None] = [None] * len(stream)
        self.tasks_seen = 0
        self._solutions: dict[int, Solution] = {}

    def current_lr(self) -> float:
        return max(self.lr * self.lr_decay ** (self.tasks_seen + self.decay_first_task),
                   self.lr_min)

    def local_labels(self, task: Task) -> torch.Tensor:
        """``[num_classes]`` lookup from global class id to the task-local index 0..C_t-1."""
        lookup = torch.full((self.stream.num_classes,), -1, dtype=torch.long)
        lookup[list(task.classes)] = torch.arange(len(task.classes))
        return lookup.to(self.ctx.device)

    def begin_task(self, task: Task) -> TensorData:
        """Take the coreset out of the training data; return what is left to train on."""
        data, m = task.train, self.coreset_per_class
        keep = torch.zeros(len(data), dtype=torch.bool)
        for c in task.classes:
            idx = (data.y == c).nonzero().flatten()
            if len(idx) < m:
                raise ConfigError(
                    f"coreset_per_class={m} but class {c} of task {task.index} ({task.name!r}) "
                    f"has only {len(idx)} training samples; lower coreset_per_class."
                )
            keep[idx[torch.randperm(len(idx), generator=self.ctx.generator)[:m]]] = True
        coreset = data.subset(keep.nonzero().flatten())
        self.coresets[task.index] = TensorData(coreset.x.to(self.ctx.device),
                                               coreset.y.to(self.ctx.device))
        return data.subset((~keep).nonzero().flatten())

    def support_query(self, task: Task, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """(x_support, y_support, x_query, y_query) for one training batch ``x``, ``y``; ``idx``
        are its positions in the data that `begin_task` returned."""
        if self.support == "coreset":
            core = self.coresets[task.index]
            return core.x, core.y, x, y
        half = (x.shape[0] + 1) // 2
        return x[:half], y[:half], x[half:], y[half:]

    def extra_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
        """Further loss terms on the batch's features ``[N, d]`` (GKCL adds SupCon)."""
        return 0.0

    def end_task(self, task: Task, train: TensorData) -> None:
        """Work after the extractor has learned the task (GKCL trains its generator here)."""

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())},
                {"params": list(self.machine.parameters()), "weight_decay": 0.0}]

    def learn(self, task: Task) -> None:
        ctx, model, machine, dev = self.ctx, self.model, self.machine, self.ctx.device
        self._solutions.clear()
        train = self.begin_task(task)
        if train.x.device != dev:  # one copy per task instead of one per step
            train = TensorData(train.x.to(dev), train.y.to(dev))
        opt = make_optimizer(self.optimizer_name, self.parameter_groups(), self.current_lr(),
                             self.momentum, self.weight_decay)
        local, n_cls, ti = self.local_labels(task), len(task.classes), task.index
        vrf = self.kernel == "vrf"

        def batches(epoch: int):
            order = torch.randperm(len(train), generator=ctx.generator)
            for step, idx in enumerate(order.split(self.batch_size)):
                x, y = train.x[idx], train.y[idx]
                xs, ys, xq, yq = self.support_query(task, x, y, idx)
                if xq.shape[0]:  # a last batch of one sample leaves no query to score
                    yield xs, ys, xq, yq, epoch, step

        def loss(batch):
            xs, ys, xq, yq, epoch, step = batch
            # Two passes, as the reference: BatchNorm sees the support and the query apart.
            hs, hq = (normalise_features(model.features(
                v, torch.full((len(v),), ti, dtype=torch.long, device=dev)), self.feature_norm)
                for v in (xs, xq))
            h = torch.cat([hs, hq])
            # Fresh VRF noise on the device from the global RNG (as dropout; the runner saves
            # and restores that RNG with each checkpoint).
            eps = torch.randn_like(machine.omega_eps) if vrf else None
            try:
                # The VRF prior sees the whole batch's mean feature (support + query when the
                # batch is split, the query alone when it is the whole batch).
                h_batch = h if self.support == "batch" else hq
                logits, kl = machine(ti, hs, local[ys], hq, n_cls, h_batch=h_batch, eps=eps)
            except KernelSolveError as exc:
                raise KernelSolveError(f"{self.name}: task {ti} ({task.name!r}), epoch "
                                       f"{epoch}, step {step}: {exc}") from exc
            return (F.cross_entropy(logits, local[yq]) + self.tau * kl
                    + self.extra_loss(h, torch.cat([ys, yq])))

        # A hook may predict after a step: solve with the new extractor then.
        ctx.trainer.fit(optimizer=opt, epochs=self.epochs, batches=batches, loss=loss,
                        model=model, modules=(model, machine), strategy=self, task=task,
                        what=f"{self.name} task {ti} ({task.name!r})",
                        after_step=self._solutions.clear)
        self.end_task(task, train)
        self.tasks_seen += 1
        self._solutions.clear()

    @torch.no_grad()
    def features(self, x: torch.Tensor, ti: int) -> torch.Tensor:
        """Normalised extractor features ``[N, d]``, computed in chunks of
        ``eval_batch_size`` (no grad)."""
        dev = self.ctx.device
        parts = []
        for s in range(0, x.shape[0], self.eval_batch_size):
            xb = x[s:s + self.eval_batch_size].to(dev)
            parts.append(self.model.features(
                xb, torch.full((xb.shape[0],), ti, dtype=torch.long, device=dev)))
        return normalise_features(torch.cat(parts), self.feature_norm)

    def support_features(self, ti: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Support features ``[S, d]`` and global labels ``[S]`` of learned task ``ti``."""
        core = self.coresets[ti]
        return self.features(core.x, ti), core.y

    @torch.no_grad()
    def solution(self, ti: int) -> Solution:
        """Task ``ti``'s machine, solved with the current extractor; cached until `learn` or
        `load_state_dict` changes the extractor."""
        if ti not in self._solutions:
            task = self.stream[ti]
            h, y = self.support_features(ti)
            self._solutions[ti], _ = self.machine.fit(ti, h, self.local_labels(task)[y],
                                                      len(task.classes))
        return self._solutions[ti]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: Task) -> torch.Tensor:
        """Logits ``[B, num_classes]``: the task's machine in task-il; otherwise (extension) the
        best calibrated logit per class over every learned task's machine. Safe to call from a
        training hook: the train/eval mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = x.to(self.ctx.device)
            out = torch.full((x.shape[0], self.stream.num_classes), float("-inf"),
                             device=x.device)
            tasks = [task.index] if self.stream.task_il else range(self.tasks_seen)
            per_task = getattr(self.model, "backbone_uses_task_id", False)
            h = None
            for ti in tasks:
                cls = torch.tensor(self.stream[ti].classes, device=x.device)
                if ti >= self.tasks_seen:  # not learned yet (forward-transfer rows): no opinion
                    out[:, cls] = 0.0
                    continue
                if h is None or per_task:
                    h = self.features(x, ti)
                scores = self.machine.scores(self.solution(ti), h)
                out[:, cls] = torch.maximum(out[:, cls], scores)
            if not tasks:
                out.zero_()
            return out
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "machine": self.machine.state_dict(),
                "tasks_seen": self.tasks_seen,
                "coresets": [None if c is None else {"x": c.x.cpu(), "y": c.y.cpu()}
                             for c in self.coresets]}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.model.load_state_dict(state["model"])
        self.machine.load_state_dict(state["machine"])
        self.tasks_seen = state["tasks_seen"]
        self.coresets = [None if c is None else TensorData(c["x"].to(dev), c["y"].to(dev))
                         for c in state["coresets"]]
        self._solutions.clear()

    def memory_bytes(self) -> int:
        return sum(tensor_bytes(c.x, c.y) for c in self.coresets if c is not None)
