"""Issue 16 evidence: does a task-routed MoM forget less than the naive baselines at equal
parameters? Runs every (stream, row, seed) that has no results yet with ``cltk run`` and prints
one markdown table per stream (mean +- std over seeds).

    python perf/mom_evidence.py --out /tmp/i16_runs/evidence --run \
        --streams digits_til digits_cil pfmnist sfmnist --seeds 0 1 2

Every row uses the recipe of its experiment file (conf/experiment/mom_*.yaml: AdamW 1e-3,
batch 32). "MLP replay, equal memory" gets a buffer of as many samples as the bytes that the
routed MoM spends on its task-owned memories (``model.memory_bytes()``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

STREAMS = {
    "digits_til": ["experiment=mom_split_digits"],
    "digits_cil": ["experiment=mom_split_digits", "benchmark.scenario=class-il"],
    "pfmnist": ["experiment=mom_permuted_fashion_mnist"],
    "sfmnist": ["experiment=mom_split_fashion_mnist"],
}
MLP = ["model=mlp", "model.hidden=[WIDTH,WIDTH]"]
# 166k / 169k parameters, like the presets
WIDTH = {"digits_til": 376, "digits_cil": 376, "pfmnist": 176, "sfmnist": 176}
ROUTED = ["model=mom", "model.task_routing=true", "model.memories_per_task=1", "model.topk=1"]
ROWS = {
    "MLP naive": MLP,
    "transformer naive": ["model=transformer"],
    "gdn naive": ["model=gdn"],
    "MoM shared naive": ["model=mom"],
    "MoM routed": ROUTED,
    "MoM routed + shared memory": ROUTED + ["model.shared_memory=true"],
    "MoM routed + freeze_shared": ROUTED + ["model.freeze_shared=true"],
    "MoM routed + replay 200": ROUTED + ["strategy=replay", "strategy.buffer_size=200"],
    "MoM shared + replay 200": ["model=mom", "strategy=replay", "strategy.buffer_size=200"],
    "MLP replay 200": MLP + ["strategy=replay", "strategy.buffer_size=200"],
    "MLP replay, equal memory": MLP + ["strategy=replay", "strategy.buffer_size=EQUAL"],
}
ROUTED_ROWS = [r for r, o in ROWS.items() if "model.task_routing=true" in o]


def equal_memory_buffer(stream_overrides: list[str]) -> int:
    """Samples whose bytes (x float32, y and t int64) match the routed MoM's memory_bytes()."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cl_toolkit.runner import build_model, build_stream

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", stream_overrides + ROUTED + [
            "benchmark.scenario=task-il"]), resolve=True)  # the routed MoM's bytes, any scenario
    stream = build_stream(cfg)
    model = build_model(cfg, stream)
    sample = math.prod(stream.input_shape) * 4 + 16
    return math.ceil(model.memory_bytes() / sample)


def run_dir(out: Path, stream: str, row: str, seed: int) -> Path:
    return out / stream / row.replace(" ", "_").replace(",", "").replace("+", "plus") / \
        f"seed{seed}"


def command(stream: str, row: str, seed: int, out: Path, buffer: int) -> list[str]:
    overrides = [o.replace("EQUAL", str(buffer)).replace("WIDTH", str(WIDTH[stream]))
                 for o in STREAMS[stream] + ROWS[row]]
    return ["nice", "-n", "10", sys.executable, "-m", "cl_toolkit.cli", "run", *overrides,
            f"seed={seed}", "threads=1", "quiet=true", "overwrite=true",
            f"hydra.run.dir={run_dir(out, stream, row, seed)}"]


def table(out: Path, stream: str, seeds: list[int]) -> str:
    lines = ["| row | ACC | BWT | forgetting | learning acc | params | memory (kB) | "
             "train s / task | seeds |", "|---" * 9 + "|"]
    for row in ROWS:
        runs = []
        for seed in seeds:
            path = run_dir(out, stream, row, seed) / "results.json"
            if path.exists():
                r = json.loads(path.read_text())
                if r.get("status") == "done":
                    runs.append(r)
        if not runs:
            why = ("refused: no task id at test time" if stream == "digits_cil"
                   and row in ROUTED_ROWS else "not run")
            lines.append(f"| {row} | {why} |" + " |" * 7)
            continue

        def stat(get, scale=1.0, digits=3):
            vals = [get(r) * scale for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.{digits}f} +- {sd:.{digits}f}"

        m = lambda k: (lambda r: r["metrics"][k])  # noqa: E731
        lines.append(
            f"| {row} | {stat(m('acc'))} | {stat(m('bwt'))} | {stat(m('forgetting'))} | "
            f"{stat(m('learning_acc'))} | {runs[0]['model_params']} | "
            f"{runs[0]['memory_bytes'][-1] / 1000:.0f} | "
            f"{stat(lambda r: statistics.mean(r['timings']['train_s']), digits=1)} | "
            f"{len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/i16_runs/evidence"))
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--run", action="store_true", help="run what has no results yet")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stream in args.streams:
        if args.run:
            buffer = equal_memory_buffer(STREAMS[stream])
            for seed in args.seeds:
                for row in args.rows:
                    if stream == "digits_cil" and row in ROUTED_ROWS:
                        continue
                    if (run_dir(args.out, stream, row, seed) / "results.json").exists():
                        continue
                    cmd = command(stream, row, seed, args.out, buffer)
                    print(" ".join(cmd[4:]), flush=True)
                    subprocess.run(cmd, env=env, check=False)
        print(f"\n### {stream}\n\n{table(args.out, stream, args.seeds)}", flush=True)


if __name__ == "__main__":
    main()
