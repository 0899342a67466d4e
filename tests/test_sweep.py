"""Sweeps through Hydra launchers (joblib, submitit_local, Ray) with the sweep index, skip of
finished runs, failed runs that do not stop the others, and the sweep report.

Every run is tiny (split_digits, a 32-unit MLP, one epoch, one thread); the results of sweep
runs are checked against the same config run in this process, an independent reference."""
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from cltk_subprocess import cltk

TINY = ["model.hidden=[32]", "strategy.epochs=1", "strategy.batch_size=64", "quiet=true",
        "threads=1"]


def the_sweep(root) -> Path:
    """The one sweep directory under ``<output_root>/multirun`` (named by the sweep's overrides)."""
    (sweep,) = (Path(root) / "multirun").iterdir()
    return sweep


def index_of(sweep_dir) -> dict:
    return json.loads((Path(sweep_dir) / "sweep_index.json").read_text())["runs"]


def reference(results_path, tmp_path):
    """The same config as a sweep run, run uninterrupted in this process."""
    from cl_toolkit.runner import run

    saved = json.loads(Path(results_path).read_text())
    cfg = {**saved["config"], "resume": False, "overwrite": False}
    return run(cfg, tmp_path / "reference" / Path(results_path).parent.name)


def same_results(a: dict, b: dict) -> bool:
    keep = ("matrix", "before", "metrics", "memory_bytes", "finished_tasks", "status")
    return all(a[k] == b[k] for k in keep)


def test_joblib_sweep_failed_run_index_skip_and_report(tmp_path):
    args = ["run", "-m", "seed=0,1", "benchmark=split_digits,split_cifar100", *TINY,
            f"output_root={tmp_path}"]
    env = {"CLTK_DATA": str(tmp_path / "no_data")}
    proc = cltk(*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path,
                check=False, env=env)
    # The two runs without their data fail; the two others finish; the exit code says so.
    assert proc.returncode == 1, proc.stderr
    assert "2 run(s) failed" in proc.stderr and "CIFAR-100 files" in proc.stderr
    sweep = the_sweep(tmp_path)
    runs = index_of(sweep)
    assert sorted(e["status"] for e in runs.values()) == ["done", "done", "failed", "failed"]
    for key, entry in runs.items():
        if "cifar" in key:
            assert "DatasetNotFoundError" in entry["error"] and "CIFAR-100" in entry["error"]
        else:
            assert entry["error"] is None and Path(entry["dir"]).is_dir()
    done = sorted(sweep.rglob("results.json"))
    assert len(done) == 2
    first = json.loads(done[0].read_text())
    assert same_results(first, reference(done[0], tmp_path))

    # Re-invoking the same sweep (another launcher is fine) skips the finished runs.
    mtimes = [p.stat().st_mtime_ns for p in done]
    again = cltk(*args, cwd=tmp_path, check=False, env=env)
    assert again.stdout.count(": already done in ") == 2, again.stdout
    assert [p.stat().st_mtime_ns for p in done] == mtimes
    assert again.returncode == 1

    from cl_toolkit.report import write_report

    write_report([str(sweep)])
    md = (sweep / "report.md").read_text()
    assert "| naive | 2 |" in md and "## split_digits · task-il" in md
    assert "## Sweep status" in md and "4 run(s): 2 done, 0 running, 0 pending, 2 failed" in md
    assert md.count("| failed | DatasetNotFoundError: CIFAR-100 files") == 2
    assert "Sweep status" in (sweep / "report.html").read_text()


def test_submitit_local_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cltk("run", "-m", "seed=0,1,2,3", *TINY, f"output_root={tmp_path}",
         "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=4",
         "hydra.launcher.cpus_per_task=1", cwd=tmp_path, timeout=300)
    runs = index_of(the_sweep(tmp_path))
    assert len(runs) == 4 and {e["status"] for e in runs.values()} == {"done"}
    pids = {e["pid"] for e in runs.values()}
    assert len(pids) == 4, "submitit_local runs every job in its own process"
    path = Path(runs["model.hidden=[32] seed=3 strategy.batch_size=64 strategy.epochs=1"]["dir"])
    assert same_results(json.loads((path / "results.json").read_text()),
                        reference(path / "results.json", tmp_path))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_ray_sweep_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    # Ray's sockets need a short path; the launcher starts and stops this instance itself.
    ray_tmp = tempfile.mkdtemp(prefix="cltkray", dir="/tmp")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    try:
        cltk("run", "-m", "seed=0,1,2,3", *TINY, f"output_root={tmp_path}",
             "hydra/launcher=cltk_ray", "hydra.launcher.num_cpus=2",
             "hydra.launcher.timeout_s=240", f"+hydra.launcher.init_kwargs._temp_dir={ray_tmp}",
             cwd=tmp_path, env=env, timeout=300)
        runs = index_of(the_sweep(tmp_path))
        assert len(runs) == 4 and {e["status"] for e in runs.values()} == {"done"}
        path = Path(next(iter(runs.values()))["dir"]) / "results.json"
        assert same_results(json.loads(path.read_text()), reference(path, tmp_path))
    finally:
        leftovers = _processes_mentioning(ray_tmp)
        for pid in leftovers:  # only processes of the Ray instance this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftovers, "the launcher must stop the local Ray instance it started"
