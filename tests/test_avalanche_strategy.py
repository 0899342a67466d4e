"""The `avalanche` strategy adapter: an Avalanche strategy trains on our stream, our evaluator
scores it, and resume reproduces the uninterrupted run."""
import pytest

from cl_toolkit.errors import ConfigError
from cl_toolkit.runner import run
from cl_toolkit.strategy import Hooks

pytest.importorskip("avalanche")


def cfg(cls="Replay", kwargs=None, **extra):
    return {"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il",
                                     "n_tasks": 2},
            "model": {"name": "mlp", "hidden": [32]},
            "strategy": {"name": "avalanche", "cls": cls, "kwargs": kwargs or {"mem_size": 60},
                         "epochs": 3, "lr": 0.1}, **extra}


def test_avalanche_replay_learns_and_resumes_identically(tmp_path):
    full = run(cfg(), tmp_path / "full")
    assert full["status"] == "done"
    # Replay keeps part of task 0 after learning task 1 (naive class-il would drop to ~0).
    assert full["matrix"][1][0] > 0.2 and full["matrix"][1][1] > 0.5

    class Stop(Exception):
        pass

    def stop(strategy, task):
        if task.index == 1:
            raise Stop

    with pytest.raises(Stop):
        run(cfg(), tmp_path / "cut", hooks=Hooks(before_task=[stop]))
    resumed = run(cfg(resume=True), tmp_path / "cut")
    assert resumed["matrix"] == full["matrix"]


def test_unknown_avalanche_strategy_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="no strategy 'Replayy'.*Replay"):
        run(cfg(cls="Replayy"), tmp_path)
