"""KCL and GKCL through the runner: registry kwargs check, checkpoint, exact resume."""
import pytest

from cl_toolkit.runner import run
from interrupt import run_until

SETTINGS = {
    "kcl": {"kernel": "vrf", "coreset_per_class": 5, "num_features": 128},
    "gkcl": {"support_per_class": 5, "generated_per_class": 10, "generator_hidden": [64],
             "z_dim": 8, "generator_epochs": 10, "generator_batch_size": 32},
}


def cfg(name):
    return {"seed": 0, "benchmark": {"name": "split_digits", "n_tasks": 5, "scenario": "task-il"},
            "model": {"name": "mlp", "hidden": [32]},
            "strategy": {"name": name, "lr": 0.05, **SETTINGS[name]}}


def strip_timings(results):
    return {k: v for k, v in results.items() if k != "timings"}


@pytest.mark.parametrize("name", ["kcl", "gkcl"])
def test_interrupted_run_resumes_exactly(tmp_path, name):
    full = run(cfg(name), tmp_path / "full")
    assert full["metrics"]["acc"] > 0.8  # chance: 0.5

    run_until(cfg(name), tmp_path / "cut", task_index=3, at_step=3)
    resumed = run({**cfg(name), "resume": True}, tmp_path / "cut")
    assert resumed["matrix"] == full["matrix"]
    assert resumed["memory_bytes"] == full["memory_bytes"]
    assert strip_timings(resumed) == strip_timings({**full, "config": resumed["config"]})


@pytest.mark.parametrize("name,scenario", [("kcl", "task-il"), ("gkcl", "task-il"),
                                           ("naive", "class-il"), ("naive", "task-il")])
def test_structurally_zero_fwt_is_reported_not_applicable(tmp_path, name, scenario):
    """KCL / GKCL have no classifier for a task before learning it (R[j-1, j] = b[j] = the
    same constant prediction); in class-il an untrained class is never predicted. Their FWT is
    None with the reason in results["not_applicable"] and the report says n/a."""
    from cl_toolkit.report import write_report

    c = cfg(name) if name != "naive" else {**cfg("kcl"), "strategy": {"name": "naive"}}
    c["benchmark"] = {**c["benchmark"], "scenario": scenario}
    results = run(c, tmp_path / "run")
    if name == "naive" and scenario == "task-il":
        assert isinstance(results["metrics"]["fwt"], float)
        assert results["not_applicable"] == {}
        return
    assert results["metrics"]["fwt"] is None
    reason = results["not_applicable"]["fwt"]
    assert ("class-il" in reason) == (scenario == "class-il")
    md = write_report([tmp_path / "run"], str(tmp_path / "report"))[0]
    text = md.read_text()
    assert "n/a [1]" in text and reason.split(":")[0] in text
