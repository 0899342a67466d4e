"""Sweep bookkeeping: the lock, the index of runs, and skip / resume of runs already on disk.

A sweep directory (``hydra.sweep.dir``) holds one run directory per job plus

- ``sweep.lock``: held (``flock``) by the process that launches the sweep for as long as it runs,
  so a second sweep into the same directory is refused instead of two processes writing the same
  run directories. The kernel drops the lock when its holder dies, so a killed sweep never leaves
  a stale lock behind on a local file system; the file also names the holder for the message.
- ``sweep_index.json``: one entry per run, keyed by its overrides (minus the keys that do not
  change what a run computes), with ``status`` pending / running / done / failed, the error of a
  failed run, its directory, host and pid. Workers on other processes or machines update it
  under a second ``flock`` (``.sweep_index.lock``) with an atomic rewrite.

Re-invoking a sweep is always safe: a run whose ``results.json`` says ``done`` for the same
config is skipped, a run with progress on disk is resumed (``resume=true``), the rest start.
Launchers are Hydra plugins; this module only needs the launching process to call
:class:`SweepCallback` (configured in ``conf/config.yaml``) and each job to go through
:func:`run_job`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import ClToolkitError
from .store import RESULTS, atomic_write_json

INDEX = "sweep_index.json"
LOCK = "sweep.lock"
INDEX_LOCK = ".sweep_index.lock"
STATUSES = ("pending", "running", "done", "failed")

# File descriptors of the sweep locks this process holds, by sweep directory. Kept out of the
# callback object because Hydra pickles callbacks to send them to the workers.
_held: dict[str, int] = {}
# The sweep directory the launching process works on, for the summary printed at the end.
current_sweep: dict[str, Any] = {}


class SweepLockedError(ClToolkitError):
    """Another sweep is writing into the same sweep directory."""


class SweepAbort(BaseException):
    """Carries a :class:`ClToolkitError` out of a Hydra callback. Hydra turns an ``Exception``
    raised by a callback into a warning and goes on; a refused sweep must not go on."""

    def __init__(self, error: ClToolkitError):
        super().__init__(str(error))
        self.error = error


def acquire_lock(sweep_dir: str | os.PathLike) -> None:
    """Take the sweep lock or raise :class:`SweepLockedError` naming its holder."""
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise SweepLockedError(
            f"Another sweep is already writing into {sweep_dir} ({holder}). Two sweeps in one "
            "directory would overwrite each other's runs: wait for it to finish, or send this "
            "one elsewhere with output_root=... (or hydra.sweep.dir=...). Re-invoking the same "
            "sweep later is safe: finished runs are skipped and interrupted ones resumed."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n").encode())
    _held[str(sweep_dir)] = fd


def release_lock(sweep_dir: str | os.PathLike) -> None:
    fd = _held.pop(str(Path(sweep_dir).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _index_locked(sweep_dir: Path):
    """Serialise read-modify-write of the index between the workers of one sweep."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / INDEX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def read_index(sweep_dir: str | os.PathLike) -> dict:
    path = Path(sweep_dir) / INDEX
    if not path.exists():
        return {"format": 1, "runs": {}}
    return json.loads(path.read_text())


def update_index(sweep_dir: str | os.PathLike, edit: Callable[[dict], None]) -> dict:
    sweep_dir = Path(sweep_dir)
    with _index_locked(sweep_dir):
        index = read_index(sweep_dir)
        edit(index)
        atomic_write_json(sweep_dir / INDEX, index)
    return index


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_key(overrides, exclude_keys=()) -> str:
    """The identity of a run inside a sweep: its overrides, sorted, without the keys that do not
    change what it computes (the same ones Hydra leaves out of the run directory's name)."""
    kept = sorted(o for o in overrides if _key_of(o) not in set(exclude_keys))
    return " ".join(kept) or "(defaults)"


def _set(sweep_dir, key: str, **fields) -> None:
    def edit(index):
        entry = index["runs"].setdefault(key, {})
        entry.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"),
                     invocation=index.get("invocation"))
    update_index(sweep_dir, edit)


def start_sweep(sweep_dir: str | os.PathLike, planned: list[list[str]], exclude_keys) -> None:
    """Called once by the launching process (after taking the lock): a new invocation id, runs
    left ``running`` by a killed sweep become ``pending`` again (no sweep can be running them:
    we hold the lock), and the planned runs are listed as ``pending``."""
    invocation = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def edit(index):
        index["invocation"] = invocation
        for entry in index["runs"].values():
            if entry.get("status") == "running":
                entry.update(status="pending", note="interrupted (its process died); resumed "
                             "from its last finished task on the next invocation")
        for overrides in planned:
            entry = index["runs"].setdefault(job_key(overrides, exclude_keys),
                                             {"overrides": list(overrides)})
            if entry.get("status") != "done":
                entry["status"] = entry.get("status") or "pending"
                entry["invocation"] = invocation
    update_index(sweep_dir, edit)


def failures(sweep_dir: str | os.PathLike, invocation: str | None = None) -> list[tuple]:
    """(key, error) of the failed runs, of one invocation if given."""
    runs = read_index(sweep_dir)["runs"]
    return [(k, e.get("error", "")) for k, e in runs.items() if e.get("status") == "failed"
            and (invocation is None or e.get("invocation") == invocation)]


def saved_state(run_dir: Path, cfg: dict) -> str:
    """``done`` (finished with this config), ``partial`` (something to resume or to refuse with
    the runner's own message) or ``new``."""
    from .runner import semantic_config
    from .store import read_json

    results = run_dir / RESULTS
    if results.exists():
        try:
            saved = read_json(results)
        except ClToolkitError:
            return "partial"
        same = semantic_config(saved.get("config", {})) == semantic_config(cfg)
        if saved.get("status") == "done" and same:
            return "done"
        return "partial"
    return "partial" if (run_dir / "checkpoint.pt").exists() else "new"


def run_job(cfg: dict, run_dir: str | os.PathLike, sweep_dir: str | os.PathLike,
            overrides, exclude_keys, run_fn: Callable[..., dict], log=print) -> dict:
    """Run one job of a sweep with bookkeeping: skip it if done, resume it if interrupted, and
    record its outcome (the error of a failed run, the traceback of a bug in ``error.txt``)."""
    run_dir = Path(run_dir)
    key = job_key(overrides, exclude_keys)
    state = "new" if cfg.get("overwrite") else saved_state(run_dir, cfg)
    common = {"overrides": list(overrides), "dir": str(run_dir), "host": socket.gethostname(),
              "pid": os.getpid()}
    if state == "done":
        from .store import code_version, describe_code, read_json, same_code

        saved = read_json(run_dir / RESULTS)
        note = None
        if not same_code(saved.get("code"), code_version()):
            note = (f"reused results of other code: {describe_code(saved.get('code'))}; this is "
                    f"{describe_code(code_version())}")
            log(f"{key}: already done in {run_dir} by other code ({describe_code(saved.get('code'))};"
                f" this is {describe_code(code_version())}); reusing its results. Pass "
                "overwrite=true to rerun it with this code.")
        else:
            log(f"{key}: already done in {run_dir}, skipped")
        _set(sweep_dir, key, status="done", error=None, note=note, **common)
        return saved
    if state == "partial":
        cfg = {**cfg, "resume": True}
    _set(sweep_dir, key, status="running", error=None, note=None, **common)
    try:
        results = run_fn(cfg, run_dir)
    except Exception as exc:  # Ctrl-C leaves it "running": the next invocation resumes it
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, ClToolkitError):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            error += f" (traceback in {run_dir / 'error.txt'})"
        _set(sweep_dir, key, status="failed", error=error, **common)
        raise
    _set(sweep_dir, key, status="done", error=None, acc=results["metrics"].get("acc"), **common)
    return results


def _death_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's OOM killer sends it when memory runs out)" \
            if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with status {exitcode} without reporting a result"


def run_isolated(sweep_dir, overrides, exclude_keys, run_dir, fn: Callable[[], Any],
                 log=print) -> Any:
    """Run one job of a sweep in a forked child, so that the death of the process running it
    (SIGKILL, out of memory, a segfault in an extension) ends only this job: it is marked failed
    in the index with its cause, and the launcher's worker goes on with the next jobs. The
    child's ClToolkitError / exception travels back and is raised here.

    Forking is safe while this process has not initialised CUDA; if it has, the job runs
    in-process (no isolation) rather than poison the child's CUDA."""
    import multiprocessing

    try:
        import torch

        cuda_live = torch.cuda.is_initialized()
    except ImportError:
        cuda_live = False
    if cuda_live or "fork" not in multiprocessing.get_all_start_methods():
        return fn()
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        receive.close()
        try:
            outcome = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            outcome = ("error", exc)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            send.send(outcome)
        except Exception as exc:  # an exception that does not pickle
            send.send(("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}; "
                                             f"({exc})")))
        send.close()

    process = ctx.Process(target=child, daemon=False)
    process.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = None
    process.join()
    if outcome is None:
        key = job_key(overrides, exclude_keys)
        cause = (f"the process running it (pid {process.pid}) died: "
                 f"{_death_cause(process.exitcode)}. Its finished tasks are saved in {run_dir}; "
                 "the next invocation of the same sweep resumes it.")
        log(f"{key}: {cause}")
        _set(sweep_dir, key, status="failed", error=f"WorkerDied: {cause}",
             overrides=list(overrides), dir=str(run_dir))
        raise WorkerDied(cause)
    status, value = outcome
    if status == "error":
        raise value
    return value


class WorkerDied(ClToolkitError):
    """The process running a sweep job died without reporting (signal, OOM kill)."""


def _planned_jobs(config) -> list[list[str]]:
    """The override lists Hydra's basic sweeper will launch (empty for other sweepers, whose
    jobs appear in the index when they start)."""
    from omegaconf import OmegaConf

    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if not sweeper.endswith("BasicSweeper"):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + args
    parsed = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps the module importable
    _HydraCallback = object


class SweepCallback(_HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) run by the launching process:
    takes the sweep lock and lists the planned runs before any job starts, and lets go of the
    lock at the end. Holds no state itself because Hydra pickles it to the workers."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            acquire_lock(sweep_dir)
        except SweepLockedError as exc:
            raise SweepAbort(exc) from None
        exclude = list(config.hydra.job.config.override_dirname.exclude_keys)
        try:
            planned = _planned_jobs(config)
        except Exception:  # an unusual sweeper syntax: jobs are listed when they start
            planned = []
        start_sweep(sweep_dir, planned, exclude)
        current_sweep.update(dir=sweep_dir, invocation=read_index(sweep_dir)["invocation"])

    def on_multirun_end(self, config, **kwargs) -> None:
        release_lock(Path(str(config.hydra.sweep.dir)))
