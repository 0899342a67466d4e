"""Runner, run store and resume: determinism, atomic commits, refusals, NaN stops."""
import json

import pytest
import torch

from cl_toolkit import registry
from cl_toolkit.errors import ConfigError, NonFiniteLossError, ResumeError
from cl_toolkit.runner import build_model, build_stream, run
from cl_toolkit.strategy import Hooks
from interrupt import run_until


def cfg(**strategy):
    return {"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il"},
            "model": {"name": "mlp", "hidden": [32]},
            "strategy": {"name": "naive", "epochs": 2, "batch_size": 32, "lr": 0.1, **strategy}}


def strip_timings(results):
    return {k: v for k, v in results.items() if k != "timings"}


def test_results_have_full_matrix_and_metrics(tmp_path):
    r = run(cfg(), tmp_path)
    assert r["status"] == "done" and r["finished_tasks"] == 5
    assert len(r["before"]) == 5 and len(r["matrix"]) == 5
    assert all(len(row) == 5 for row in r["matrix"])
    assert len(r["timings"]["train_s"]) == 5 and r["memory_bytes"] == [0] * 5
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["matrix"] == r["matrix"] and on_disk["config"] == r["config"]
    # Naive fine-tuning in class-il forgets the earlier tasks almost entirely.
    assert r["metrics"]["forgetting"] > 0.5 and r["matrix"][-1][-1] > 0.7


def test_same_seed_gives_identical_results(tmp_path):
    a = run(cfg(), tmp_path / "a")
    b = run(cfg(), tmp_path / "b")
    assert strip_timings(a) == strip_timings(b)
    ja = json.loads((tmp_path / "a" / "results.json").read_text())
    jb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert strip_timings(ja) == strip_timings(jb)
    c = run({**cfg(), "seed": 1}, tmp_path / "c")
    assert c["matrix"] != a["matrix"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    full = run(cfg(name="replay", buffer_size=50), tmp_path / "full")

    run_until(cfg(name="replay", buffer_size=50), tmp_path / "cut", task_index=2, at_step=3)
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert partial["status"] == "running" and partial["finished_tasks"] == 2
    resumed = run({**cfg(name="replay", buffer_size=50), "resume": True}, tmp_path / "cut")
    assert strip_timings(resumed) == strip_timings({**full, "config": resumed["config"]})
    assert resumed["matrix"] == full["matrix"]


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run(cfg(), tmp_path)
    with pytest.raises(ResumeError, match="resume=true"):
        run(cfg(), tmp_path)
    run({**cfg(), "overwrite": True}, tmp_path)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run(cfg(), tmp_path)
    with pytest.raises(ResumeError, match=r"strategy\.lr: 0\.1 -> 0\.2"):
        run({**cfg(lr=0.2), "resume": True}, tmp_path)


def test_corrupt_results_and_checkpoint_are_reported(tmp_path):
    run(cfg(), tmp_path)
    (tmp_path / "results.json").write_text('{"matrix": [[0.1, ')
    with pytest.raises(ResumeError, match="results.json is corrupt or truncated"):
        run({**cfg(), "resume": True}, tmp_path)
    (tmp_path / "results.json").unlink()
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResumeError, match="checkpoint.pt is corrupt or truncated"):
        run({**cfg(), "resume": True}, tmp_path)


def test_nan_loss_stops_with_task_epoch_step_and_keeps_finished_tasks(tmp_path):
    def poison(strategy, task):
        if task.index == 1:
            with torch.no_grad():
                next(strategy.model.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"task 1 .*epoch 0, step 0"):
        run(cfg(), tmp_path, hooks=Hooks(before_task=[poison]))
    kept = json.loads((tmp_path / "results.json").read_text())
    assert kept["finished_tasks"] == 1


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="Unknown strategy 'naiv'. Did you mean 'naive'"):
        registry.build("strategy", "naiv")
    with pytest.raises(ConfigError, match="Valid stream names: .*split_digits"):
        build_stream({"benchmark": {"name": "nope"}})
    stream = build_stream(cfg())
    with pytest.raises(ConfigError, match="Unknown model 'resnet'.*resnet18_reduced"):
        build_model({"model": {"name": "resnet"}}, stream)


def test_misspelt_config_key_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy\.lrr\. Did you mean 'lr'"):
        run(cfg(lrr=0.1), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.hiden"):
        run({**cfg(), "model": {"name": "mlp", "hiden": [3]}}, tmp_path / "b")


def test_replay_buffer_is_class_balanced_and_counted(tmp_path):
    r = run(cfg(name="replay", buffer_size=200, epochs=4), tmp_path)
    assert r["memory_bytes"][-1] > 0
    from cl_toolkit.strategies.replay import ClassBalancedBuffer
    from cl_toolkit.stream import TensorData

    buf = ClassBalancedBuffer(10)
    g = torch.Generator().manual_seed(0)
    buf.update(TensorData(torch.randn(40, 2), torch.arange(40) % 2), g)
    assert sorted(buf.data.y.tolist()) == [0] * 5 + [1] * 5
    buf.update(TensorData(torch.randn(40, 2), 2 + torch.arange(40) % 3), g)
    counts = torch.bincount(buf.data.y).tolist()
    assert counts == [2, 2, 2, 2, 2]
    # Replay beats naive fine-tuning in class-il.
    naive = run(cfg(epochs=4), tmp_path / "naive")
    assert r["metrics"]["acc"] > naive["metrics"]["acc"] + 0.25


def test_multi_head_and_task_masks(tmp_path):
    stream = build_stream({**cfg(), "benchmark": {"name": "split_digits"}})
    model = build_model({"model": {"name": "mlp", "hidden": [8], "heads": "multi"}}, stream)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 1, 2, 4])
    logits = model(x, t)
    h = model.features(x)
    for i in range(4):
        task = stream[int(t[i])]
        w = model.head.weight.view(5, 10, -1)[t[i]]
        b = model.head.bias.view(5, 10)[t[i]]
        expected = torch.full((10,), float("-inf"))
        expected[list(task.classes)] = (h[i] @ w.T + b)[list(task.classes)]
        assert torch.allclose(logits[i], expected)


def test_tensorboard_logging_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    run({**cfg(epochs=1), "tensorboard": True}, tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("acc")] == [0, 1, 2, 3, 4]


def test_misspelt_key_of_a_subclass_forwarding_kwargs(tmp_path):
    # Replay forwards **kwargs to SupervisedStrategy: both signatures are checked.
    with pytest.raises(ConfigError, match=r"strategy\.epoch\. Did you mean 'epochs'"):
        run(cfg(name="replay", epoch=3), tmp_path)


def test_joint_counts_the_data_it_keeps(tmp_path):
    r = run(cfg(name="joint", epochs=1), tmp_path)
    sizes = [t["train"] for t in r["stream"]["tasks"]]
    per_sample = 8 * 8 * 4 + 8 + 8  # float32 8x8 image, int64 label, int64 task id
    assert r["memory_bytes"] == [per_sample * sum(sizes[: k + 1]) for k in range(5)]


def test_first_task_train_s_excludes_the_one_time_warm_up(tmp_path):
    """The first optimizer of a process imports torch._dynamo (1.5-4 s on 2 cores), which used to
    land in the first task's train_s: a smoke run read [1.58, 0.03, ...]. The runner pays it
    before task 0 and records it apart as warmup_s. A fresh interpreter: this one paid it."""
    import subprocess
    import sys
    import textwrap

    config = {**cfg(epochs=1), "threads": 1, "smoke": True}
    code = textwrap.dedent(f"""
        import json, sys
        from cl_toolkit.runner import run
        from cl_toolkit.strategy import Hooks
        seen = []
        hooks = Hooks(before_task=[lambda task, **_: seen.append("torch._dynamo" in sys.modules)])
        r = run({config!r}, {str(tmp_path / "run")!r}, hooks=hooks)
        print(json.dumps({{"seen": seen, "timings": r["timings"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"] == [True, True], "the lazy import must happen before task 0 is timed"
    timings = out["timings"]
    assert timings["warmup_s"] > 0 and "warmup_s" in timings["measures"]
    assert timings["train_s"][0] < 1.0, timings  # a smoke task trains in about 0.01 s
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["timings"]
    assert saved["warmup_s"] == timings["warmup_s"] and "train_s[t]" in saved["measures"]


def test_warm_up_changes_no_random_state_and_no_result(tmp_path, monkeypatch):
    import random

    import numpy as np

    from cl_toolkit import runner

    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    runner.warm_up()
    assert torch.equal(before[0], torch.get_rng_state())
    assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()
    smoke = {**cfg(epochs=1), "smoke": True, "threads": 1}
    warm = run(smoke, tmp_path / "warm")
    monkeypatch.setattr(runner, "warm_up", lambda: 0.0)
    cold = run(smoke, tmp_path / "cold")
    assert strip_timings(warm) == strip_timings(cold)


def test_run_into_a_directory_another_process_runs_in_is_refused(tmp_path):
    """The runner holds run.lock for the whole run (sweep jobs, programmatic runs); a lock whose
    holder was killed does not block (the kernel drops an flock with its process)."""
    import subprocess
    import sys

    from cl_toolkit.store import RunLockedError

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from cl_toolkit.store import lock_run_dir; "
        f"lock_run_dir({str(out)!r}); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as refused:
            run({**cfg(epochs=1), "smoke": True}, out)
        message = str(refused.value)
        assert f"Another run is already writing into {out} (pid {holder.pid} on " in message
        assert "resume=true" in message and "output_root=" in message
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run({**cfg(epochs=1), "smoke": True}, out)["status"] == "done"
    assert RunLockedError.exit_code == 2
