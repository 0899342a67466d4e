"""Check a composed config by type and range before anything runs.

Types come from the one source of truth, the signature of each name's target
(`registry.signature_defaults`): a parameter whose default is an int takes an int, a list takes a
list, and so on. Ranges are by key name, shared by every strategy, model and stream that uses the
key (``lr`` > 0 wherever it appears). Each failure is a `ConfigError` naming the key, the value
and a valid example, so ``cltk`` prints it as one paragraph with exit code 2.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from . import registry
from .config import SCENARIOS
from .errors import ConfigError, suggest

# key -> (low, low inclusive, high, high inclusive); None values always pass (they mean "default").
RANGES: dict[str, tuple] = {
    "lr": (0, False, None, False), "pretrain_lr": (0, False, None, False),
    "generator_lr": (0, False, None, False), "coef_lr": (0, False, None, False),
    "batch_size": (1, True, None, False), "eval_batch_size": (1, True, None, False),
    "replay_batch_size": (1, True, None, False), "generator_batch_size": (1, True, None, False),
    "coef_batch_size": (1, True, None, False),
    "epochs": (0, True, None, False), "pretrain_epochs": (0, True, None, False),
    "generator_epochs": (0, True, None, False), "coef_steps": (0, True, None, False),
    "buffer_size": (0, True, None, False), "n_tasks": (1, True, None, False),
    "momentum": (0, True, 1, True), "dropout": (0, True, 1, False),
    "weight_decay": (0, True, None, False), "lr_decay": (0, False, None, False),
    "lr_min": (0, True, None, False), "density": (0, False, 1, True),
    "max_train_per_task": (1, True, None, False), "max_test_per_task": (1, True, None, False),
    "threads": (1, True, None, False),
}
CHOICES = {"scenario": SCENARIOS, "optimizer": ("sgd", "adam", "adamw"),
           "heads": ("single", "multi")}
TOP_TYPES = {"seed": 0, "threads": None, "eval_batch_size": 1024, "device": "cpu",
             "resume": False, "overwrite": False, "quiet": False, "output_root": "runs",
             "smoke": False, "tensorboard": False, "csv": False, "wandb": False,
             "mlflow": False, "log_every": 10}
NODES = (("stream", "benchmark"), ("model", "model"), ("strategy", "strategy"))


def _type_name(example: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}[type(example)]


def _matches(value: Any, example: Any) -> bool:
    if isinstance(example, bool):
        return isinstance(value, bool)
    if isinstance(example, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(example, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(example, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        return not example or all(_matches(v, example[0]) for v in value)
    if isinstance(example, dict):
        return isinstance(value, dict)
    if isinstance(example, str):
        return isinstance(value, str)
    return True


def _example(key: str, example: Any) -> str:
    text = str(example).lower() if isinstance(example, bool) else str(list(example)) \
        if isinstance(example, (list, tuple)) else str(example)
    return f"{key}={text}"


def check_value(where: str, key: str, value: Any, example: Any = None) -> None:
    """Type against ``example`` (the signature's default), then range and choices by key."""
    full = f"{where}.{key}" if where else key
    if value is None:
        return
    if example is not None and example != "???" and not _matches(value, example):
        raise ConfigError(
            f"{full} must be {_type_name(example)}; got {value!r} ({type(value).__name__}). "
            f"Set it like {_example(full, example)}."
        )
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(
            f"{full}={value!r} is not one of {', '.join(CHOICES[key])}.{suggest(value, CHOICES[key])}"
            f" Set {full}={CHOICES[key][0]}, for example."
        )
    if key in RANGES:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{full} must be a number; got {value!r}. Set it like "
                                  f"{_example(full, example if example not in (None, '???') else 1)}.")
            lo, lo_in, hi, hi_in = RANGES[key]
            bad = (lo is not None and (v < lo if lo_in else v <= lo)) or \
                (hi is not None and (v > hi if hi_in else v >= hi)) or \
                (isinstance(v, float) and not math.isfinite(v))
            if bad:
                low = "" if lo is None else f"{'>=' if lo_in else '>'} {lo}"
                high = "" if hi is None else f"{'<=' if hi_in else '<'} {hi}"
                span = " and ".join(s for s in (low, high) if s)
                hint = f", e.g. {_example(full, example)}" if example not in (None, "???") \
                    and not isinstance(example, (list, tuple)) else ""
                raise ConfigError(f"{full} must be {span}; got {value!r}. Choose a value in "
                                  f"range{hint}.")


def check_node(kind: str, group: str, node: Any) -> None:
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"The {group} config needs a 'name' key (one of "
                          f"{', '.join(registry.names(kind))}); got {node!r}. Select one with "
                          f"{group}=NAME.")
    target = registry.resolve(kind, node["name"])
    defaults = registry.signature_defaults(kind, target)
    valid = registry.accepted_kwargs(target)
    if valid is not None:
        allowed = (set(defaults) | set(valid)) - registry.supplied_params(kind, target)
        for key in node:
            if key != "name" and key not in allowed:
                raise ConfigError(
                    f"Unknown config key {group}.{key}.{suggest(key, sorted(allowed))} Valid keys "
                    f"of {group} {node['name']!r}: {', '.join(sorted(allowed))}.")
    for key, value in node.items():
        if key != "name":
            check_value(group, key, value, defaults.get(key))
    if kind == "strategy" and node.get("epochs") == 0 and not getattr(target, "zero_epochs_ok",
                                                                         False):
        from .strategy import SupervisedStrategy
        from .strategies.avalanche import AvalancheStrategy

        if isinstance(target, type) and issubclass(target, (SupervisedStrategy,
                                                            AvalancheStrategy)):
            raise ConfigError(f"strategy.epochs=0 trains nothing, so the run would report "
                              f"untrained accuracy as a result. Set strategy.epochs to 1 or more "
                              f"(its default is {defaults.get('epochs')}).")


def check_device(device: Any) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device. Use device=cpu, "
                          "device=cuda (or cuda:N) or device=mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA GPU "
                          "(torch.cuda.is_available() is False). Use device=cpu, or run where a "
                          "GPU and a CUDA build of torch are present.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but only {torch.cuda.device_count()} GPU(s) are "
                          "visible. Use device=cuda:0 or check CUDA_VISIBLE_DEVICES.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but the MPS backend is not available here; use "
                          "device=cpu.")


def check_output_root(root: Any) -> None:
    """The first existing directory on the way to ``root`` must be a writable directory."""
    path = Path(str(root)).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output_root={root}: {probe} is a file, not a directory. Point "
                          "output_root at a directory (it is created if missing).")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_root={root}: {probe} is not writable by this user. Choose a "
                          "writable directory, e.g. output_root=$HOME/runs.")


def check_trainer(node: Any, device: Any) -> None:
    import torch

    from .trainer import check_settings

    if not isinstance(node, dict) or set(node) - {"precision", "grad_clip"}:
        raise ConfigError(f"trainer must be a mapping with keys precision and grad_clip; got "
                          f"{node!r}. Set e.g. trainer.precision=fp32 trainer.grad_clip=1.0.")
    check_value("trainer", "grad_clip", node.get("grad_clip"), 1.0)
    check_settings(node.get("precision", "fp32"), node.get("grad_clip"), torch.device(device))


def check_compatible(cfg: dict, kind: str | None = None, scenario: str | None = None) -> None:
    """Refuse a strategy that does not support the stream's task kind or scenario, and a probe
    whose required capabilities the strategy lacks; read from the classes' declarations, so
    nothing is built. ``kind`` defaults to what the stream builder declares (its attribute
    ``task_kind``; a builder that declares none is checked by the runner once built)."""
    from . import probes

    name = cfg["strategy"]["name"]
    strategy = registry.resolve("strategy", name)
    if kind is None:
        kind = getattr(registry.resolve("stream", cfg["benchmark"]["name"]), "task_kind", None)
    if kind is not None and kind not in strategy.task_kinds:
        raise ConfigError(
            f"strategy={name} cannot learn {kind} tasks (benchmark={cfg['benchmark']['name']}); "
            f"it supports {', '.join(strategy.task_kinds)}. Strategies for {kind} tasks: "
            f"{', '.join(_strategies_for('task_kinds', kind)) or 'none built in'}.")
    if scenario is not None and scenario not in strategy.scenarios:
        raise ConfigError(
            f"strategy={name} does not support the {scenario} scenario (benchmark="
            f"{cfg['benchmark']['name']}); it supports {', '.join(strategy.scenarios)}.")
    probe = cfg.get("probe")
    if isinstance(probe, dict) and "name" in probe:
        probes.check_compatible(registry.resolve("probe", probe["name"]), strategy, name)


def _strategies_for(attribute: str, value: str) -> list[str]:
    out = []
    for n in registry.names("strategy"):
        try:
            if value in getattr(registry.resolve("strategy", n), attribute, ()):
                out.append(n)
        except Exception:  # a plugin that fails to import is reported where it is selected
            continue
    return out


def check_config(cfg: dict) -> None:
    """Raise `ConfigError` for the first value of ``cfg`` that cannot run."""
    for key, example in TOP_TYPES.items():
        if key in cfg:
            check_value("", key, cfg[key], example)
    for kind, group in NODES:
        if group in cfg:
            check_node(kind, group, cfg[group])
    if "device" in cfg:
        check_device(cfg["device"])
    if "trainer" in cfg:
        check_trainer(cfg["trainer"], cfg.get("device", "cpu"))
    if "output_root" in cfg:
        check_output_root(cfg["output_root"])
    if "strategy" in cfg and "benchmark" in cfg:
        check_compatible(cfg)
