"""``smoke=true``: run any command end to end in seconds, to check that it works as written.

Every size key a config has is made tiny (`TINY`), and the stream keeps its first two tasks with
a few samples each. The run is real (the same code paths, results.json, report), only small;
its config records the sizes it ran with. The README's examples are tested this way
(tests/test_readme_examples.py), as is every registered name (tests/test_every_name_runs.py).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .stream import TaskStream

# Size keys made tiny wherever a config node has them.
TINY = {"epochs": 1, "pretrain_epochs": 1, "generator_epochs": 1, "coef_steps": 2,
        "num_features": 32, "vrf_hidden": 16, "z_dim": 4, "generator_hidden": [16],
        "coreset_per_class": 2, "support_per_class": 2, "generated_per_class": 2,
        "buffer_size": 8, "k_shot": 2, "unlabeled_per_task": 4, "batch_size": 16,
        "hidden": [16], "channels": [4, 4, 4], "nf": 4, "hidden_size": 16, "num_layers": 1,
        "n_tasks": 2, "max_train_per_task": 64, "max_test_per_task": 32, "max_train": 16,
        "max_test": 8, "image_size": 32}
GROUPS = ("benchmark", "model", "strategy")
TASKS, TRAIN, TEST = 2, 24, 12


def shrink_config(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for group in GROUPS:
        node = cfg.get(group) or {}
        for key, value in TINY.items():
            if key in node and not isinstance(node[key], dict):
                node[key] = copy.deepcopy(value)
    return cfg


def shrink_stream(stream: TaskStream, seed: int = 0) -> TaskStream:
    """The first TASKS tasks, TRAIN random training and TEST test samples each."""
    g = torch.Generator().manual_seed(seed)
    tasks = [dataclasses.replace(
        t, train=t.train.subset(torch.randperm(len(t.train), generator=g)[:TRAIN]),
        test=t.test.subset(torch.arange(min(TEST, len(t.test)))))
        for t in stream.tasks[:TASKS]]
    return dataclasses.replace(stream, tasks=tasks)
