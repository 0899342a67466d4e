"""Progress reporting: rich bars for people (tasks, epochs, and steps within an epoch with rate
and ETA), plain lines for CI logs (``quiet=true``, or whenever stdout is not a terminal): one per
task, plus one every ``every_s`` seconds inside a long task with step, rate and ETA.

Strategies report through ``RunContext.advance(what, total)``: ``"step"`` after every optimiser
step (``total`` = steps per epoch) and ``"epoch"`` after every epoch (``total`` = epochs).
"""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class QuietProgress:
    def __init__(self, label: str = "", stream=None, every_s: float = 30.0):
        self.label, self.out, self.every_s = label, stream or sys.stdout, every_s
        self.t0, self.total, self.epochs = time.perf_counter(), 0, None
        self.steps_id = None
        self.task_started(None)  # strategies may train in setup (merging: theta_0), before start

    def start(self, stream, strategy, start: int = 0):
        self.t0 = time.perf_counter()
        self.total = len(stream)
        self.epochs = getattr(strategy, "epochs", None)
        self.task_started(None)
        if start:
            print(f"{self.label}resuming after task {start - 1}", file=self.out, flush=True)

    def task_started(self, task):
        self.task, self.epoch, self.step_in_epoch, self.steps = task, 0, 0, None
        self.task_t0 = self.last_print = time.perf_counter()
        self.done_steps = 0

    def step(self, what: str, total: int | None = None):
        if what == "epoch":
            self.epoch += 1
            self.step_in_epoch = 0
            self.epochs = total or self.epochs
            return
        self.steps, self.step_in_epoch = total, self.step_in_epoch + 1
        self.done_steps += 1
        now = time.perf_counter()
        if now - self.last_print >= self.every_s:
            self.last_print = now
            name = self.task.name if self.task is not None else "setup"
            print(f"{self.label}  {name}: {self.position()}", file=self.out, flush=True)

    def rate_eta(self) -> tuple[float, float | None]:
        elapsed = max(time.perf_counter() - self.task_t0, 1e-9)
        rate = self.done_steps / elapsed
        if not self.steps or not self.epochs or not rate:
            return rate, None
        left = self.steps * self.epochs - self.done_steps
        return rate, max(left, 0) / rate

    def position(self) -> str:
        rate, eta = self.rate_eta()
        epochs = f"/{self.epochs}" if self.epochs else ""
        steps = f"/{self.steps}" if self.steps else ""
        return (f"epoch {self.epoch + 1}{epochs} step {self.step_in_epoch}{steps} "
                f"({rate:.1f} steps/s, ETA {_duration(eta) if eta is not None else '?'})")

    def task_done(self, task, row):
        seen = row[: task.index + 1]
        print(f"{self.label}task {task.index + 1}/{self.total} {task.name}: "
              f"acc(seen)={sum(seen) / len(seen):.4f} "
              f"[{time.perf_counter() - self.t0:.1f}s]", file=self.out, flush=True)

    def finish(self):
        pass


class RichProgress(QuietProgress):
    def start(self, stream, strategy, start: int = 0):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        super().start(stream, strategy, start)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.tasks_id = self.bar.add_task(f"{self.label}{strategy.name or 'strategy'} tasks",
                                          total=len(stream), completed=start, rate="")
        self.epochs_id = self.steps_id = None

    def task_started(self, task):
        super().task_started(task)
        if task is None or not hasattr(self, "bar"):
            return
        for bar_id in (self.epochs_id, self.steps_id):
            if bar_id is not None:
                self.bar.remove_task(bar_id)
        self.epochs_id = self.bar.add_task(f"  {task.name} epochs", total=self.epochs, rate="")
        self.steps_id = self.bar.add_task("    steps", total=None, rate="")

    def step(self, what: str, total: int | None = None):
        super().step(what, total)
        if self.steps_id is None:
            return
        if what == "epoch":
            self.bar.update(self.epochs_id, advance=1, total=total)
            self.bar.reset(self.steps_id, total=self.steps, rate="")
            return
        rate, _ = self.rate_eta()
        self.bar.update(self.steps_id, advance=1, total=total, rate=f"{rate:.1f} steps/s")

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
