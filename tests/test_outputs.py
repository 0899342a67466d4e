"""What a run leaves behind and says: files with the user's umask, stale temporaries removed,
the code version recorded (against git itself), a rerun that names other code, the CSV /
TensorBoard / W&B sinks with per-step losses, progress inside an epoch and the closing line."""
import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cl_toolkit import store, sweep
from cl_toolkit.runner import run

ROOT = Path(__file__).resolve().parents[1]


def cfg(**top):
    return {"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il",
                                     "n_tasks": 2},
            "model": {"name": "mlp", "hidden": [16]},
            "strategy": {"name": "naive", "epochs": 2, "batch_size": 64, "lr": 0.1}, **top}


def test_files_follow_the_umask_and_stale_temporaries_go(tmp_path):
    stale = tmp_path / ".results.json.abc123.tmp"
    tmp_path.mkdir(exist_ok=True)
    stale.write_text("half a file left by a kill")
    old = os.umask(0o027)
    try:
        run(cfg(), tmp_path)
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in ("results.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_results_record_the_code_version():
    record = store.code_version()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--", "."],
                                capture_output=True, text=True).stdout)
    assert record["git_commit"] == head and record["git_dirty"] == dirty
    assert record["packages"]["torch"] and record["host"] and record["date"]


def test_a_rerun_says_when_it_reuses_results_of_other_code(tmp_path):
    run_dir = tmp_path / "sweep" / "run"
    config = cfg()
    results = run(config, run_dir)
    lines = []

    def never(*_):
        raise AssertionError("a finished run with the same config must not run again")

    sweep.run_job(config, run_dir, tmp_path / "sweep", ["seed=0"], [], never, log=lines.append)
    assert lines == [f"seed=0: already done in {run_dir}, skipped"]
    saved = json.loads((run_dir / "results.json").read_text())
    saved["code"] = {**results["code"], "git_commit": "0" * 40}
    (run_dir / "results.json").write_text(json.dumps(saved))
    lines.clear()
    sweep.run_job(config, run_dir, tmp_path / "sweep", ["seed=0"], [], never, log=lines.append)
    assert "by other code (commit 0000000000" in lines[0] and "overwrite=true" in lines[0]
    entry = sweep.read_index(tmp_path / "sweep")["runs"]["seed=0"]
    assert entry["note"].startswith("reused results of other code")


def test_csv_and_tensorboard_sinks_log_steps_tasks_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    run(cfg(csv=True, tensorboard=True, log_every=3), tmp_path)
    with open(tmp_path / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    # split_digits, 2 tasks of ~720 / ~715 train samples, batch 64, 2 epochs, every 3rd step
    total = sum(2 * -(-n // 64) for n in _train_sizes())
    assert [int(r["global_step"]) for r in steps] == list(range(0, total, 3))
    assert all(float(r["loss"]) > 0 for r in steps)
    with open(tmp_path / "tasks.csv") as f:
        tasks = list(csv.DictReader(f))
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(tasks) == 2 and float(tasks[1]["acc"]) == pytest.approx(results["metrics"]["acc"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(0, total, 3))
    hparams = list((tmp_path / "tensorboard" / "hparams").glob("events.out.tfevents.*"))
    assert hparams, "add_hparams writes its own run"


def _train_sizes():
    from cl_toolkit.runner import build_stream

    return [len(t.train) for t in build_stream(cfg())]


def test_wandb_sink_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(cfg(wandb=True, wandb_mode="offline", log_every=5), tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    # Offline, W&B keeps every record in the run's .wandb file (protobuf: keys stay readable);
    # its service process may still be writing the last ones when finish() returns.
    deadline = time.time() + 60
    while b"final/acc" not in runs[0].read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    records = runs[0].read_bytes()
    assert records.count(b"train/loss") >= 2 and b"final/acc" in records
    assert b"task/acc_task_1" in records


def test_progress_counts_training_in_setup_too(tmp_path):
    """Merging strategies pretrain theta_0 in setup(), before the task loop starts."""
    from cl_toolkit.progress import QuietProgress

    out = io.StringIO()
    config = {**cfg(), "strategy": {"name": "merge_average", "epochs": 1, "pretrain_epochs": 1}}
    results = run(config, tmp_path, QuietProgress(stream=out, every_s=0.0))
    assert results["status"] == "done" and out.getvalue().count("task ") == 2


def test_progress_inside_an_epoch_and_the_closing_line(tmp_path):
    from cl_toolkit.cli import _summary
    from cl_toolkit.progress import QuietProgress

    out = io.StringIO()
    results = run(cfg(), tmp_path, QuietProgress(stream=out, every_s=0.0))
    lines = out.getvalue().splitlines()
    steps = [ln for ln in lines if "steps/s" in ln]
    first = -(-_train_sizes()[0] // 64)  # steps per epoch of task 0
    assert steps and f"epoch 1/2 step 1/{first}" in steps[0] and "ETA" in steps[0]
    assert any(f"epoch 2/2 step {first}/{first}" in ln for ln in steps)
    assert lines[-1].startswith("task 2/2")
    line = _summary(results, tmp_path)
    m = results["metrics"]
    assert f"ACC {100 * m['acc']:.2f}%" in line and f"BWT {100 * m['bwt']:.2f}%" in line
    assert f"forgetting {100 * m['forgetting']:.2f}%" in line
    assert line.endswith(str(tmp_path / "results.json"))


def test_summary_line_shows_a_non_percent_score_as_it_is():
    from cl_toolkit.cli import _summary

    ic = {"metric": {"key": "ic", "label": "IC", "percent": False},
          "metrics": {"acc": 0.05, "bwt": -0.0125, "forgetting": 0.02}}
    line = _summary(ic, "/r")
    assert line.startswith("Avg IC 0.0500  BWT -0.0125  forgetting 0.0200") and "%" not in line
    acc = {"metrics": {"acc": 0.5, "bwt": None, "forgetting": 0.25}}  # no metric: accuracy
    assert _summary(acc, "/r").startswith("ACC 50.00%  BWT n/a  forgetting 25.00%")
