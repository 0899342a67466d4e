"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al.,
https://arxiv.org/abs/2407.02880).

``theta = theta_0 + sum_i Lambda[i, j] tau_i[j]`` with one scalar per (task vector i, parameter
tensor j). The coefficients are the only trainable values: the base model and the task vectors
stay frozen and resident once; every step composes the parameters and runs the model through
``torch.func.functional_call``, so no model copy is made. Only parameters get coefficients:
floating-point buffers (BatchNorm running statistics) are not directions to scale, and the model
runs with its own buffers, as the authors' ``WeightedImageEncoder`` composes
``named_parameters`` only (https://github.com/fredzzhang/atlas, src/composition.py).

The recipe is the authors' (src/learn_task_addition.py, src/learn_few_shots.py there): AdamW,
lr 1e-3, weight decay 0.1, gradient norm clipped to 1.0, coefficients from 0, and the
coefficients kept are those that scored best on held-out validation data, checked every
``eval_every`` steps, the starting point included.

Objectives:

- ``"supervised"``: cross-entropy on a few labelled samples (task addition / few-shot);
  validation score: accuracy.
- ``"entropy"``: Shannon entropy of the predictions on unlabelled inputs, AdaMerging's
  objective (Yang et al., https://arxiv.org/abs/2310.02575).
- ``"pseudo_label"``: plain self-training, cross-entropy on the model's own predictions that
  are at least ``threshold`` confident. It is *not* the paper's UFM (unsupervised FixMatch:
  pseudo-labels from a plain view supervise a strongly augmented view, with trusted samples per
  class), which needs augmentations this toolkit's tensors do not carry.

For the unlabelled objectives the validation score is minus the objective on the held-out
inputs (no labels exist to count accuracy).

Every coefficient step goes through the run's `Trainer.step` (finite check, precision), with
aTLAS's own gradient clipping. The objective is the paper's alone: a model's auxiliary loss
(MoM's router balance) is not added, since the coefficients only rescale directions the
fine-tuning already found and balancing the router is that fine-tuning's concern.

`ATLAS` is the continual strategy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cl_toolkit.errors import ConfigError
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import Task, TensorData
from cl_toolkit.trainer import Trainer
from cl_toolkit.validation import above, at_least

from .base import MergeStrategy
from .task_vectors import StateDict, assign_

OBJECTIVES = ("supervised", "entropy", "pseudo_label")


def compose(base: StateDict, task_vectors: list[StateDict], coefs: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """``base + sum_i coefs[i, j] * tau_i[key_j]`` with keys in ``task_vectors[0]``'s order;
    differentiable in ``coefs [n_vectors, n_keys]``."""
    keys = list(task_vectors[0]) if task_vectors else []
    if coefs.shape != (len(task_vectors), len(keys)):
        raise ValueError(f"coefs has shape {tuple(coefs.shape)}; expected "
                         f"({len(task_vectors)}, {len(keys)}) = (task vectors, tensors).")
    out = {}
    for j, k in enumerate(keys):
        value = base[k]
        for i, tv in enumerate(task_vectors):
            value = value + coefs[i, j] * tv[k]
        out[k] = value
    return out


def objective_loss(logits: torch.Tensor, y: torch.Tensor | None, objective: str,
                   threshold: float = 0.9) -> torch.Tensor:
    """Loss to minimise over the coefficients; ``y`` is used only by ``"supervised"``."""
    if objective == "supervised":
        return F.cross_entropy(logits, y)
    # Task-il heads give -inf to other tasks' classes: 0 * -inf would be NaN, so those entries
    # contribute 0 (their probability is exactly 0).
    masked = torch.isneginf(logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    if objective == "entropy":
        p = torch.softmax(logits.float(), dim=-1)
        return -(p * logp.masked_fill(masked, 0.0)).sum(-1).mean()
    if objective == "pseudo_label":
        conf, label = logp.detach().exp().max(-1)
        mask = conf >= threshold
        if not bool(mask.any()):
            return logits.masked_fill(masked, 0.0).sum() * 0.0
        return F.nll_loss(logp[mask], label[mask])
    raise ValueError(f"Unknown aTLAS objective {objective!r}; use one of {OBJECTIVES}.")


def parameter_keys(model: nn.Module, keys) -> list[str]:
    """The entries of ``keys`` that are parameters of ``model`` (buffers left out)."""
    params = {n for n, _ in model.named_parameters()}
    return [k for k in keys if k in params]


def fit_coefficients(model: nn.Module, base: StateDict, task_vectors: list[StateDict],
                     data: TensorData, objective: str = "supervised",
                     coefs: torch.Tensor | None = None, steps: int = 200, lr: float = 1e-3,
                     batch_size: int = 128, use_task_ids: bool = False,
                     generator: torch.Generator | None = None, threshold: float = 0.9,
                     weight_decay: float = 0.1, grad_clip: float | None = 1.0,
                     val_data: TensorData | None = None, eval_every: int = 10,
                     trainer: Trainer | None = None) -> torch.Tensor:
    """Learn ``coefs [n_vectors, n_keys]`` (start: ``coefs`` or zeros) with AdamW on ``data``.

    ``task_vectors`` must hold parameters only (`parameter_keys`). With ``val_data``, returns
    the coefficients that scored best on it (strictly better than every earlier check; the
    start is checked first); without, the last ones. The model runs in eval mode (BatchNorm uses
    its stored statistics, dropout is off), so the coefficients are the only thing that changes.
    ``trainer``: the run's (default: a plain fp32 one on the base's device).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown aTLAS objective {objective!r}; use one of {OBJECTIVES}.")
    buffers = {n for n, _ in model.named_buffers()} & set(task_vectors[0])
    if buffers:
        raise ValueError(f"aTLAS task vectors hold buffers ({', '.join(sorted(buffers))}); "
                         "pass parameters only (merging.atlas.parameter_keys).")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}.")
    n_keys = len(task_vectors[0])
    device = next(iter(base.values())).device
    if coefs is None:
        coefs = torch.zeros(len(task_vectors), n_keys, device=device)
    trainer = trainer or RunContext(device=device).trainer
    coefs = coefs.detach().clone().to(device).requires_grad_(True)
    opt = torch.optim.AdamW([coefs], lr=lr, weight_decay=weight_decay)
    was_training = model.training
    # The base stays frozen: no gradient for the parameters that are not composed either.
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    n = len(data)

    def logits_of(x, t):
        params = compose(base, task_vectors, coefs)
        return functional_call(model, params, (x,), {"t": t} if use_task_ids else {})

    best, best_score = coefs.detach().clone(), None

    def check():
        nonlocal best, best_score
        if val_data is None:
            return
        with torch.no_grad():
            score = validation_score(logits_of, val_data, objective, threshold, device)
        if best_score is None or score > best_score:
            best, best_score = coefs.detach().clone(), score

    try:
        for p in flags:
            p.requires_grad_(False)
        check()
        for step in range(steps):
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            x, y, t = data.x[idx].to(device), data.y[idx].to(device), data.t[idx].to(device)
            trainer.step(lambda: objective_loss(logits_of(x, t), y, objective, threshold), opt,
                         model=None, where=f"the aTLAS coefficient fit ({objective}), step {step}",
                         lr_key="strategy.coef_lr", grad_clip=grad_clip, params=[coefs])
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                check()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return best if val_data is not None else coefs.detach()


def validation_score(logits_of, data: TensorData, objective: str, threshold: float,
                     device, batch_size: int = 256) -> float:
    """Higher is better: accuracy for ``"supervised"``, minus the mean objective otherwise."""
    total = 0.0
    for x, y, t in data.batches(batch_size):
        x, y, t = x.to(device), y.to(device), t.to(device)
        logits = logits_of(x, t)
        if objective == "supervised":
            total += float((logits.argmax(-1) == y).sum())
        else:
            total -= float(objective_loss(logits, None, objective, threshold)) * len(x)
    return total / max(1, len(data))


class ATLAS(MergeStrategy):
    """aTLAS (https://arxiv.org/abs/2407.02880) as a continual strategy: after each task,
    re-learn one coefficient per (task vector, parameter tensor) for all task vectors so far,
    from 0 as in the paper (``warm_start=True``: earlier ones start at their last values), with
    the authors' recipe (AdamW, ``coef_lr`` 1e-3, ``coef_weight_decay`` 0.1, gradient norm
    clipped to ``coef_grad_clip`` 1.0) and the coefficients that score best on a validation
    split, checked every ``coef_eval_every`` steps (see `fit_coefficients`).

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
    state_attrs = ("task_vectors", "coefs", "buffer", "val_buffer")
    ranges = {"coef_lr": above(0), "coef_batch_size": at_least(1), "coef_steps": at_least(0)}
    smoke = {"coef_steps": 2, "k_shot": 2, "unlabeled_per_task": 4}

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
        self.coef_keys = parameter_keys(self.model, self.keys)
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
        self.coefs = fit_coefficients(
            self.model, {k: self.base[k] for k in self.coef_keys}, self.task_vectors,
            TensorData.cat(self.buffer), "supervised" if self.k_shot > 0 else self.unsupervised,
            start, steps=self.coef_steps, lr=self.coef_lr, batch_size=self.coef_batch_size,
            use_task_ids=getattr(self.model, "uses_task_id", False),
            generator=self.ctx.generator, weight_decay=self.coef_weight_decay,
            grad_clip=self.coef_grad_clip, val_data=val_data if len(val_data) else None,
            eval_every=self.coef_eval_every, trainer=self.ctx.trainer)

    @torch.no_grad()
    def merged_update(self):
        update = {k: torch.zeros_like(v) for k, v in self.base.items()}
        composed = compose({k: update[k] for k in self.coef_keys}, self.task_vectors,
                           self.coefs)
        return {**update, **composed}, 1.0

    def load_state_dict(self, state):
        super().load_state_dict(state)  # the buffers come back as (x, y, t) tuples
        self.buffer = [TensorData(*b) for b in self.buffer]
        self.val_buffer = [TensorData(*b) for b in self.val_buffer]
