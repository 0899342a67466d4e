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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cl_toolkit.errors import NonFiniteLossError
from cl_toolkit.stream import TensorData

from .task_vectors import StateDict

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
                     val_data: TensorData | None = None, eval_every: int = 10) -> torch.Tensor:
    """Learn ``coefs [n_vectors, n_keys]`` (start: ``coefs`` or zeros) with AdamW on ``data``.

    ``task_vectors`` must hold parameters only (`parameter_keys`). With ``val_data``, returns
    the coefficients that scored best on it (strictly better than every earlier check; the
    start is checked first); without, the last ones. The model runs in eval mode (BatchNorm uses
    its stored statistics, dropout is off), so the coefficients are the only thing that changes.
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
            loss = objective_loss(logits_of(x, t), y, objective, threshold)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"aTLAS coefficient fit: the {objective} loss became {loss.item()} at step "
                    f"{step}. Lower strategy.coef_lr or check the task vectors for NaN/Inf."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([coefs], grad_clip)
            opt.step()
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
