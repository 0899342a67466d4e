"""The classifier that puts heads on a backbone, and the task-il mask.

A backbone maps inputs ``[B, *input_shape]`` to features ``[B, feat_dim]`` and exposes
``feat_dim``. `Classifier` adds either one head over the global label space or one head per
task (multi-head), and in task-il masks the logits of classes outside the sample's task, so
``model(x, t)`` always returns ``[B, num_classes]`` logits in global class ids.
"""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone + head(s).

    - ``heads=1``: one linear layer over the global label space (class-il, domain-il, or
      task-il with masking).
    - ``heads=n_tasks``: one linear head per task, stored as one ``Linear`` with
      ``n_tasks * num_classes`` outputs so a mixed-task batch costs one matmul and a gather.
    - ``mask [n_tasks, num_classes]``: additive 0 / -inf per task (task-il): logits of classes
      outside a sample's task are -inf, so argmax and cross-entropy see only the task's classes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, heads: int = 1,
                 mask: torch.Tensor | None = None):
        super().__init__()
        self.backbone, self.num_classes, self.heads = backbone, num_classes, heads
        self.head = nn.Linear(backbone.feat_dim, heads * num_classes)
        self.register_buffer("mask", mask, persistent=False)
        self.backbone_uses_task_id = getattr(backbone, "uses_task_id", False)
        # A backbone that reads the task id in training only (task-free MoM routing: the
        # routing loss needs it; at test time it ignores t).
        self.trains_with_task_id = getattr(backbone, "trains_with_task_id", False)
        self.uses_task_id = heads > 1 or mask is not None or self.backbone_uses_task_id

    @property
    def feat_dim(self) -> int:
        return self.backbone.feat_dim

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The backbone's auxiliary loss of the last forward (weighted), or None
        (`SupervisedStrategy.learn` adds it to the training loss)."""
        return getattr(self.backbone, "aux_loss", None)

    def memory_bytes(self) -> int:
        """Bytes the backbone spends per task to protect old tasks (e.g. the memories a
        task-routed MoM gives each task); 0 for backbones without such parts."""
        fn = getattr(self.backbone, "memory_bytes", None)
        return int(fn()) if fn is not None else 0

    def task_scores(self, stream, score) -> dict[str, list[float]]:
        """Per-task figures the backbone reports beside the score matrix (the runner records
        each as an extra matrix), e.g. a task-routed MoM's router task inference; ``score``
        scores a predictor ``x -> logits`` on a task's test set. {} for most backbones."""
        fn = getattr(self.backbone, "task_scores", None)
        return fn(self, stream, score) if fn is not None else {}

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.backbone_uses_task_id or self.trains_with_task_id:
            return self.backbone(x, t)
        return self.backbone(x)

    def classify(self, h: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(h)
        if self.heads > 1:
            if t is None:
                raise ValueError("A multi-head classifier needs the task id of every sample "
                                 "(t); use a single head for class-il / domain-il streams.")
            logits = logits.view(h.shape[0], self.heads, self.num_classes)
            logits = logits[torch.arange(h.shape[0], device=h.device), t]
        if self.mask is not None and t is not None:
            logits = logits + self.mask[t]
        return logits

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.features(x, t), t)


def task_mask(stream) -> torch.Tensor:
    """``[n_tasks, num_classes]`` additive mask: 0 on each task's classes, -inf elsewhere."""
    mask = torch.full((len(stream), stream.num_classes), float("-inf"))
    for task in stream:
        mask[task.index, list(task.classes)] = 0.0
    return mask
