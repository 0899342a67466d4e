"""Optional tracking sinks: MLflow with a local file store (no server). Skipped when MLflow is
not installed (``pip install 'cl_toolkit[mlflow]'``; it is not part of ``dev``)."""
import json

import pytest

from cl_toolkit.errors import ConfigError
from cl_toolkit.runner import run

CFG = {"seed": 0, "benchmark": {"name": "split_digits", "scenario": "class-il"},
       "model": {"name": "mlp", "hidden": [32]}, "threads": 1,
       "strategy": {"name": "naive", "epochs": 1, "batch_size": 64}}


def test_mlflow_logs_every_task_and_the_final_matrix(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    results = run({**CFG, "mlflow": True, "mlflow_uri": uri}, tmp_path / "run")
    client = mlflow.tracking.MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("cl_toolkit").experiment_id])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["strategy.name"] == "naive"
    assert logged.data.params["model.hidden"] == "[32]" and "mlflow" not in logged.data.params
    history = client.get_metric_history(logged.info.run_id, "acc")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(results["metrics"]["running_acc"])
    last = [client.get_metric_history(logged.info.run_id, f"task_acc_{j}")[-1].value
            for j in range(5)]
    assert last == pytest.approx(results["matrix"][-1])
    path = client.download_artifacts(logged.info.run_id, "matrix.json", str(tmp_path / "dl"))
    assert json.loads(open(path).read())["matrix"] == results["matrix"]


def test_mlflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'cl_toolkit\[mlflow\]'"):
        run({**CFG, "mlflow": True}, tmp_path / "run")
