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
import logging
import os
import re
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import ClToolkitError
from .runs import INDEX, read_index
from .store import (RESULTS, DirectoryLockedError, acquire_dir_lock, atomic_write_json,
                    release_dir_lock)

LOCK = "sweep.lock"
INDEX_LOCK = ".sweep_index.lock"
STATUSES = ("pending", "running", "done", "failed")

# The sweep directory the launching process works on, for the summary printed at the end.
current_sweep: dict[str, Any] = {}
# The run directory a single run (cltk run without -m) locked before Hydra wrote into it.
current_run: dict[str, Any] = {}


class SweepLockedError(DirectoryLockedError):
    """Another sweep is writing into the same sweep directory."""


class SweepAbort(BaseException):
    """Carries a :class:`ClToolkitError` out of a Hydra callback. Hydra turns an ``Exception``
    raised by a callback into a warning and goes on; a refused sweep must not go on."""

    def __init__(self, error: ClToolkitError):
        super().__init__(str(error))
        self.error = error


def _refuse_sweep(sweep_dir: Path, holder: str) -> SweepLockedError:
    return SweepLockedError(
        f"Another sweep is already writing into {sweep_dir} ({holder}). Two sweeps in one "
        "directory would overwrite each other's runs: wait for it to finish, or send this "
        "one elsewhere with output_root=... (or hydra.sweep.dir=...). Re-invoking the same "
        "sweep later is safe: finished runs are skipped and interrupted ones resumed."
    )


def acquire_lock(sweep_dir: str | os.PathLike) -> None:
    """Take the sweep lock or raise :class:`SweepLockedError` naming its holder (also when this
    process holds it: one process runs one sweep into a directory)."""
    acquire_dir_lock(sweep_dir, LOCK, _refuse_sweep)


def release_lock(sweep_dir: str | os.PathLike) -> None:
    release_dir_lock(sweep_dir, LOCK)


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
    parent = os.getpid()

    def child():
        _die_with_parent(parent)
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


def _die_with_parent(parent: int) -> None:
    """In a job's forked child (Linux): have the kernel SIGKILL it when the process that forked
    it dies, so a launcher's worker that dies (killed, out of memory) leaves no orphan training
    on, holding the run's lock and writing into the run its resubmission resumes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


# --- hydra/launcher=joblib: a worker that dies ends its own job, not the sweep ---------------
#
# hydra-joblib-launcher runs the jobs through joblib's loky executor. When one of its worker
# processes dies (the OOM killer, a crash in an extension, a job that kills its own worker),
# loky kills every other worker with their jobs, fails the whole batch with a
# TerminatedWorkerError, and Hydra aborts the sweep with that traceback: the pending runs never
# start. `launch_joblib` runs the same jobs through the same executor, but catches that error:
# runs that finished keep their results, runs that had not started are launched again, and the
# runs that were running (one of which may have killed its worker) run again one at a time,
# resuming from their last finished task: one whose worker dies again while it runs alone is
# marked failed (WorkerDied) in the index, the others finish. The sweep ends with the usual
# summary of the failed runs.


def _execute_indexed(idx, overrides, hydra_context, config, task_function, singleton_state):
    """A joblib worker's call: hydra-joblib-launcher's own job body, tagged with its index."""
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    return idx, execute_job(idx, overrides, hydra_context, config, task_function,
                            singleton_state)


def _exit_codes(error: BaseException) -> str:
    found = re.search(r"exit codes of the workers are (\{[^}]*\})", str(error))
    return f"exit codes {found.group(1)}" if found else "no exit code reported"


def launch_joblib(launcher, job_overrides, initial_job_idx: int) -> list:
    """``JoblibLauncher.launch`` of hydra-joblib-launcher, surviving the death of a worker (see
    above). Returns one ``JobReturn`` per job, in order; a job lost with its worker returns
    None (the index and the end-of-sweep summary hold its error)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, \
        setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    options = dict(launcher.joblib)
    options["backend"] = "loky"  # as hydra-joblib-launcher: threads cannot run Hydra jobs
    process_joblib_cfg(options)
    log = logging.getLogger("hydra")
    log.info("Joblib.Parallel(%s) is launching %d jobs",
             ",".join(f"{k}={v}" for k, v in options.items()), len(job_overrides))
    log.info("Launching jobs, sweep output dir : %s", sweep_dir)
    jobs = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
    for idx, overrides in jobs.items():
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    state = Singleton.get_state()
    exclude = list(config.hydra.job.config.override_dirname.exclude_keys)
    returns: dict[int, Any] = {}

    def args(i):
        return i, jobs[i], launcher.hydra_context, config, launcher.task_function, state

    def dispatch(idxs):
        """Run jobs ``idxs``; the TerminatedWorkerError that stopped them, or None."""
        calls = (delayed(_execute_indexed)(*args(i)) for i in idxs)
        try:
            try:
                outputs = Parallel(**options, return_as="generator_unordered")(calls)
            except ValueError:  # joblib < 1.4
                outputs = Parallel(**options, return_as="generator")(calls)
            for i, ret in outputs:
                returns[i] = ret
        except TerminatedWorkerError as exc:
            return exc
        return None

    def alone(i):
        """Run job ``i`` by itself in one loky worker (joblib would run ``n_jobs=1`` in this
        process, which the job's death would take down); as `dispatch`."""
        future = get_reusable_executor(max_workers=1).submit(_execute_indexed, *args(i))
        try:
            returns[i] = future.result()[1]
        except TerminatedWorkerError as exc:
            return exc
        return None

    def entry(i) -> dict:
        found = read_index(sweep_dir)["runs"].get(job_key(jobs[i], exclude), {})
        return found if found.get("invocation") == current_sweep.get("invocation") else {}

    def lost(i, cause: str) -> None:
        where = entry(i).get("dir", "its run directory")
        message = (f"WorkerDied: the joblib worker process running it died ({cause}): out of "
                   "memory (the kernel's OOM killer sends SIGKILL), a crash in an extension, or "
                   f"the job killed its worker. Its finished tasks are saved in {where}; the "
                   "next invocation of the same sweep resumes it.")
        _set(sweep_dir, job_key(jobs[i], exclude), status="failed", error=message,
             overrides=jobs[i])
        print(f"[job {i}] {message}", file=sys.stderr, flush=True)
        returns[i] = JobReturn(overrides=jobs[i], status=JobStatus.COMPLETED,
                               _return_value=None)

    queue, strikes = sorted(jobs), {i: 0 for i in jobs}
    while queue:
        broken = dispatch(queue)
        if broken is None:
            break
        missing = [i for i in queue if i not in returns]
        running = [i for i in missing if entry(i).get("status") == "running"]
        codes = _exit_codes(broken)
        print(f"A joblib worker died ({codes}); joblib stopped the jobs in flight. The sweep "
              f"goes on: {len(running)} job(s) that were running "
              f"({', '.join(f'#{i}' for i in running) or 'none'}) run again one at a time (a job "
              "whose worker dies while it runs alone is marked failed), then the "
              f"{len(missing) - len(running)} job(s) not finished or started.",
              file=sys.stderr, flush=True)
        for i in running:
            again = alone(i)
            if again is not None:
                lost(i, f"{_exit_codes(again)}, twice: the second time it ran alone")
        if not running:  # a worker died before its job started: again, but not forever
            for i in missing:
                strikes[i] += 1
                if strikes[i] >= 3:
                    lost(i, f"{codes}, three times before the job started")
        queue = [i for i in missing if i not in returns]
    return [returns[i] for i in sorted(jobs)]


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


def release_run() -> None:
    """Let go of the lock `SweepCallback.on_run_start` took (also after a run that ended in
    SystemExit, which skips Hydra's ``on_run_end``)."""
    from .store import unlock_run_dir

    run_dir = current_run.pop("dir", None)
    if run_dir is not None:
        unlock_run_dir(run_dir)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps the module importable
    _HydraCallback = object


class SweepCallback(_HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) run by the launching process:
    takes the sweep lock and lists the planned runs before any job starts, and lets go of the
    lock at the end; for a single run, takes the run directory's lock (``run.lock``, see
    `cl_toolkit.store.lock_run_dir`) before Hydra writes its ``.hydra`` files there, so a second
    start of the same run is refused before it touches anything. Holds no state itself because
    Hydra pickles it to the workers."""

    def on_run_start(self, config, **kwargs) -> None:
        from .store import lock_run_dir

        run_dir = Path(str(config.hydra.run.dir)).resolve()
        try:
            lock_run_dir(run_dir)
        except DirectoryLockedError as exc:
            raise SweepAbort(exc) from None
        except OSError:  # an unwritable directory: Hydra and the runner say so themselves
            return
        current_run["dir"] = run_dir

    def on_run_end(self, config, **kwargs) -> None:
        release_run()

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
