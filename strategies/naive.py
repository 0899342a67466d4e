"""Naive fine-tuning: train on each task in turn with nothing to prevent forgetting. The lower
bound every continual method is compared with."""
from __future__ import annotations

from cl_toolkit.strategy import SupervisedStrategy


class Naive(SupervisedStrategy):
    name = "naive"
