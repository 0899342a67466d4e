"""Stop a run inside a task, as a crash would, for the resume tests."""
from __future__ import annotations

import pytest

from cl_toolkit.runner import run
from cl_toolkit.strategy import Hooks


class Stop(Exception):
    pass


def run_until(cfg: dict, run_dir, task_index: int, at_step: int) -> None:
    """Run ``cfg`` in ``run_dir`` and stop it at training step ``at_step`` of task
    ``task_index``; the tasks finished before it stay on disk."""

    def stop(task, step, **_):
        if task.index == task_index and step == at_step:
            raise Stop

    with pytest.raises(Stop):
        run(cfg, run_dir, hooks=Hooks(after_batch=[stop]))
