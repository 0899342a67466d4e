"""Optional experiment-tracking sinks: TensorBoard (``tensorboard=true``) and MLflow
(``mlflow=true``, a local file store at ``<output_root>/mlruns`` unless ``mlflow_uri`` names
another tracking URI: no server needed).

The runner calls ``log_task(results, step)`` after every committed task and ``close(results)``
at the end. Sinks only read the results dict the runner already wrote, so ``results.json`` stays
the record and a sink can never change what a run computes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError


class TensorBoardSink:
    """Scalars under ``<run dir>/tensorboard``: acc, forgetting, memory, each task's accuracy."""

    def __init__(self, root: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("tensorboard=true needs the tensorboard package: "
                              "pip install 'cl_toolkit[tensorboard]'.") from exc
        self.writer = SummaryWriter(str(Path(root) / "tensorboard"))

    def log_task(self, results: dict, step: int) -> None:
        m = results["metrics"]
        self.writer.add_scalar("acc", m["acc"], step)
        for j, acc in enumerate(results["matrix"][-1]):
            self.writer.add_scalar(f"task_acc/{j}", acc, step)
        if m["forgetting"] is not None:
            self.writer.add_scalar("forgetting", m["forgetting"], step)
        self.writer.add_scalar("memory_bytes", results["memory_bytes"][-1], step)
        self.writer.flush()

    def close(self, results: dict) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per cl_toolkit run, in experiment ``cl_toolkit``: the config as params,
    acc / forgetting / each task's accuracy per step, the final matrix and results.json as
    artifacts. A resumed run opens a new MLflow run (the file store has no resume of its own)."""

    def __init__(self, cfg: dict, root: Path):
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigError("mlflow=true needs MLflow: pip install 'cl_toolkit[mlflow]', or "
                              "set mlflow=false.") from exc
        from .report import flatten_config
        from .runner import semantic_config

        self.mlflow, self.root = mlflow, Path(root)
        uri = cfg.get("mlflow_uri") or (Path(cfg.get("output_root", "runs")).resolve()
                                        / "mlruns").as_uri()
        if str(uri).startswith("file:") or "://" not in str(uri):
            # MLflow 3 keeps its file store only behind this opt-in; it is the no-server option.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name("cl_toolkit")
        if exp is None:
            try:
                exp_id = self.client.create_experiment("cl_toolkit")
            except Exception:  # another worker of the sweep created it first
                exp_id = self.client.get_experiment_by_name("cl_toolkit").experiment_id
        else:
            exp_id = exp.experiment_id
        name = f"{cfg['strategy']['name']}@{cfg['benchmark']['name']}/seed{cfg.get('seed', 0)}"
        self.run_id = self.client.create_run(exp_id, run_name=name,
                                             tags={"run_dir": str(self.root)}).info.run_id
        for key, value in flatten_config(semantic_config(cfg)).items():
            self.client.log_param(self.run_id, key, str(value)[:500])  # MLflow's cap

    def log_task(self, results: dict, step: int) -> None:
        m = results["metrics"]
        self.client.log_metric(self.run_id, "acc", m["acc"], step=step)
        if m["forgetting"] is not None:
            self.client.log_metric(self.run_id, "forgetting", m["forgetting"], step=step)
        for j, acc in enumerate(results["matrix"][-1]):
            self.client.log_metric(self.run_id, f"task_acc_{j}", acc, step=step)

    def close(self, results: dict) -> None:
        self.client.log_dict(self.run_id, {"matrix": results["matrix"],
                                           "before": results["before"]}, "matrix.json")
        self.client.log_text(self.run_id, json.dumps(results, indent=2), "results.json")
        self.client.set_terminated(self.run_id,
                                   "FINISHED" if results["status"] == "done" else "KILLED")


def open_sinks(cfg: dict, root: Path) -> list:
    sinks = []
    if cfg.get("tensorboard", False):
        sinks.append(TensorBoardSink(root))
    if cfg.get("mlflow", False):
        sinks.append(MLflowSink(cfg, root))
    return sinks
