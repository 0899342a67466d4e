"""``smoke=true``: run any command end to end in seconds, to check that it works as written.

Every size key of the selected strategy, model and stream is made tiny, and the stream keeps
its first two tasks with a few samples each. The tiny sizes are declared by each key's owner next
to its signature (``smoke = {"buffer_size": 8}`` on the strategy class, or as an attribute of a
builder function; a value may be a function of the config node, for a size that must fit
another key), plus `SHARED` for the keys every strategy has. The user's own values are checked
first (`cl_toolkit.validation`), so a bad size is refused, never hidden by the tiny one. The run
is real (the same code paths, results.json, report), only small; its config records the sizes
it ran with. The README's examples are tested this way (tests/test_readme_examples.py), as is
every registered name (tests/test_every_name_runs.py).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import registry, validation
from .stream import TaskStream

# Sizes of the keys every strategy shares; an owner's declaration of the same key wins.
SHARED = {"epochs": 1, "batch_size": 16}
TASKS, TRAIN, TEST = 2, 24, 12


def sizes_of(target) -> dict:
    """The smoke sizes that apply to a node of ``target``: the shared ones, then its own."""
    return {**SHARED, **validation.declared(target, "smoke")}


def shrink_config(cfg: dict) -> dict:
    """``cfg`` with every declared size key of its stream, model and strategy made tiny; each
    value replaced is checked first, so an invalid one is an error here too."""
    cfg = copy.deepcopy(cfg)
    for kind, group in validation.NODES:
        node = cfg.get(group)
        if not isinstance(node, dict) or "name" not in node:
            continue
        target = registry.resolve(kind, node["name"])
        defaults = registry.signature_defaults(kind, target)
        ranges = validation.ranges_of(target)
        tiny = {}
        for key, size in sizes_of(target).items():
            if key in node and not isinstance(node[key], dict):
                validation.check_value(group, key, node[key], defaults.get(key), ranges.get(key))
                tiny[key] = size(node) if callable(size) else copy.deepcopy(size)
        node.update(tiny)
    return cfg


def shrink_stream(stream: TaskStream, seed: int = 0) -> TaskStream:
    """The first TASKS tasks, TRAIN random training and TEST test samples each."""
    g = torch.Generator().manual_seed(seed)
    tasks = [dataclasses.replace(
        t, train=t.train.subset(torch.randperm(len(t.train), generator=g)[:TRAIN]),
        test=t.test.subset(torch.arange(min(TEST, len(t.test)))))
        for t in stream.tasks[:TASKS]]
    return dataclasses.replace(stream, tasks=tasks)
