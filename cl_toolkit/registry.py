"""Explicit registries: one table per kind, name -> "module:attribute", imported lazily.

Nothing registers itself by import side effect: the tables below list every built-in, and
installed third-party packages add entries through the entry-point groups in `GROUPS`, e.g. in a
plugin's pyproject.toml::

    [project.entry-points."cl_toolkit.strategies"]
    my_method = "my_package.module:MyStrategy"

after which ``cltk run strategy=my_method`` works.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import ConfigError, PluginError, suggest, unknown_name

BUILTINS: dict[str, dict[str, str]] = {
    "strategy": {
        "naive": "cl_toolkit.strategies.naive:Naive",
        "joint": "cl_toolkit.strategies.joint:Joint",
        "replay": "cl_toolkit.strategies.replay:Replay",
        "avalanche": "cl_toolkit.strategies.avalanche:AvalancheStrategy",
        "kcl": "cl_toolkit.strategies.kcl:KCL",
        "gkcl": "cl_toolkit.strategies.gkcl:GKCL",
        "merge_average": "cl_toolkit.merging.strategies:MergeAverage",
        "merge_ta": "cl_toolkit.merging.strategies:MergeTA",
        "merge_ties": "cl_toolkit.merging.strategies:MergeTIES",
        "opcm": "cl_toolkit.merging.strategies:OPCM",
        "atlas": "cl_toolkit.merging.strategies:ATLAS",
    },
    "stream": {
        "split_digits": "cl_toolkit.benchmarks.digits:split_digits",
        "split_fashion_mnist": "cl_toolkit.benchmarks.fashion_mnist:split_fashion_mnist",
        "permuted_fashion_mnist": "cl_toolkit.benchmarks.fashion_mnist:permuted_fashion_mnist",
        "rotated_fashion_mnist": "cl_toolkit.benchmarks.fashion_mnist:rotated_fashion_mnist",
        "split_cifar100": "cl_toolkit.benchmarks.cifar100:split_cifar100",
        "avalanche": "cl_toolkit.benchmarks.avalanche_adapter:avalanche_stream",
        "clip_tasks": "cl_toolkit.benchmarks.clip_tasks:clip_stream",
        "mqar": "cl_toolkit.benchmarks.mqar:mqar_stream",
        "kv_interference": "cl_toolkit.benchmarks.kv_interference:kv_interference_stream",
        "fortunes": "cl_toolkit.benchmarks.fortunes:fortunes",
    },
    "model": {
        "mlp": "cl_toolkit.models:MLP",
        "cnn": "cl_toolkit.models:SmallCNN",
        "resnet18_reduced": "cl_toolkit.models:ReducedResNet18",
        "mom": "cl_toolkit.kernels.backbones:mom_backbone",
        "gdn": "cl_toolkit.kernels.backbones:gdn_backbone",
        "gla": "cl_toolkit.kernels.backbones:gla_backbone",
        "transformer": "cl_toolkit.kernels.backbones:transformer_backbone",
        "clip": "cl_toolkit.benchmarks.clip_tasks:clip_classifier",
        "mom_lm": "cl_toolkit.lm:mom_lm",
        "gdn_lm": "cl_toolkit.lm:gdn_lm",
        "gla_lm": "cl_toolkit.lm:gla_lm",
        "transformer_lm": "cl_toolkit.lm:transformer_lm",
    },
    "probe": {
        "retention": "cl_toolkit.retention:RetentionProbe",
    },
}

GROUPS = {
    "strategy": "cl_toolkit.strategies",
    "stream": "cl_toolkit.streams",
    "model": "cl_toolkit.models",
    "probe": "cl_toolkit.probes",
}


def _plugins(kind: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def names(kind: str) -> list[str]:
    """Every name usable for ``kind``: built-ins first, then installed plugins."""
    return sorted(set(BUILTINS[kind]) | set(_plugins(kind)))


def resolve(kind: str, name: str) -> Any:
    """The class or function registered as ``name``; clear errors for unknown names and for
    plugins that fail to import."""
    if kind not in BUILTINS:
        raise ValueError(f"Unknown registry kind {kind!r}; use one of {sorted(BUILTINS)}.")
    if name in BUILTINS[kind]:
        module, attr = BUILTINS[kind][name].split(":")
        return getattr(importlib.import_module(module), attr)
    plugins = _plugins(kind)
    if name in plugins:
        try:
            return plugins[name].load()
        except Exception as exc:
            raise PluginError(
                f"The {kind} plugin {name!r} ({plugins[name].value}, entry-point group "
                f"{GROUPS[kind]!r}) failed to load: {type(exc).__name__}: {exc}. Fix or "
                "uninstall the package that provides it."
            ) from exc
    raise unknown_name(kind, name, names(kind))


def accepted_kwargs(fn: Callable) -> list[str] | None:
    """Keyword names ``fn`` accepts; for a class whose ``__init__`` forwards ``**kwargs`` to its
    parent, the parents' names too. ``None`` when anything goes."""
    inits = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if isinstance(fn, type) \
        else [fn]
    names: list[str] = []
    for init in inits:
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self"
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def check_kwargs(fn: Callable, kwargs: dict, where: str) -> None:
    """Refuse keyword arguments that ``fn`` does not take, naming the closest valid ones."""
    valid = accepted_kwargs(fn)
    if valid is None:
        return
    for key in kwargs:
        if key not in valid:
            raise ConfigError(
                f"Unknown config key {where}.{key}.{suggest(key, valid)} Valid keys for "
                f"{where}: {', '.join(valid)}."
            )


def build(kind: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Resolve ``name`` and call it with checked keyword arguments."""
    target = resolve(kind, name)
    check_kwargs(target, kwargs, kind)
    try:
        return target(*args, **kwargs)
    except (ConfigError, PluginError):
        raise
    except Exception as exc:
        if name in BUILTINS[kind]:
            raise
        raise PluginError(
            f"The {kind} plugin {name!r} raised {type(exc).__name__}: {exc} while being built."
        ) from exc
