"""The `cltk` command end to end in a temp dir: a sweep and its report, a SIGKILL in the middle
of a task followed by resume, Hydra-level config errors, and a strategy plugin installed
through the entry point."""
import json
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
    r["config"].pop("resume", None)
    return r


def test_sweep_and_report(tmp_path):
    cltk("run", "-m", "strategy=naive,replay", "seed=0,1", "strategy.epochs=1",
         f"output_root={tmp_path}", *COMMON, cwd=tmp_path)
    runs = sorted((tmp_path / "sweep").rglob("results.json"))
    assert len(runs) == 4
    proc = cltk("report", str(tmp_path / "sweep"), cwd=tmp_path)
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "| naive @ split_digits [class-il] | 2 |" in md and "| replay @ split_digits [class-il] | 2 |" in md
    html = (tmp_path / "sweep" / "report.html").read_text()
    # running acc, forgetting, acc vs memory (replay keeps a buffer), 2 heatmaps
    assert html.count("data:image/png;base64,") == 5
    assert (tmp_path / "sweep" / "acc_vs_memory.png").stat().st_size > 0
    assert "report.html" in proc.stdout


def test_sigkill_mid_task_then_resume_matches_uninterrupted(tmp_path):
    from cl_toolkit.runner import run

    args = ["strategy=replay", "strategy.epochs=20", "strategy.buffer_size=100", *COMMON]
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "cl_toolkit.cli", "run", *args,
                             f"output_root={out}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "split_digits" / "replay" / "seed0" / "results.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and json.loads(results.read_text())["finished_tasks"] >= 1:
            break
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
    full["config"].pop("resume")
    assert resumed == full


def test_hydra_level_config_errors(tmp_path):
    proc = cltk("run", "strategy=naiv", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "naive" in proc.stderr and "replay" in proc.stderr
    proc = cltk("run", "strategy.lrr=0.1", f"output_root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    proc = cltk("run", "+strategy.lrr=0.1", f"output_root={tmp_path}", cwd=tmp_path,
                check=False)
    assert proc.returncode == 1 and "Did you mean 'lr'" in proc.stderr
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


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    pkg.mkdir()
    (pkg / "cltk_demo_plugin.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "cltk-demo-plugin"
        version = "0.1"
        [tool.setuptools]
        py-modules = ["cltk_demo_plugin"]
        [project.entry-points."cl_toolkit.strategies"]
        label_smoothing = "cltk_demo_plugin:LabelSmoothing"
        broken = "cltk_demo_plugin:Broken"
    '''))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(pkg)], check=True,
                   timeout=240, capture_output=True)
    return site


def test_plugin_strategy_through_entry_point(tmp_path, plugin_site):
    env = {"PYTHONPATH": str(plugin_site)}
    listing = cltk("list", cwd=tmp_path, env=env).stdout
    assert "label_smoothing" in listing and "naive" in listing
    cltk("run", "strategy=label_smoothing", "+strategy.smoothing=0.2", "+strategy.epochs=1",
         f"output_root={tmp_path}", *COMMON[:2], "quiet=true", cwd=tmp_path, env=env)
    r = json.loads((tmp_path / "split_digits" / "label_smoothing" / "seed0" /
                    "results.json").read_text())
    assert r["status"] == "done" and r["config"]["strategy"]["smoothing"] == 0.2
    proc = cltk("run", "strategy=broken", f"output_root={tmp_path}", "quiet=true",
                cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1
    assert "Strategy plugin Broken (cltk_demo_plugin) raised in learn (task 0)" in proc.stderr
    assert "plugin bug" in proc.stderr
