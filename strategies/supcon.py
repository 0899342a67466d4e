"""Supervised contrastive loss (Khosla et al., NeurIPS 2020, https://arxiv.org/abs/2004.11362).

GKCL adds it to make the features, and thus the generated support sets, class-discriminative.
This is the "L_out" form: for every anchor i that has at least one positive (same label, j != i),

    L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / T) / sum_{a != i} exp(z_i . z_a / T) )

with z = h / ||h||; the loss is the mean of L_i over anchors that have a positive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SupConLoss:
    """Callable add-on: ``loss = SupConLoss(temperature)(features [B, d], labels [B])``."""

    def __init__(self, temperature: float = 0.1):
        if temperature <= 0:
            raise ValueError(f"SupCon temperature must be positive, got {temperature}.")
        self.temperature = temperature

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features, dim=1)
        sim = z @ z.T / self.temperature
        self_mask = torch.eye(len(labels), dtype=torch.bool, device=z.device)
        # log-softmax over a != i: drop the diagonal by setting it to -inf.
        log_prob = sim.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(1)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return features.sum() * 0.0
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
        return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()
