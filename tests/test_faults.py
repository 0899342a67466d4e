"""Faults: a worker killed with SIGKILL in the middle of a task, a disk that fills up during a
write, and two sweeps into one directory. After each, the files on disk must be whole and a
re-invocation must give the results of an uninterrupted run (computed here, in this process)."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cl_toolkit import store
from cl_toolkit.runner import run
from cl_toolkit.store import StoreWriteError
from cl_toolkit.sweep import SweepLockedError, acquire_lock, release_lock

KEEP = ("matrix", "before", "metrics", "memory_bytes", "finished_tasks", "status")


def cltk_cmd(*args):
    return [sys.executable, "-m", "cl_toolkit.cli", *args]


def uninterrupted(results_path, where):
    saved = json.loads(Path(results_path).read_text())
    return run({**saved["config"], "resume": False, "overwrite": False}, where)


def test_sigkill_worker_mid_task_then_reinvoke_matches_uninterrupted(tmp_path):
    """Killing the process of one run of a 3-run joblib sweep (2 workers): the others go on
    and finish in the same invocation (the third starting after the kill), the dead one is
    marked failed with its cause, exit code and report say so; re-invoking resumes it."""
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "seed=0,1,2", "strategy=replay", "strategy.epochs=3",
            "strategy.buffer_size=100", "model.hidden=[32]", "quiet=true", "threads=1",
            f"output_root={tmp_path}", f"hydra.sweep.dir={sweep}"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cltk_cmd(*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    killed, deadline = None, time.time() + 200
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            for results in sweep.glob("*/results.json"):
                try:
                    done = json.loads(results.read_text())["finished_tasks"]
                    entries = json.loads((sweep / "sweep_index.json").read_text())["runs"]
                except (OSError, ValueError):
                    continue
                entry = next((e for e in entries.values()
                              if e.get("dir") == str(results.parent.resolve())), None)
                if 1 <= done < 5 and entry and entry["status"] == "running":
                    os.kill(entry["pid"], signal.SIGKILL)  # the joblib worker running it
                    killed = (results, done)
                    break
            time.sleep(0.005)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert killed is not None, first_log
    assert proc.returncode == 1, first_log
    assert json.loads(killed[0].read_text())["finished_tasks"] < 5
    index = json.loads((sweep / "sweep_index.json").read_text())["runs"]
    dead = [e for e in index.values() if e["dir"] == str(killed[0].parent.resolve())]
    assert dead[0]["status"] == "failed" and "killed by SIGKILL" in dead[0]["error"]
    assert sorted(e["status"] for e in index.values()) == ["done", "done", "failed"]
    assert "1 run(s) failed" in first_log and "killed by SIGKILL" in first_log
    from cl_toolkit.report import write_report

    write_report([str(sweep)])
    assert "| failed | WorkerDied: the process running it" in (sweep / "report.md").read_text()

    second = subprocess.run(cltk_cmd(*args), cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after task" in second.stdout
    index = json.loads((sweep / "sweep_index.json").read_text())["runs"]
    assert [e["status"] for e in index.values()] == ["done", "done", "done"]
    for i, results in enumerate(sorted(sweep.glob("*/results.json"))):
        resumed = json.loads(results.read_text())
        reference = uninterrupted(results, tmp_path / f"reference{i}")
        assert {k: resumed[k] for k in KEEP} == {k: reference[k] for k in KEEP}


def _failing_fdopen(real_fdopen, target: str, fail_at: int, calls: list):
    """``os.fdopen`` whose file for the ``fail_at``-th temporary of ``target`` writes half of
    the data and then fails like a full disk."""

    class HalfThenENOSPC:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target}."):
            calls.append(fd)
            if len(calls) == fail_at:
                return HalfThenENOSPC(f)
        return f

    return fdopen


@pytest.mark.parametrize("target", ["results.json", "checkpoint.pt"])
def test_disk_full_never_leaves_half_written_files(tmp_path, monkeypatch, target):
    cfg = {"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il"},
           "model": {"name": "mlp", "hidden": [32]}, "threads": 1,
           "strategy": {"name": "naive", "epochs": 1, "batch_size": 64}}
    reference = run(cfg, tmp_path / "reference")
    out = tmp_path / "run"
    calls, seen, stop = [], [], threading.Event()

    def reader():  # what any other process could see while the run writes
        while not stop.is_set():
            try:
                seen.append(json.loads((out / "results.json").read_text())["finished_tasks"])
            except FileNotFoundError:
                pass
            time.sleep(0.003)

    monkeypatch.setattr(store.os, "fdopen", _failing_fdopen(os.fdopen, target, 3, calls))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with pytest.raises(StoreWriteError, match="No space left on device.*previous version "
                                                  "is intact.*resume=true"):
            run(cfg, out)
    finally:
        stop.set()
        thread.join()
    monkeypatch.undo()
    assert seen and set(seen) <= {1, 2}  # every read parsed: never half a file
    assert not list(out.glob(".*.tmp")), "the half-written temporary must be removed"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["finished_tasks"] == 2 and on_disk["matrix"] == reference["matrix"][:2]

    resumed = run({**cfg, "resume": True}, out)
    assert {k: resumed[k] for k in KEEP} == {k: reference[k] for k in KEEP}


def test_two_sweeps_in_one_directory_are_refused(tmp_path):
    sweep = tmp_path / "sweep"
    acquire_lock(sweep)  # this process plays the sweep that is already running
    try:
        with pytest.raises(SweepLockedError, match=f"pid {os.getpid()}"):
            acquire_lock(sweep)
        proc = subprocess.run(cltk_cmd("run", "-m", "seed=0,1", "quiet=true",
                                       f"output_root={tmp_path}", f"hydra.sweep.dir={sweep}"),
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        release_lock(sweep)
    assert proc.returncode != 0
    assert "Another sweep is already writing into" in proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "output_root=" in proc.stderr
    assert not [p for p in sweep.iterdir() if p.is_dir()], "the refused sweep wrote runs"

    # A sweep killed with SIGKILL holds no lock: the kernel drops it with the process.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cl_toolkit.sweep import acquire_lock; "
        f"acquire_lock({str(sweep)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLockedError):
            acquire_lock(sweep)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    acquire_lock(sweep)
    release_lock(sweep)
