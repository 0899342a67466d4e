"""Check a composed config by type and range before anything runs.

Types come from the one source of truth, the signature of each name's target
(`registry.signature_defaults`): a parameter whose default is an int takes an int, a list takes a
list, and so on. Ranges are declared by the parameter's owner, next to its signature: a
strategy, model or stream builder (class or function) may carry

    ranges = {"buffer_size": at_least(0), "momentum": between(0, 1)}   # checked here
    smoke = {"buffer_size": 8}                                        # cl_toolkit/smoke.py

(a class inherits its bases' entries and overrides them; a function sets them as attributes,
``mqar_stream.ranges = {...}``), plus, for relations between its keys that no single range can
say, a ``check_config(node, cfg)`` that raises `ConfigError`. `SHARED_RANGES` covers the few
keys every strategy and stream shares (``lr`` > 0 wherever it appears); an owner's entry wins.
Each failure is a `ConfigError` naming the key, the value and a valid example, so ``cltk``
prints it as one paragraph with exit code 2.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import registry
from .config import SCENARIOS
from .errors import ConfigError, suggest


@dataclass(frozen=True)
class Range:
    """The values one parameter takes: numbers within bounds (every item of a list, which must
    hold at least ``min_items``), or one of ``choices``. ``None`` always passes (it means "the
    default"). ``note`` says why, at the end of the error. Made by `at_least`, `above`,
    `between` and `one_of`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    min_items: int = 0
    note: str = ""

    def span(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        return " and ".join(s for s in (low, high) if s)

    def outside(self, v: float) -> bool:
        return (isinstance(v, float) and not math.isfinite(v)) or (
            self.low is not None and (v <= self.low if self.low_open else v < self.low)) or (
            self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def check(self, full: str, value: Any, example: Any = None) -> None:
        why = f" ({self.note})" if self.note else ""
        if self.choices:
            if value not in self.choices:
                names = [str(c) for c in self.choices]
                close = suggest(value, names) if isinstance(value, str) else ""
                good = example if example in self.choices else self.choices[0]
                raise ConfigError(f"{full}={value!r} is not one of {', '.join(names)}{why}."
                                  f"{close} Set {full}={good}, for example.")
            return
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(values) < self.min_items:
            many = "one value" if self.min_items == 1 else f"{self.min_items} values"
            raise ConfigError(f"{full} must hold at least {many}; got {list(value)}{why}. Set "
                              f"it like {_example(full, example)}.")
        usable = example if example not in (None, "???") else 1
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{full} must be a number; got {value!r}. Set it like "
                                  f"{_example(full, usable)}.")
            if self.outside(v):
                finite = "a finite number " if isinstance(v, float) and not math.isfinite(v) \
                    else ""
                hint = f", e.g. {_example(full, example)}" if example not in (None, "???") \
                    and not isinstance(example, (list, tuple)) else ""
                raise ConfigError(f"{full} must be {finite}{self.span()}; got {value!r}{why}. "
                                  f"Choose a value in range{hint}.")


def at_least(low: float, *, min_items: int = 0, note: str = "") -> Range:
    """``value >= low`` (each item of a list)."""
    return Range(low=low, min_items=min_items, note=note)


def above(low: float, *, note: str = "") -> Range:
    """``value > low``."""
    return Range(low=low, low_open=True, note=note)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
            note: str = "") -> Range:
    """``low <= value <= high``; ``low_open`` / ``high_open`` exclude the bound."""
    return Range(low=low, high=high, low_open=low_open, high_open=high_open, note=note)


def one_of(*choices: Any, note: str = "") -> Range:
    """One of ``choices`` (a misspelt value gets a "did you mean")."""
    return Range(choices=tuple(choices), note=note)


# Keys every strategy (the optimiser of `SupervisedStrategy`, KCL, merging, Avalanche) or every
# stream shares; an owner's declaration of the same key wins.
SHARED_RANGES = {
    "lr": above(0), "batch_size": at_least(1), "epochs": at_least(0),
    "momentum": between(0, 1), "weight_decay": at_least(0), "lr_decay": above(0),
    "optimizer": one_of("sgd", "adam", "adamw"), "scenario": one_of(*SCENARIOS),
    "heads": one_of("single", "multi"),  # the runner's own key of every model node
}
# The top-level keys: their types (the default) and ranges.
TOP_TYPES = {"seed": 0, "threads": None, "eval_batch_size": 1024, "device": "cpu",
             "resume": False, "overwrite": False, "quiet": False, "output_root": "runs",
             "smoke": False, "tensorboard": False, "csv": False, "wandb": False,
             "mlflow": False, "log_every": 10}
TOP_RANGES = {"threads": at_least(1), "eval_batch_size": at_least(1)}
NODES = (("stream", "benchmark"), ("model", "model"), ("strategy", "strategy"))


def declared(target: Any, attribute: str) -> dict:
    """The owner's declaration ``attribute`` (``"ranges"`` or ``"smoke"``): a class merges those
    of its bases (the subclass's entry wins), a function carries its own."""
    out: dict = {}
    for owner in (reversed(target.__mro__) if isinstance(target, type) else [target]):
        out.update(getattr(owner, "__dict__", {}).get(attribute) or {})
    return out


def ranges_of(target: Any) -> dict[str, Range]:
    """Every range that applies to a node of ``target``: the shared ones, then its own."""
    return {**SHARED_RANGES, **declared(target, "ranges")}


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


def check_value(where: str, key: str, value: Any, example: Any = None,
                rule: Range | None = None) -> None:
    """Type against ``example`` (the signature's default), then ``rule`` (the key's range)."""
    full = f"{where}.{key}" if where else key
    if value is None:
        return
    if example is not None and example != "???" and not _matches(value, example):
        raise ConfigError(
            f"{full} must be {_type_name(example)}; got {value!r} ({type(value).__name__}). "
            f"Set it like {_example(full, example)}."
        )
    if rule is not None:
        rule.check(full, value, example)


def check_node(kind: str, group: str, node: Any, cfg: dict | None = None) -> None:
    """Keys, types and ranges of one config node, then its owner's ``check_config(node, cfg)``
    (relations between keys, e.g. a width its heads divide; ``node`` has every default filled
    in, ``cfg`` is the whole config)."""
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
    ranges = ranges_of(target)
    for key, value in node.items():
        if key != "name":
            check_value(group, key, value, defaults.get(key), ranges.get(key))
    if kind == "strategy" and node.get("epochs") == 0 and not getattr(target, "zero_epochs_ok",
                                                                         False):
        from .strategy import SupervisedStrategy
        from .strategies.avalanche import AvalancheStrategy

        if isinstance(target, type) and issubclass(target, (SupervisedStrategy,
                                                            AvalancheStrategy)):
            raise ConfigError(f"strategy.epochs=0 trains nothing, so the run would report "
                              f"untrained accuracy as a result. Set strategy.epochs to 1 or more "
                              f"(its default is {defaults.get('epochs')}).")
    check = getattr(target, "check_config", None)
    if callable(check):
        check({**defaults, **node}, cfg or {})


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


def check_model_kind(model: str, kind: str, benchmark: str) -> None:
    """Refuse a model for a stream of a task kind it does not take: a model that declares
    ``task_kinds`` takes those only; one that declares none takes every kind an image or token
    classifier can (all but those marked ``needs_own_model``, e.g. market cross-sections)."""
    from .task_kinds import task_kind

    def takes(name: str) -> bool:
        declared = getattr(registry.resolve("model", name), "task_kinds", None)
        return kind in declared if declared else not task_kind(kind).needs_own_model

    if takes(model):
        return
    fits = [n for n in registry.names("model") if takes(n)]
    declared = getattr(registry.resolve("model", model), "task_kinds", None)
    what = f"it takes {', '.join(declared)}" if declared else "it classifies images or tokens"
    raise ConfigError(f"benchmark {benchmark!r} holds {kind} tasks, which model={model} cannot "
                      f"take ({what}); use {', '.join(f'model={n}' for n in fits[:6]) or 'a model for them'}"
                      f"{', ...' if len(fits) > 6 else ''}.")


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
            f"{', '.join(registry.strategies_declaring('task_kinds', {kind})) or 'none built in'}.")
    model = cfg.get("model")
    if isinstance(model, dict) and "name" in model:
        declared = getattr(registry.resolve("model", model["name"]), "task_kinds", None)
        if kind is not None or declared:  # an undeclared builder holds images or tokens
            check_model_kind(model["name"], kind or "classification", cfg["benchmark"]["name"])
    if scenario is not None and scenario not in strategy.scenarios:
        raise ConfigError(
            f"strategy={name} does not support the {scenario} scenario (benchmark="
            f"{cfg['benchmark']['name']}); it supports {', '.join(strategy.scenarios)}.")
    probe = cfg.get("probe")
    if isinstance(probe, dict) and "name" in probe:
        probes.check_compatible(registry.resolve("probe", probe["name"]), strategy, name)


def check_config(cfg: dict) -> None:
    """Raise `ConfigError` for the first value of ``cfg`` that cannot run."""
    for key, example in TOP_TYPES.items():
        if key in cfg:
            check_value("", key, cfg[key], example, TOP_RANGES.get(key))
    if "device" in cfg:  # before the nodes: a model checks its backend against the device
        check_device(cfg["device"])
    for kind, group in NODES:
        if group in cfg:
            check_node(kind, group, cfg[group], cfg)
    if cfg.get("probe") is not None:  # a probe checks its settings when built (loads nothing)
        from .probes import build_probe

        build_probe(cfg)
    if "trainer" in cfg:
        check_trainer(cfg["trainer"], cfg.get("device", "cpu"))
    if "output_root" in cfg:
        check_output_root(cfg["output_root"])
    if "strategy" in cfg and "benchmark" in cfg:
        check_compatible(cfg)
