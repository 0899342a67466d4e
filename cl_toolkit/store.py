"""One directory per run: ``results.json`` (human-readable, rewritten after every task) and
``checkpoint.pt`` (everything needed to continue after the last finished task).

Both are written atomically (temporary file in the same directory, flush, fsync, rename, fsync
of the directory), so a crash or a kill leaves either the previous version or the new one, never
half a file. The checkpoint is the source of truth on resume; it also carries the accuracy rows
so the two files cannot disagree about which task finished last.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ClToolkitError, ResumeError

RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
TMP_SUFFIX = ".tmp"
RUN_LOCK = "run.lock"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class StoreWriteError(ClToolkitError, OSError):
    """A run file could not be written (disk full, quota, permissions); the previous version of
    the file is intact because the new one never replaced it."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never part
    of one: a failed write (ENOSPC, EDQUOT, EIO) removes the temporary file and raises
    :class:`StoreWriteError` with the previous ``path`` left untouched."""
    try:
        _atomic_write(Path(path), data)
    except OSError as exc:
        if isinstance(exc, ClToolkitError):
            raise
        raise StoreWriteError(
            f"Could not write {path} ({exc.strerror or exc}); its previous version is intact. "
            "Free disk space or quota (or choose another output_root), then rerun with "
            "resume=true to continue from the last finished task."
        ) from exc


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files follow the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ResumeError(
            f"{path} is corrupt or truncated ({exc}). cl_toolkit writes it atomically, so it was "
            "damaged outside a run; delete it (it is rebuilt from checkpoint.pt on resume) or "
            "delete the whole run directory to start over."
        ) from exc


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (``.NAME.XXXX.tmp``): a
    new start owns the directory, so no writer can still be using them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """What produced a result: the git commit of the cl_toolkit source tree with a dirty flag
    (and a hash of the uncommitted diff, so two dirty trees can be told apart), the versions of
    the packages that decide the numbers, Python, host and date."""
    import hashlib
    from importlib import metadata

    src = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    diff = git("diff", "HEAD", "--", ".") if commit else None
    packages = {}
    for dist in ("cl_toolkit", "torch", "numpy", "hydra-core", "omegaconf", "triton",
                 "avalanche-lib", "open_clip_torch", "torchvision"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(diff) if commit else None,
        "git_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        "packages": packages, "python": platform.python_version(),
        "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def same_code(a: dict | None, b: dict | None) -> bool:
    """Whether two `code_version` records describe the same code (commit, diff, packages)."""
    if not a or not b:
        return False
    keys = ("git_commit", "git_dirty", "git_diff_sha1", "packages")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_code(v: dict | None) -> str:
    if not v:
        return "unknown code (no version recorded)"
    commit = (v.get("git_commit") or "no git")[:10]
    dirty = f"+dirty {v.get('git_diff_sha1')}" if v.get("git_dirty") else ""
    return f"commit {commit}{dirty}, torch {v.get('packages', {}).get('torch')}"


class RunStore:
    """The files of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.results_path = self.root / RESULTS
        self.checkpoint_path = self.root / CHECKPOINT

    def has_progress(self) -> bool:
        return self.checkpoint_path.exists() or self.results_path.exists()

    def commit(self, results: dict, checkpoint: dict) -> None:
        """Checkpoint first, then results: results.json never names a task that the checkpoint
        does not hold."""
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())
        atomic_write_json(self.results_path, results)

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results_path, results)

    def load_results(self) -> dict:
        return read_json(self.results_path)

    def load_checkpoint(self) -> dict:
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ResumeError(
                f"Checkpoint {self.checkpoint_path} is corrupt or truncated "
                f"({type(exc).__name__}: {exc}). Delete it and results.json to start this run "
                "over (resume=false), or restore the file from a backup."
            ) from exc


class DirectoryLockedError(ClToolkitError):
    """Another process is writing into a run or sweep directory (it holds the directory's lock).
    Exit code 2: nothing ran, and the message says how to proceed."""

    exit_code = 2


class RunLockedError(DirectoryLockedError):
    """Another run is writing into the same run directory."""


# The directory locks this process holds: lock file -> (file descriptor, pid of the holder). The
# pid tells a forked child (which inherits the dict, but not the right to the lock) from its
# parent.
_locks: dict[str, tuple[int, int]] = {}


def holder_line() -> str:
    """Who holds a lock, as written into the lock file and quoted by the refusal."""
    return (f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")


def acquire_dir_lock(directory: str | os.PathLike, name: str,
                     refuse: Callable[[Path, str], ClToolkitError],
                     reentrant: bool = False) -> bool:
    """Take the exclusive ``flock`` on ``directory/name`` (made if missing) without waiting, or
    raise ``refuse(directory, holder)`` where holder is what the holding process wrote into the
    file. The kernel drops an ``flock`` when its holder dies, so a killed process never leaves a
    stale lock on a local file system. ``reentrant``: a lock this process already holds is
    taken again for free; returns whether this call took it (and so must release it)."""
    directory = Path(directory).resolve()
    path = directory / name
    held = _locks.get(str(path))
    if held is not None and held[1] == os.getpid():
        if reentrant:
            return False
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise refuse(directory, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, (holder_line() + "\n").encode())
    _locks[str(path)] = (fd, os.getpid())
    return True


def release_dir_lock(directory: str | os.PathLike, name: str) -> None:
    """Let go of a lock this process took with `acquire_dir_lock` (the file stays, emptied)."""
    path = str(Path(directory).resolve() / name)
    held = _locks.get(path)
    if held is None or held[1] != os.getpid():
        return
    del _locks[path]
    fd = held[0]
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _refuse_run(directory: Path, holder: str) -> RunLockedError:
    return RunLockedError(
        f"Another run is already writing into {directory} ({holder}). Two runs in one "
        "directory would train twice into the same files: wait for that one to finish (then "
        "rerunning the command with resume=true finds its results), stop it and rerun with "
        "resume=true to continue it, or send this run elsewhere with output_root=... (or "
        "hydra.run.dir=...). A run that was killed holds no lock: the kernel drops it.")


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take the lock of a run directory (``run.lock``) or raise :class:`RunLockedError` naming
    its holder. Re-entrant within one process; returns whether this call took it."""
    return acquire_dir_lock(run_dir, RUN_LOCK, _refuse_run, reentrant=True)


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    release_dir_lock(run_dir, RUN_LOCK)


@contextlib.contextmanager
def run_dir_locked(run_dir: str | os.PathLike):
    """Hold the run directory's lock for the block (unless this process holds it already)."""
    taken = lock_run_dir(run_dir)
    try:
        yield
    finally:
        if taken:
            unlock_run_dir(run_dir)
