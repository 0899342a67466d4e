"""Launcher overhead of a sweep: 8 tiny runs through ``cltk run -m`` (Hydra's basic launcher in
one process, and the joblib launcher on 2 workers) versus the same runs one after the other in
one process, where only the runs themselves are timed.

    python -m perf.sweep_overhead [--runs 8] [--workers 2]

Overhead per run = (worker-seconds the sweep used - start-up of each process (imports and the
first run's one-off warm-up) - the runs' own compute) / runs, where worker-seconds = workers x (sweep wall - the launching
process's start-up). Start-up + imports is measured separately (a process importing torch,
Hydra and cl_toolkit) and excluded, as the target is about the launcher: < 1 s per run.
On a shared machine the numbers move with the load; the script prints the load average.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["model.hidden=[32]", "strategy.epochs=1", "quiet=true", "threads=1"]


def _wall(cmd: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def in_process(runs: int, out: Path) -> tuple[float, float]:
    """Seconds spent in ``runner.run`` for the sweep's configs, composed as ``cltk`` does, and
    the first run's warm-up (lazy imports and first-call set-up of torch, paid once per
    process: the first run takes ~5 s here, the next ones ~0.1 s)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cl_toolkit.runner import run

    times = []
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        for seed in range(runs):
            cfg = compose("config", overrides=[f"seed={seed}", *TINY])
            plain = OmegaConf.to_container(cfg, resolve=True)
            t0 = time.perf_counter()
            run(plain, out / f"seed{seed}")
            times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])
    warmup = times[0] - rest[len(rest) // 2] if rest else 0.0
    return sum(times) - warmup, warmup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--inner", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:  # child process: print the compute seconds of the runs
        print(*in_process(args.runs, Path(args.inner)))
        return
    py = sys.executable
    seeds = "seed=" + ",".join(map(str, range(args.runs)))
    with tempfile.TemporaryDirectory() as tmp:
        startup = min(_wall([py, "-c", "import torch, hydra, sklearn, cl_toolkit.cli, "
                             "cl_toolkit.runner, cl_toolkit.benchmarks"], tmp) for _ in range(2))
        out = subprocess.run([py, "-m", "perf.sweep_overhead", "--runs",
                              str(args.runs), "--inner", f"{tmp}/inproc"], capture_output=True,
                             text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
        compute, warmup = map(float, out.stdout.strip().splitlines()[-1].split())
        startup += warmup  # per process, like the imports
        cltk = [py, "-m", "cl_toolkit.cli", "run", "-m", seeds, *TINY]
        basic = _wall([*cltk, f"output_root={tmp}/basic"], tmp)
        joblib = _wall([*cltk, f"output_root={tmp}/joblib", "hydra/launcher=joblib",
                        f"hydra.launcher.n_jobs={args.workers}"], tmp)

    def overhead(wall: float, workers: int) -> float:
        worker_seconds = workers * (wall - startup)
        return (worker_seconds - workers * startup - compute) / args.runs

    rows = [("in one process, sequential (runs only)", compute, 1, None),
            ("cltk -m, basic launcher (1 process)", basic, 1, (basic - startup - compute)
             / args.runs),
            (f"cltk -m, joblib launcher ({args.workers} workers)", joblib, args.workers,
             overhead(joblib, args.workers))]
    print(f"{args.runs} runs; start-up of one process (imports {startup - warmup:.2f} s + "
          f"first-run warm-up {warmup:.2f} s): {startup:.2f} s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"| {'mode':<42} | wall (s) | workers | overhead / run (s) |")
    print(f"|{'-' * 44}|----------|---------|--------------------|")
    for name, wall, workers, over in rows:
        cell = "-" if over is None else f"{over:.2f}"
        print(f"| {name:<42} | {wall:8.2f} | {workers:7d} | {cell:>18} |")
    worst = max(r[3] for r in rows if r[3] is not None)
    print(f"target < 1 s launcher overhead per run: {'met' if worst < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
