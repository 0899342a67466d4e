"""The `cltk` command end to end in a temp dir: a sweep and its report, a SIGKILL in the middle
of a task followed by resume, Hydra-level config errors, and a strategy plugin installed
through the entry point."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cltk_subprocess import cltk

COMMON = ["benchmark.scenario=class-il", "model.hidden=[32]", "strategy.batch_size=32",
          "quiet=true"]


def results_without_timings(path):
    r = json.loads(Path(path).read_text())
    r.pop("timings")
    r.pop("code")  # the date and process differ
    r["config"].pop("resume", None)
    return r


def test_sweep_and_report(tmp_path):
    cltk("run", "-m", "strategy=naive,replay", "seed=0,1", "strategy.epochs=1",
         f"output_root={tmp_path}", *COMMON, cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sweep.name == ("benchmark.scenario=class-il,model.hidden=[32],seed=0,1,"
                          "strategy.batch_size=32,strategy.epochs=1,strategy=naive,replay")
    runs = sorted(sweep.rglob("results.json"))
    assert len(runs) == 4
    proc = cltk("report", str(tmp_path / "multirun"), cwd=tmp_path)
    md = (tmp_path / "multirun" / "report.md").read_text()
    assert "## split_digits · class-il · 5 tasks" in md
    assert "| naive | 2 |" in md and "| replay | 2 |" in md
    html = (tmp_path / "multirun" / "report.html").read_text()
    # running acc, forgetting, acc vs memory (replay keeps a buffer); matrices as HTML tables
    assert html.count("data:image/png;base64,") == 3 and html.count('class="matrix"') == 2
    assert (tmp_path / "multirun" / "split_digits_class-il_5__acc_vs_memory.png").stat().st_size > 0
    for name in ("report.md", "report.csv", "report.tex"):
        assert (tmp_path / "multirun" / name).stat().st_size > 0
    assert "report.html" in proc.stdout


def test_sigkill_mid_task_then_resume_matches_uninterrupted(tmp_path):
    from cl_toolkit.runner import run

    args = ["strategy=replay", "strategy.epochs=20", "strategy.buffer_size=100", *COMMON]
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "cl_toolkit.cli", "run", *args,
                             f"output_root={out}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The run directory is named by the overrides (resume=true is not among them).
    results = out / "split_digits" / "replay" / (
        "benchmark.scenario=class-il,model.hidden=[32],strategy.batch_size=32,"
        "strategy.buffer_size=100,strategy.epochs=20,strategy=replay") / "results.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(results.read_text())["finished_tasks"] >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(results.read_text())["finished_tasks"]
    assert 1 <= killed_at < 5, "the run should have been killed in the middle of the stream"
    cltk("run", *args, f"output_root={out}", "resume=true", cwd=tmp_path)
    resumed = results_without_timings(results)
    # The uninterrupted reference: the same composed config, run in this process.
    full = run({**resumed["config"], "resume": False}, tmp_path / "full")
    full.pop("timings")
    full.pop("code")
    full["config"].pop("resume")
    assert resumed == full


def test_hydra_level_config_errors(tmp_path):
    proc = cltk("run", "strategy=naiv", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "naive" in proc.stderr and "replay" in proc.stderr
    proc = cltk("run", "strategy.lrr=0.1", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    proc = cltk("run", "+strategy.lrr=0.1", f"output_root={tmp_path}", cwd=tmp_path,
                check=False)
    assert proc.returncode == 2 and "Did you mean 'lr'" in proc.stderr
    assert "Traceback" not in proc.stderr


PLUGIN = textwrap.dedent('''
    import torch.nn.functional as F
    from cl_toolkit.strategy import SupervisedStrategy

    class LabelSmoothing(SupervisedStrategy):
        """Fine-tuning with label smoothing: a strategy living outside cl_toolkit."""
        name = "label_smoothing"

        def __init__(self, smoothing=0.1, **kwargs):
            super().__init__(**kwargs)
            self.smoothing = smoothing

        def loss(self, x, y, t, task):
            logits = self.model(x, t if self.model.uses_task_id else None)
            return F.cross_entropy(logits, y, label_smoothing=self.smoothing)

    class Broken(SupervisedStrategy):
        name = "broken"

        def learn(self, task):
            raise RuntimeError("plugin bug")
''')
# The config the plugin ships (entry-point group cl_toolkit.configs -> package cltk_demo_conf).
PLUGIN_YAML = """name: label_smoothing
smoothing: 0.3
epochs: 1
batch_size: 32
lr: 0.05
optimizer: sgd
momentum: 0.9
weight_decay: 0.0
lr_decay: 1.0
reset_optimizer: true
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """An installed plugin distribution, laid out as pip installs one: the module, its config
    package and a dist-info whose entry points name them."""
    site = tmp_path_factory.mktemp("plugin_site")
    (site / "cltk_demo_plugin.py").write_text(PLUGIN)
    conf = site / "cltk_demo_conf"
    (conf / "strategy").mkdir(parents=True)
    (conf / "__init__.py").write_text("")
    (conf / "strategy" / "label_smoothing.yaml").write_text(PLUGIN_YAML)
    info = site / "cltk_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cltk-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [cl_toolkit.strategies]
        label_smoothing = cltk_demo_plugin:LabelSmoothing
        broken = cltk_demo_plugin:Broken

        [cl_toolkit.configs]
        cltk_demo = cltk_demo_conf
    """))
    return site


def test_plugin_strategy_through_entry_point(tmp_path, plugin_site):
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(plugin_site),
                                                     os.environ.get("PYTHONPATH")) if p)}
    listing = cltk("list", cwd=tmp_path, env=env).stdout
    assert "label_smoothing" in listing and "naive" in listing and "broken" in listing
    # The plugin's own YAML is the config of its name...
    job = cltk("run", "strategy=label_smoothing", "--cfg", "job", cwd=tmp_path, env=env).stdout
    assert "smoothing: 0.3" in job and "lr: 0.05" in job
    # ...and a plugin without one gets a node generated from its signature: every default shows.
    job = cltk("run", "strategy=broken", "--cfg", "job", cwd=tmp_path, env=env).stdout
    for line in ("epochs: 1", "lr: 0.01", "momentum: 0.0", "reset_optimizer: true"):
        assert line in job, job
    cltk("run", "strategy=label_smoothing", "strategy.smoothing=0.2", "strategy.epochs=1",
         f"output_root={tmp_path}", *COMMON[:2], "quiet=true", cwd=tmp_path, env=env)
    (path,) = (tmp_path / "split_digits" / "label_smoothing").glob("*/results.json")
    r = json.loads(path.read_text())
    assert r["status"] == "done" and r["config"]["strategy"]["smoothing"] == 0.2
    proc = cltk("run", "strategy=broken", "strategy.epochs=1", f"output_root={tmp_path}",
                "quiet=true", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1
    assert "Strategy plugin Broken (cltk_demo_plugin) raised in learn (task 0)" in proc.stderr
    assert "plugin bug" in proc.stderr


def _finished_run(path):
    from cl_toolkit.runner import run

    run({"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il"},
         "model": {"name": "mlp", "hidden": [16]}, "threads": 1, "smoke": True,
         "strategy": {"name": "naive", "epochs": 1, "batch_size": 64}}, path)


def test_report_into_a_directory_it_cannot_write_is_a_usage_error(tmp_path, capsys):
    from cl_toolkit.cli import main

    _finished_run(tmp_path / "run")
    out = "/proc/cltk_report"  # nobody can make a directory there, root included
    code = main(["report", str(tmp_path / "run"), "-o", out])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"error: Cannot write the report into {out} (") and "-o DIR" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    # A writable -o that does not exist yet works, and the check leaves nothing behind.
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "new" / "deep")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]
    assert (tmp_path / "new" / "deep" / "report.md").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_next_to_runs_in_a_read_only_directory_says_to_use_o(tmp_path, capsys):
    from cl_toolkit.cli import main

    _finished_run(tmp_path / "runs" / "run")
    (tmp_path / "runs").chmod(0o555)
    try:
        code = main(["report", str(tmp_path / "runs")])
    finally:
        (tmp_path / "runs").chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write the report into {tmp_path / 'runs'}" in err, err
    assert "-o DIR" in err


def test_directory_overrides_that_cltk_named_need_no_extra_quotes():
    from cl_toolkit.cli import _quote_dirs

    assert _quote_dirs(["hydra.run.dir=runs/split_digits/replay/seed=1,strategy=replay"]) == [
        'hydra.run.dir="runs/split_digits/replay/seed=1,strategy=replay"']
    assert _quote_dirs(["hydra.sweep.dir=/r/multirun/seed=0,1,strategy=naive,replay",
                        "output_root=/data/exp=1"]) == [
        'hydra.sweep.dir="/r/multirun/seed=0,1,strategy=naive,replay"',
        'output_root="/data/exp=1"']
    untouched = ["-m", "hydra.run.dir=runs/a/defaults", 'hydra.run.dir="runs/x=1"',
                 "hydra.run.dir='runs/x=1'", "hydra.run.dir=out/${now:%H-%M}", "seed=0,1",
                 "output_root=a,b", "strategy.lr=0.1"]
    assert _quote_dirs(untouched) == untouched
