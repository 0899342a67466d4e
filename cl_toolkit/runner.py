"""The loop of one run (DESIGN.md section 2) and the evaluator.

    build stream -> build model -> build strategy -> evaluate before training (row b)
    for each task t: strategy.learn(task); R[t, j] = score on every task j; commit

The score is the stream's task kind's (`cl_toolkit.task_kinds`): accuracy, the daily IC, Dice.

Every commit writes the checkpoint and ``results.json`` atomically, so a crash or kill loses at
most the task in progress, and ``resume=true`` continues from the last finished task with the
same random state, giving the same final results as an uninterrupted run.
"""
from __future__ import annotations

import copy
import inspect
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics, probes, registry, smoke, tracking
from .config import semantic_config
from .context.wrapper import attach as attach_context
from .errors import ClToolkitError, ConfigError, PluginError, ResumeError
from .models import Classifier, task_mask
from .store import (RunStore, code_version, describe_code, remove_partial_files, run_dir_locked,
                    same_code)
from .strategy import RunContext, Strategy
from .stream import Task, TaskStream
from .task_kinds import TaskKind, task_kind
from .trainer import check_settings, warm_up
from .validation import check_compatible

FORMAT = 1


def _split_name(node: Any, kind: str) -> tuple[str, dict]:
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"The {kind} config needs a 'name' key (one of "
                          f"{', '.join(registry.names(kind))}); got {node!r}.")
    kwargs = dict(node)
    return kwargs.pop("name"), kwargs


def build_stream(cfg: dict) -> TaskStream:
    """The configured stream; ``benchmark.shuffle_tasks=true`` puts its tasks in an order drawn
    from the run seed, so a sweep over seeds is a sweep over task orders."""
    name, kwargs = _split_name(cfg["benchmark"], "stream")
    shuffle = kwargs.pop("shuffle_tasks", False)
    seed = cfg.get("seed", 0)
    target = registry.resolve("stream", name)
    if "seed" in inspect.signature(target).parameters and "seed" not in kwargs:
        kwargs["seed"] = seed
    stream = registry.build("stream", name, **kwargs)
    return stream.shuffled(seed) if shuffle else stream


def build_model(cfg: dict, stream: TaskStream) -> Classifier:
    """Backbone from the registry plus heads. ``heads``: ``single`` (one head over the global
    label space) or ``multi`` (one per task). In task-il the logits are masked to each task's
    classes either way.

    A backbone builder whose signature has ``num_tasks`` gets the stream's task count there
    (unless the config sets it); a backbone that uses task ids (``uses_task_id``, e.g. a
    task-routed MoM) is refused on streams that give no task id at test time."""
    name, kwargs = _split_name(cfg["model"], "model")
    target = registry.resolve("model", name)
    if getattr(target, "needs_stream", False):
        # Builders such as CLIP's make their own heads from the stream's class names; language
        # models take the stream's vocabulary. ``context=``: a policy in front (cl_toolkit.context).
        return attach_context(cfg, stream, registry.build("model", name, stream, **kwargs))
    if stream.is_tokens:
        lms = [n for n in registry.names("model") if n.endswith("_lm")]
        raise ConfigError(f"benchmark {stream.name!r} is a token stream, which model={name} "
                          f"cannot take; use a language model: {', '.join(lms)}.")
    if cfg.get("context") is not None:
        attach_context(cfg, stream, None)  # refuses: no (key, value) context to manage here
    heads = kwargs.pop("heads", "single")
    if heads not in ("single", "multi"):
        raise ConfigError(f"model.heads must be 'single' or 'multi'; got {heads!r}.")
    if heads == "multi" and not stream.task_il:
        raise ConfigError(f"model.heads=multi needs the task id at test time, which a "
                          f"{stream.scenario} stream does not give; use model.heads=single or "
                          "benchmark.scenario=task-il.")
    if "num_tasks" in inspect.signature(target).parameters:
        if kwargs.get("num_tasks") is None:
            kwargs["num_tasks"] = len(stream)
        elif kwargs["num_tasks"] < len(stream):
            raise ConfigError(f"model.num_tasks={kwargs['num_tasks']} is below the stream's "
                              f"{len(stream)} tasks; leave model.num_tasks null (the stream's "
                              "count is used).")
    try:
        backbone = registry.build("model", name, tuple(stream.input_shape), **kwargs)
    except ValueError as exc:
        if name not in registry.BUILTINS["model"]:
            raise
        raise ConfigError(f"model={name}: {exc}") from exc
    if getattr(backbone, "uses_task_id", False) and not stream.task_il:
        raise ConfigError(
            f"model={name} routes by task (model.task_routing=true) but a {stream.scenario} "
            "stream gives no task id at test time. Use benchmark.scenario=task-il (for a "
            "domain stream such as permuted_fashion_mnist: domain-il with task ids) or "
            "model.task_routing=false.")
    mask = task_mask(stream) if stream.task_il else None
    if mask is not None and bool((mask == 0).all()):
        mask = None
    return Classifier(backbone, stream.num_classes, len(stream) if heads == "multi" else 1, mask)


def _model_memory_bytes(model) -> int:
    """Per-task parts of the model (e.g. a task-routed MoM's memories), counted as memory."""
    fn = getattr(model, "memory_bytes", None)
    return int(fn()) if callable(fn) else 0


def build_strategy(cfg: dict) -> Strategy:
    name, kwargs = _split_name(cfg["strategy"], "strategy")
    strategy = registry.build("strategy", name, **kwargs)
    if not isinstance(strategy, Strategy):
        raise PluginError(f"Strategy {name!r} built a {type(strategy).__name__}, which does not "
                          "subclass cl_toolkit.strategy.Strategy; derive it from that class.")
    return strategy


def evaluate(strategy: Strategy, task: Task, batch_size: int, device: torch.device) -> float:
    """The primary score (the stream's metric) of ``strategy`` on ``task.test``."""
    kind = task_kind(strategy.stream.kind)
    return evaluate_scores(strategy, task, batch_size, device, kind)[kind.metric.key]


@torch.no_grad()
def evaluate_scores(strategy: Strategy, task: Task, batch_size: int, device: torch.device,
                    kind: TaskKind | None = None) -> dict[str, float]:
    """The task kind's scores of ``strategy.predict`` on ``task.test``, primary metric first
    (classification: ``{"accuracy"}``; tokens add ``"exact_match"``)."""
    stream = strategy.stream
    kind = kind or task_kind(stream.kind)
    model = getattr(strategy, "model", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    rows = kind.rows_per_batch(task.test.x, batch_size, stream)
    return kind.score(lambda x, t: strategy.predict(x.to(device), task), task.test, rows)


@torch.no_grad()
def model_task_scores(strategy: Strategy, batch_size: int, device: torch.device) -> dict:
    """Per-task figures the model reports beside the score matrix (its ``task_scores(stream,
    score)``, e.g. a task-routed MoM's router task inference), each recorded in
    ``results["extras"]`` as a matrix like an extra metric; {} for models without them."""
    model = getattr(strategy, "model", None)
    report = getattr(model, "task_scores", None)
    if not callable(report):
        return {}
    stream = strategy.stream
    kind = task_kind(stream.kind)

    def score(predict, task: Task) -> float:
        rows = kind.rows_per_batch(task.test.x, batch_size, stream)
        return kind.score(lambda x, _: predict(x.to(device)), task.test, rows)[kind.metric.key]

    model.eval()
    return report(stream, score)


def run_analyses(strategy: Strategy, stream: TaskStream, task: Task, batch_size: int,
                 device: torch.device) -> dict:
    """The stream's analyses of the model after ``task`` (see `cl_toolkit.stream`), keyed as
    in ``results["extras"]``; each gets a predictor of class ids (token ids ``[N, L]``, masks
    ``[N, T, H, W]``: the kind's `TaskKind.predicted`)."""
    kind = task_kind(stream.kind)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        rows = kind.rows_per_batch(x, batch_size, stream)
        return torch.cat([kind.predicted(strategy.predict(x[s:s + rows].to(device), task)).cpu()
                          for s in range(0, x.shape[0], rows)])

    model = getattr(strategy, "model", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    return {key: {"after_task": task.index, **analyse(predict)}
            for key, analyse in stream.analyses.items()}


def _rng_state(ctx: RunContext) -> dict:
    return {"torch": torch.get_rng_state(), "generator": ctx.generator.get_state(),
            "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict, ctx: RunContext) -> None:
    torch.set_rng_state(state["torch"])
    ctx.generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# What results["timings"] measures (recorded with it).
TIMINGS = ("train_s[t]: wall seconds of strategy.learn on task t, the training alone; eval_s[t]: "
           "scoring every task after task t; warmup_s: the one-time start-up of the process "
           "(torch's lazy import of torch._dynamo on the first optimizer, a first optimizer step "
           "on a throw-away tensor), timed before task 0 and counted in no train_s (summed over "
           "the starts of a resumed run)")


def run(cfg: dict, run_dir: str | Path, progress: Any = None, hooks=None) -> dict:
    """Run (or resume) one experiment described by the plain-dict config ``cfg``, holding the
    run directory's lock (``run.lock``): a second run into the same directory is refused with
    `cl_toolkit.store.RunLockedError` naming the holder."""
    with run_dir_locked(run_dir):
        return _run(cfg, run_dir, progress, hooks)


def _run(cfg: dict, run_dir: str | Path, progress: Any, hooks) -> dict:
    cfg = copy.deepcopy(cfg)
    if cfg.get("smoke"):
        cfg = smoke.shrink_config(cfg)
    store = RunStore(run_dir)
    if store.root.is_dir():
        remove_partial_files(store.root)
    resume = bool(cfg.get("resume", False))
    checkpoint = None
    if store.has_progress():
        if not resume and not cfg.get("overwrite", False):
            raise ResumeError(
                f"{store.root} already holds a run. Pass resume=true to continue it, "
                "overwrite=true to start it over, or choose another output directory."
            )
        if resume and store.checkpoint_path.exists():
            if store.results_path.exists():
                store.load_results()  # refuse a damaged results.json with a clear message
            checkpoint = store.load_checkpoint()
            old, new = checkpoint["config"], semantic_config(cfg)
            if old != new:
                raise ResumeError(_config_diff_message(store.root, old, new))

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    warmup_s = warm_up()  # before seeding: whatever it did could not reach the run's numbers
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    device = torch.device(cfg.get("device", "cpu"))
    stream = build_stream(cfg)
    if cfg.get("smoke"):
        stream = smoke.shrink_stream(stream, seed)
    check_compatible(cfg, stream.kind, stream.scenario)
    kind = task_kind(stream.kind)
    primary, extra_keys = kind.metric.key, [m.key for m in kind.extra_metrics]
    model = build_model(cfg, stream)
    strategy = build_strategy(cfg)
    probe = probes.build_probe(cfg)
    trainer = cfg.get("trainer") or {}
    precision, grad_clip = trainer.get("precision", "fp32"), trainer.get("grad_clip")
    check_settings(precision, grad_clip, device)
    ctx = RunContext(device=device, seed=seed, generator=torch.Generator().manual_seed(seed),
                     progress=progress, precision=precision, grad_clip=grad_clip)
    if hooks is not None:
        ctx.hooks = hooks
    probes.attach(probe, stream, ctx)
    _guard_plugin(strategy, "setup", lambda: strategy.setup(stream, model, ctx))
    probes.check_run(probe, stream, strategy)
    eval_bs = int(cfg.get("eval_batch_size", 1024))
    T = len(stream)
    sinks = tracking.open_sinks(cfg, store.root)
    tracking.attach_step_logging(sinks, ctx.hooks, int(cfg.get("log_every") or 10))

    if checkpoint is not None:
        strategy.load_state_dict(checkpoint["strategy"])
        _set_rng_state(checkpoint["rng"], ctx)
        if probe is not None:
            probe.load_state_dict(checkpoint.get("probe"))
        state = checkpoint["state"]
        state.setdefault("code", [])
        if not state["code"] or not same_code(state["code"][-1], code_version()):
            if state["code"]:
                print(f"warning: resuming {store.root}, whose finished tasks were computed by "
                      f"{describe_code(state['code'][-1])}; this is {describe_code(code_version())}"
                      ". results.json records both; pass overwrite=true to recompute all tasks "
                      "with this code.", flush=True)
            state["code"].append(code_version())
    else:
        before = [evaluate_scores(strategy, t, eval_bs, device, kind) for t in stream]
        state = {"before": [s[primary] for s in before], "matrix": [], "train_s": [],
                 "eval_s": [], "memory": [], "code": [code_version()]}
        if extra_keys:
            state["extras"] = {k: {"before": [s[k] for s in before], "matrix": []}
                               for k in extra_keys}
        for k, values in model_task_scores(strategy, eval_bs, device).items():
            state.setdefault("extras", {})[k] = {"before": values, "matrix": []}

    state["warmup_s"] = state.get("warmup_s", 0.0) + warmup_s
    if progress is not None:
        progress.start(stream, strategy, start=len(state["matrix"]))
    for task in stream.tasks[len(state["matrix"]):]:
        if progress is not None:
            progress.task_started(task)
        ctx.hooks.call("before_task", strategy=strategy, task=task)
        t0 = time.perf_counter()
        _guard_plugin(strategy, f"learn (task {task.index})", lambda: strategy.learn(task))
        t1 = time.perf_counter()
        scores = [evaluate_scores(strategy, other, eval_bs, device, kind) for other in stream]
        row = [s[primary] for s in scores]
        for k in extra_keys:
            state["extras"][k]["matrix"].append([s[k] for s in scores])
        if stream.analyses:
            state.setdefault("extras", {}).update(
                run_analyses(strategy, stream, task, eval_bs, device))
        for k, values in model_task_scores(strategy, eval_bs, device).items():
            state.setdefault("extras", {}).setdefault(k, {"before": values, "matrix": []})[
                "matrix"].append(values)  # setdefault: a checkpoint from before the figure
        t2 = time.perf_counter()
        ctx.hooks.call("after_task", strategy=strategy, task=task)
        state["matrix"].append(row)
        state["train_s"].append(t1 - t0)
        state["eval_s"].append(t2 - t1)
        state["memory"].append(int(strategy.memory_bytes()) + _model_memory_bytes(model))
        results = probes.add_results(_results(cfg, stream, strategy, model, state, T), probe)
        store.commit(results, {"format": FORMAT, "config": semantic_config(cfg),
                               "strategy": strategy.state_dict(), "rng": _rng_state(ctx),
                               "state": state,
                               "probe": None if probe is None else probe.state_dict()})
        for sink in sinks:
            sink.log_task(results, task.index)
        if progress is not None:
            progress.task_done(task, row)
    if progress is not None:
        progress.finish()
    results = probes.add_results(_results(cfg, stream, strategy, model, state, T), probe)
    for sink in sinks:
        sink.close(results)
    return results


def _results(cfg, stream, strategy, model, state, T) -> dict:
    R = np.asarray(state["matrix"], dtype=np.float64)
    kind = task_kind(stream.kind)
    k = R.shape[0]
    square = R[:, :k]
    skip = metrics.not_applicable(stream.scenario, getattr(strategy, "not_applicable", None))
    return {
        "format": FORMAT,
        "status": "done" if k == T else "running",
        "finished_tasks": k,
        "config": cfg,
        "stream": stream.describe(),
        "strategy": cfg["strategy"]["name"],
        "model_params": sum(p.numel() for p in model.parameters()),
        "metric": kind.metric.describe(),
        "extra_metrics": [m.describe() for m in kind.extra_metrics],
        "before": state["before"],
        "matrix": state["matrix"],
        "metrics": metrics.summary(square, state["before"][:k], skip,
                                   kind.metric.higher_is_better),
        "not_applicable": skip,
        "memory_bytes": state["memory"],
        "reference": strategy.reference_accuracy(),
        "timings": {"train_s": state["train_s"], "eval_s": state["eval_s"],
                    "warmup_s": state.get("warmup_s", 0.0), "measures": TIMINGS},
        **({"hyperparameters": strategy.hyperparameters()}
           if hasattr(strategy, "hyperparameters") else {}),
        "code": state.get("code", [code_version()])[-1],
        **({"code_history": state["code"]} if len(state.get("code", [])) > 1 else {}),
        **({"extras": state["extras"]} if state.get("extras") else {}),
    }


def _guard_plugin(strategy: Strategy, what: str, fn) -> None:
    """Built-in strategies raise as they are; a third-party strategy's exception is wrapped so
    the message says whose code failed."""
    module = type(strategy).__module__
    if module.startswith("cl_toolkit."):
        fn()
        return
    try:
        fn()
    except ClToolkitError:
        raise
    except Exception as exc:
        raise PluginError(
            f"Strategy plugin {type(strategy).__name__} ({module}) raised in {what}: "
            f"{type(exc).__name__}: {exc}. Results of the tasks finished before it are saved; "
            "fix the plugin and rerun with resume=true."
        ) from exc


def _config_diff_message(root, old: dict, new: dict) -> str:
    diffs = []

    def walk(a, b, prefix=""):
        for key in sorted(set(a) | set(b), key=str):
            va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{key}.")
            elif va != vb:
                diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")

    walk(old, new)
    return (f"Refusing to resume {root}: its config differs from this one "
            f"({'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}). Resume with the "
            "original config, or choose another output directory for the new one.")
