"""Test-time context policies on a finished run's backbone, without training it again.

With ``context.during=test`` the backbone trains bit-identically under every policy
(tests/test_context.py checks it), so a run with ``context=none`` (or no context) holds the
backbone every test-time policy would read with. This applies a policy to that checkpoint and
writes a results.json as the run with the policy would have, for the report and RESULTS.md::

    python -m cl_toolkit.context.evaluate RUN_DIR OUT_DIR context=oracle
    python -m cl_toolkit.context.evaluate RUN_DIR OUT_DIR context=learned context.budget=0

What differs from a full run (recorded under ``results["context_eval"]``): the learned scorer
trains on ``steps`` batches drawn from the task's training set with its own generator (a full
run uses the fit's last ``steps`` batches in the strategy's order: the same distribution, not
the same batches), and the ``before`` row is the base run's (the untrained backbone read the
full context there). Single-task streams only (the CPU PI protocol): the checkpoint holds the
backbone after the last task.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import metrics, registry, runner, smoke
from ..errors import ConfigError
from ..store import RunStore
from ..strategy import RunContext
from ..task_kinds import task_kind
from .policies import Learned


def policy_node(args: list[str]) -> dict:
    """``context=NAME context.key=value ...`` -> the config node (the YAML's defaults)."""
    name = next((a.split("=", 1)[1] for a in args if a.startswith("context=")), None)
    if name is None:
        raise ConfigError("name the policy: context=none|recency|oracle|learned")
    path = resources.files("cl_toolkit.conf") / "context" / f"{name}.yaml"
    node = yaml.safe_load(path.read_text()) if path.is_file() else {
        "name": name, **registry.signature_defaults("context", registry.resolve("context", name))}
    for a in args:
        if a.startswith("context."):
            key, value = a[len("context."):].split("=", 1)
            node[key] = yaml.safe_load(value)
    return node


def evaluate(run_dir: str | Path, out_dir: str | Path, node: dict) -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    base = json.loads((run_dir / "results.json").read_text())
    cfg = copy.deepcopy(base["config"])
    base_ctx = cfg.get("context")
    if base_ctx not in (None, {}) and (base_ctx.get("name") != "none"):
        raise ConfigError(f"{run_dir} ran with context={base_ctx.get('name')}; evaluate on a "
                          "run with context=none (or none set).")
    cfg["context"] = node
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg.get("seed", 0))
    runner.seed_everything(seed)
    stream = runner.build_stream(cfg)
    if cfg.get("smoke"):
        stream = smoke.shrink_stream(stream, seed)
    if len(stream) != 1:
        raise ConfigError(f"{run_dir}: a stream of {len(stream)} tasks; this evaluates "
                          "single-task runs only (rerun with the policy instead).")
    model = runner.build_model(cfg, stream)
    state = RunStore(run_dir).load_checkpoint()["strategy"]["model"]
    state = {k.removeprefix("model."): v for k, v in state.items()
             if not k.startswith("scorer.") and k != "_extra_state"}
    model.model.load_state_dict(state)
    strategy = runner.build_strategy(cfg)
    device = torch.device(cfg.get("device", "cpu"))
    strategy.setup(stream, model, RunContext(device=device, seed=seed,
                                             generator=torch.Generator().manual_seed(seed)))
    task = stream.tasks[0]
    t0 = time.perf_counter()
    if isinstance(model.policy, Learned):
        bs = int(cfg["strategy"].get("batch_size", 32))
        g = torch.Generator().manual_seed(seed + 31)
        x = task.train.x
        batches = []
        while len(batches) < model.policy.steps:
            perm = torch.randperm(len(x), generator=g)
            batches += [(x[perm[s:s + bs]].to(device), None)
                        for s in range(0, len(x), bs)]  # a last partial batch too
        model._inputs = batches[:model.policy.steps]
        model.end_epoch(0, 1)
    t1 = time.perf_counter()
    kind = task_kind(stream.kind)
    eval_bs = int(cfg.get("eval_batch_size", 1024))
    scores = [runner.evaluate_scores(strategy, t, eval_bs, device, kind) for t in stream]
    extras = copy.deepcopy(base.get("extras", {}))
    extras.update(runner.run_analyses(strategy, stream, task, eval_bs, device))
    out = copy.deepcopy(base)
    out["config"] = cfg
    out["matrix"] = [[s[kind.metric.key] for s in scores]]
    out["metrics"] = metrics.summary(np.asarray(out["matrix"], dtype=np.float64),
                                     base["before"][:1], base.get("not_applicable") or {},
                                     kind.metric.higher_is_better)
    for m in kind.extra_metrics:
        if m.key in extras:
            extras[m.key]["matrix"] = [[s[m.key] for s in scores]]
    out["extras"] = extras
    out["model_params"] = sum(p.numel() for p in model.parameters())
    out["context_eval"] = {
        "backbone_from": str(run_dir), "scorer_train_s": t1 - t0,
        "eval_s": time.perf_counter() - t1,
        "scorer_log": model.scorer_log[::max(1, len(model.scorer_log) // 20)],
        "note": "backbone of the base run (context=none); the policy applied at test time"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    try:
        evaluate(argv[0], argv[1], policy_node(argv[2:]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
