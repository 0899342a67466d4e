"""Progress reporting: rich bars (tasks and epochs, with ETA) for people, one plain line per
task for CI logs (``quiet=true``, or whenever stdout is not a terminal)."""
from __future__ import annotations

import sys
import time


class QuietProgress:
    def __init__(self, label: str = "", stream=None):
        self.label, self.out = label, stream or sys.stdout

    def start(self, stream, strategy, start: int = 0):
        self.t0 = time.perf_counter()
        self.total = len(stream)
        if start:
            print(f"{self.label}resuming after task {start - 1}", file=self.out, flush=True)

    def task_started(self, task):
        pass

    def step(self, what: str, total: int | None = None):
        pass

    def task_done(self, task, row):
        seen = row[: task.index + 1]
        print(f"{self.label}task {task.index + 1}/{self.total} {task.name}: "
              f"acc(seen)={sum(seen) / len(seen):.4f} "
              f"[{time.perf_counter() - self.t0:.1f}s]", file=self.out, flush=True)

    def finish(self):
        pass


class RichProgress(QuietProgress):
    def start(self, stream, strategy, start: int = 0):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        super().start(stream, strategy, start)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.tasks_id = self.bar.add_task(f"{self.label}{strategy.name or 'strategy'} tasks",
                                          total=len(stream), completed=start)
        self.epochs_id = None

    def task_started(self, task):
        if self.epochs_id is not None:
            self.bar.remove_task(self.epochs_id)
        self.epochs_id = self.bar.add_task(f"  {task.name} epochs", total=None)

    def step(self, what: str, total: int | None = None):
        if self.epochs_id is not None:
            self.bar.update(self.epochs_id, advance=1, total=total)

    def task_done(self, task, row):
        self.bar.advance(self.tasks_id)
        seen = row[: task.index + 1]
        self.bar.console.print(f"{task.name}: acc(seen)={sum(seen) / len(seen):.4f}")

    def finish(self):
        self.bar.stop()


def make_progress(quiet: bool, label: str = ""):
    if quiet or not sys.stdout.isatty():
        return QuietProgress(label)
    return RichProgress(label)
