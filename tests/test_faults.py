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


def test_second_start_of_the_same_run_is_refused_and_a_killed_run_holds_no_lock(tmp_path):
    """`cltk run` twice at once into one directory: the second exits 2 at once, naming the
    directory and the first's pid, before Hydra writes anything there. After the first is
    killed (SIGKILL), the lock is free: it went with its holder. The directory is named as cltk
    names them, which hydra.run.dir takes as typed."""
    from cl_toolkit.store import lock_run_dir, unlock_run_dir

    run_dir = tmp_path / "runs" / "split_digits" / "naive" / "seed=1,strategy.epochs=5000"
    common = ["model.hidden=[32]", "threads=1", "quiet=true", f"hydra.run.dir={run_dir}"]
    args = ["run", "strategy.epochs=5000", *common]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cltk_cmd(*args), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = run_dir / "run.lock"
            if lock.exists() and lock.read_text().startswith(f"pid {first.pid} ") and \
                    (run_dir / ".hydra" / "overrides.yaml").exists():
                break
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        hydra_files = {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()}
        started = time.time()
        second = subprocess.run(cltk_cmd(*args), cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        message = second.stderr.strip()
        assert message.startswith(f"error: Another run is already writing into {run_dir} "
                                  f"(pid {first.pid} on "), message
        assert "resume=true" in message and "output_root=" in message
        assert "Traceback" not in message and len(message.splitlines()) == 1
        assert {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()} == hydra_files
        assert time.time() - started < 60
    finally:
        first.kill()
        first.wait(timeout=30)
    assert lock_run_dir(run_dir)
    unlock_run_dir(run_dir)


KILLER = '''
import os, signal, time
from cl_toolkit.strategies.naive import Naive

class WorkerKiller(Naive):
    """Test only: the run with seed 1 kills the process that runs it (the launcher's worker,
    parent of the job's own process) at the start of its second task, as the OOM killer would."""

    def learn(self, task):
        if task.index == 1 and self.ctx.seed == 1:
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # the job dies with its worker
        super().learn(task)
'''


def test_dead_joblib_worker_fails_its_job_only_and_the_sweep_ends_with_a_summary(tmp_path):
    """A job that kills its joblib worker process: joblib's TerminatedWorkerError used to abort
    the sweep with a traceback, the pending runs never started. Now the other runs finish, the
    job is marked failed (WorkerDied) and the sweep ends with the list of failed runs."""
    site = tmp_path / "site"
    info = site / "cltk_killer-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "cltk_killer.py").write_text(KILLER)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cltk-killer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[cl_toolkit.strategies]\nworker_killer = cltk_killer:WorkerKiller\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    sweep = tmp_path / "sweep"
    proc = subprocess.run(cltk_cmd("run", "-m", "strategy=worker_killer", "seed=0,1,2",
                                   "smoke=true", "threads=1", "quiet=true",
                                   f"output_root={tmp_path}", f"hydra.sweep.dir={sweep}",
                                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "TerminatedWorkerError" not in out and "Traceback" not in out, out
    index = json.loads((sweep / "sweep_index.json").read_text())["runs"]
    status = {key: entry["status"] for key, entry in index.items()}
    assert status == {"seed=0 smoke=True strategy=worker_killer": "done",
                      "seed=1 smoke=True strategy=worker_killer": "failed",
                      "seed=2 smoke=True strategy=worker_killer": "done"}, out
    error = index["seed=1 smoke=True strategy=worker_killer"]["error"]
    assert error.startswith("WorkerDied: the joblib worker process running it died") and \
        "SIGKILL" in error and "resumes it" in error
    assert "1 run(s) failed" in proc.stderr and "seed=1 smoke=True strategy=worker_killer: " \
        "WorkerDied" in proc.stderr
    for seed in (0, 2):
        done = json.loads(Path(index[f"seed={seed} smoke=True strategy=worker_killer"]["dir"],
                               "results.json").read_text())
        assert done["status"] == "done"
