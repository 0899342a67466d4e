"""Optional experiment-tracking sinks: TensorBoard (``tensorboard=true``), CSV files
(``csv=true``), Weights & Biases (``wandb=true``) and MLflow (``mlflow=true``, a local file
store at ``<output_root>/mlruns`` unless ``mlflow_uri`` names another tracking URI).

The runner calls ``log_task(results, step)`` after every committed task and ``close(results)``
at the end; `attach_step_logging` registers an ``after_batch`` hook (the strategies' existing
hook mechanism) that hands every ``log_every``-th training loss to the sinks' ``log_step``. Sinks
only read what the runner computed, so ``results.json`` stays the record and a sink can never
change what a run computes.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .config import semantic_config
from .errors import ConfigError
from .runs import flatten_config


def _final_metrics(results: dict) -> dict:
    return {f"final/{k}": float(v) for k, v in results["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Under ``<run dir>/tensorboard``: the training loss per logged step, per task acc,
    forgetting, memory and each task's accuracy, and the config as hparams with the final
    metrics (TensorBoard's HPARAMS tab)."""

    def __init__(self, cfg: dict, root: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("tensorboard=true needs the tensorboard package: "
                              "pip install 'cl_toolkit[tensorboard]'.") from exc
        self.cfg = cfg
        self.writer = SummaryWriter(str(Path(root) / "tensorboard"))

    def log_step(self, task: int, epoch: int, step: int, loss: float, global_step: int) -> None:
        self.writer.add_scalar("train/loss", loss, global_step)

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

        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten_config(semantic_config(self.cfg)).items()}
        self.writer.add_hparams(hparams, _final_metrics(results), run_name="hparams")
        self.writer.close()


class CSVSink:
    """``steps.csv`` (task, epoch, step, global_step, loss) and ``tasks.csv`` (one row per
    finished task: acc, bwt, forgetting, memory, the accuracy on every task) in the run
    directory; appended to on resume."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.steps = open(self.root / "steps.csv", "a", newline="")
        self.step_writer = csv.writer(self.steps)
        if self.steps.tell() == 0:
            self.step_writer.writerow(["task", "epoch", "step", "global_step", "loss"])

    def log_step(self, task: int, epoch: int, step: int, loss: float, global_step: int) -> None:
        self.step_writer.writerow([task, epoch, step, global_step, f"{loss:.6g}"])

    def log_task(self, results: dict, step: int) -> None:
        path = self.root / "tasks.csv"
        new = not path.exists()
        m, row = results["metrics"], results["matrix"][-1]
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["task", "acc", "bwt", "forgetting", "memory_bytes"]
                           + [f"acc_task_{j}" for j in range(len(row))])
            w.writerow([step, m.get("acc"), m.get("bwt"), m.get("forgetting"),
                        results["memory_bytes"][-1], *row])
        self.steps.flush()

    def close(self, results: dict) -> None:
        self.steps.close()


class WandbSink:
    """One W&B run per cl_toolkit run (project ``wandb_project``, mode ``wandb_mode``, e.g.
    ``offline`` to write under ``<run dir>/wandb`` without an account): the config, the training
    loss per logged step, per-task metrics and the final metrics as the run summary."""

    def __init__(self, cfg: dict, root: Path):
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("wandb=true needs Weights & Biases: pip install wandb, or set "
                              "wandb=false.") from exc

        name = f"{cfg['strategy']['name']}@{cfg['benchmark']['name']}/seed{cfg.get('seed', 0)}"
        self.run = wandb.init(project=cfg.get("wandb_project") or "cl_toolkit", name=name,
                              dir=str(root), mode=cfg.get("wandb_mode") or None,
                              config=semantic_config(cfg), reinit="create_new",
                              settings=wandb.Settings(console="off"))  # results.json has it

    def log_step(self, task: int, epoch: int, step: int, loss: float, global_step: int) -> None:
        self.run.log({"train/loss": loss, "task": task}, step=global_step)

    def log_task(self, results: dict, step: int) -> None:
        m = results["metrics"]
        data = {f"task/{k}": m[k] for k in ("acc", "bwt", "forgetting") if m.get(k) is not None}
        data.update({f"task/acc_task_{j}": a for j, a in enumerate(results["matrix"][-1])})
        self.run.log(data)

    def close(self, results: dict) -> None:
        self.run.summary.update(_final_metrics(results))
        self.run.finish()


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
        sinks.append(TensorBoardSink(cfg, root))
    if cfg.get("csv", False):
        sinks.append(CSVSink(root))
    if cfg.get("wandb", False):
        sinks.append(WandbSink(cfg, root))
    if cfg.get("mlflow", False):
        sinks.append(MLflowSink(cfg, root))
    return sinks


def attach_step_logging(sinks: list, hooks, every: int = 10) -> None:
    """Register one ``after_batch`` hook that passes every ``every``-th loss to the sinks that
    take steps (``loss.item()`` syncs a GPU, hence not every step)."""
    takers = [s for s in sinks if hasattr(s, "log_step")]
    if not takers:
        return
    count = {"n": 0}

    def after_batch(strategy, task, epoch, step, loss, **_):
        count["n"] += 1
        if (count["n"] - 1) % max(every, 1):
            return
        value = float(loss.detach())
        for sink in takers:
            sink.log_step(task.index, epoch, step, value, count["n"] - 1)

    hooks.after_batch.append(after_batch)
