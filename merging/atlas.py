"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al.,
https://arxiv.org/abs/2407.02880).

``theta = theta_0 + sum_i Lambda[i, j] tau_i[j]`` with one scalar per (task vector i, parameter
tensor j). The coefficients are the only trainable values: the base model and the task vectors
stay frozen and resident once; every step composes the parameters and runs the model through
``torch.func.functional_call``, so no model copy is made. Objectives: supervised cross-entropy
on a few labelled samples (task addition / few-shot), or, without labels, prediction entropy or
cross-entropy on confident pseudo-labels (test-time adaptation).
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


def fit_coefficients(model: nn.Module, base: StateDict, task_vectors: list[StateDict],
                     data: TensorData, objective: str = "supervised",
                     coefs: torch.Tensor | None = None, steps: int = 100, lr: float = 0.01,
                     batch_size: int = 64, use_task_ids: bool = False,
                     generator: torch.Generator | None = None,
                     threshold: float = 0.9) -> torch.Tensor:
    """Learn ``coefs [n_vectors, n_keys]`` (start: ``coefs`` or zeros) with Adam on ``data``.

    The model runs in eval mode (BatchNorm uses its stored statistics, dropout is off), so the
    coefficients are the only thing that changes.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown aTLAS objective {objective!r}; use one of {OBJECTIVES}.")
    n_keys = len(task_vectors[0])
    device = next(iter(base.values())).device
    if coefs is None:
        coefs = torch.zeros(len(task_vectors), n_keys, device=device)
    coefs = coefs.detach().clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([coefs], lr=lr)
    was_training = model.training
    # The base stays frozen: no gradient for the parameters that are not composed either.
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    n = len(data)
    try:
        for p in flags:
            p.requires_grad_(False)
        for step in range(steps):
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            x, y, t = data.x[idx].to(device), data.y[idx].to(device), data.t[idx].to(device)
            params = compose(base, task_vectors, coefs)
            kwargs = {"t": t} if use_task_ids else {}
            logits = functional_call(model, params, (x,), kwargs)
            loss = objective_loss(logits, y, objective, threshold)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"aTLAS coefficient fit: the {objective} loss became {loss.item()} at step "
                    f"{step}. Lower strategy.coef_lr or check the task vectors for NaN/Inf."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return coefs.detach()
