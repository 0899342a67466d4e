"""Explicit registries: one table per kind, name -> "module:attribute", imported lazily.

Nothing registers itself by import side effect: the tables below list every built-in, and
installed third-party packages add entries through the entry-point groups in `GROUPS`, e.g. in a
plugin's pyproject.toml::

    [project.entry-points."cl_toolkit.strategies"]
    my_method = "my_package.module:MyStrategy"

after which ``cltk run strategy=my_method`` works.

One source of truth for what a name runs with: the signature of its target. Every built-in name
has ``conf/<group>/<name>.yaml`` listing every parameter of that signature (tests/test_registry.py
checks it both ways), so ``cltk run --cfg job`` shows every default in effect; a plugin without a
YAML gets its config node generated from the signature (`signature_defaults`), and a plugin can
ship YAML files of its own through the entry-point group ``cl_toolkit.configs``.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import ClToolkitError, ConfigError, PluginError, suggest, unknown_name

BUILTINS: dict[str, dict[str, str]] = {
    "strategy": {
        "naive": "cl_toolkit.strategies.naive:Naive",
        "joint": "cl_toolkit.strategies.joint:Joint",
        "replay": "cl_toolkit.strategies.replay:Replay",
        "avalanche": "cl_toolkit.strategies.avalanche:AvalancheStrategy",
        "kcl": "cl_toolkit.strategies.kcl:KCL",
        "gkcl": "cl_toolkit.strategies.gkcl:GKCL",
        "merge_average": "cl_toolkit.merging.average:MergeAverage",
        "merge_ta": "cl_toolkit.merging.task_arithmetic:MergeTA",
        "merge_ties": "cl_toolkit.merging.ties:MergeTIES",
        "merge_ties_fusionbench": "cl_toolkit.merging.ties:MergeTIESFusionBench",
        "opcm": "cl_toolkit.merging.opcm:OPCM",
        "atlas": "cl_toolkit.merging.atlas:ATLAS",
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
        "synthetic_market": "cl_toolkit.benchmarks.market:synthetic_market",
        "qlib_market": "cl_toolkit.benchmarks.qlib_data:qlib_market",
        "french_portfolios": "cl_toolkit.benchmarks.french:french_portfolios",
        "echo_phantom": "cl_toolkit.benchmarks.echo_phantom:echo_phantom",
        "moving_fashion_mnist": "cl_toolkit.benchmarks.moving_fashion_mnist:moving_fashion_mnist",
        "camus": "cl_toolkit.benchmarks.echo_data:camus",
        "echonet_dynamic": "cl_toolkit.benchmarks.echo_data:echonet_dynamic",
        "sp500_stocks": "cl_toolkit.benchmarks.sp500:sp500_stocks",
    },
    "model": {
        "mlp": "cl_toolkit.models.image:MLP",
        "cnn": "cl_toolkit.models.image:SmallCNN",
        "resnet18_reduced": "cl_toolkit.models.image:ReducedResNet18",
        "resnet18_reduced_kcl": "cl_toolkit.models.image:KCLReducedResNet18",
        "mom": "cl_toolkit.models.sequence:mom_backbone",
        "gdn": "cl_toolkit.models.sequence:gdn_backbone",
        "gla": "cl_toolkit.models.sequence:gla_backbone",
        "transformer": "cl_toolkit.models.sequence:transformer_backbone",
        "clip": "cl_toolkit.models.clip:clip_classifier",
        "mom_lm": "cl_toolkit.models.language:mom_lm",
        "gdn_lm": "cl_toolkit.models.language:gdn_lm",
        "gla_lm": "cl_toolkit.models.language:gla_lm",
        "transformer_lm": "cl_toolkit.models.language:transformer_lm",
        "hf_lm": "cl_toolkit.models.hf_lm:hf_lm",
        "mtmd": "cl_toolkit.models.market:mtmd",
        "hist": "cl_toolkit.models.market:hist",
        "gru": "cl_toolkit.models.market:gru",
        "window_mlp": "cl_toolkit.models.market:window_mlp",
        "gdkvm": "cl_toolkit.models.video:gdkvm",
        "linear_kvm": "cl_toolkit.models.video:linear_kvm",
        "stm": "cl_toolkit.models.video:stm",
        "frame_unet": "cl_toolkit.models.video:frame_unet",
    },
    "task_kind": {
        "classification": "cl_toolkit.task_kinds:Classification",
        "tokens": "cl_toolkit.task_kinds:Tokens",
        "cross_section": "cl_toolkit.task_kinds:CrossSection",
        "segmentation": "cl_toolkit.task_kinds:Segmentation",
    },
    "probe": {
        "retention": "cl_toolkit.probes.retention:RetentionProbe",
    },
    "context": {
        "none": "cl_toolkit.context.policies:NoContext",
        "oracle": "cl_toolkit.context.policies:Oracle",
        "recency": "cl_toolkit.context.policies:Recency",
        "learned": "cl_toolkit.context.policies:Learned",
    },
    # Keyed by the results["extras"] key each draws in the report (see cl_toolkit.renderers).
    "renderer": {
        "exact_match": "cl_toolkit.renderers.tokens:render_exact_match",
        "mqar": "cl_toolkit.renderers.tokens:render_mqar",
        "kv_interference": "cl_toolkit.renderers.tokens:render_kv_interference",
        "retention": "cl_toolkit.renderers.retention:render",
        "segmentation_examples": "cl_toolkit.renderers.segmentation:render",
    },
}

GROUPS = {
    "strategy": "cl_toolkit.strategies",
    "stream": "cl_toolkit.streams",
    "model": "cl_toolkit.models",
    "probe": "cl_toolkit.probes",
    "context": "cl_toolkit.contexts",
    "renderer": "cl_toolkit.renderers",
    "task_kind": "cl_toolkit.task_kinds",
}

# Kinds that no config group selects (no conf/<group>/, no ``<group>=NAME``): a renderer is
# chosen by the results["extras"] key it draws, a task kind by the stream.
NO_CONFIG_GROUP = frozenset({"renderer", "task_kind"})
# The Hydra config group of each kind (a kind missing here uses its own name as its group).
CONFIG_GROUPS = {"strategy": "strategy", "stream": "benchmark", "model": "model",
                 "context": "context"}
# Entry-point group whose values name packages of YAML config groups shipped by plugins, e.g.
#     [project.entry-points."cl_toolkit.configs"]
#     my_package = "my_package.conf"     # holds strategy/my_method.yaml, benchmark/...
CONFIG_PACKAGES = "cl_toolkit.configs"
# Config keys the runner consumes itself, with their defaults (not parameters of the target).
RUNNER_KEYS = {"stream": {"shuffle_tasks": False}, "model": {"heads": "single"}}


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


def config_kinds() -> list[str]:
    """The kinds a run selects through a Hydra config group (every kind but
    `NO_CONFIG_GROUP`): what ``cltk list`` shows and what has ``conf/<group>/<name>.yaml``."""
    return [k for k in BUILTINS if k not in NO_CONFIG_GROUP]


def strategies_declaring(attribute: str, values) -> list[str]:
    """Strategy names whose class attribute ``attribute`` (``task_kinds``, ``capabilities``,
    ...) holds every one of ``values``; a plugin that fails to import is left out here and
    reported where it is selected."""
    out = []
    for name in names("strategy"):
        try:
            target = resolve("strategy", name)
        except (ClToolkitError, ImportError):
            continue
        if set(values) <= set(getattr(target, attribute, ())):
            out.append(name)
    return out


def config_group(kind: str) -> str:
    return CONFIG_GROUPS.get(kind, kind)


def config_packages() -> list[str]:
    """Packages of YAML configs shipped by installed plugins (entry-point group
    ``cl_toolkit.configs``)."""
    return sorted({ep.value for ep in entry_points(group=CONFIG_PACKAGES)})


def supplied_params(kind: str, target: Callable) -> set[str]:
    """Parameters the runner passes itself, so they are not config keys."""
    if kind == "stream":
        return {"seed"}
    if kind == "model":
        params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
        return {params[0].name} if params else set()
    return set()


def signature_defaults(kind: str, target: Callable) -> dict[str, Any]:
    """The config node a name runs with when nothing overrides it: every keyword parameter of
    ``target`` (through ``**kwargs`` chains to parent classes) with its default, ``"???"``
    (Hydra's mandatory value) where there is none, plus the runner's own keys."""
    inits = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] \
        if isinstance(target, type) else [target]
    supplied = supplied_params(kind, target)
    out: dict[str, Any] = {}
    for init in inits:
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name == "self" or p.name in supplied or p.name in out or \
                    p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                continue
            default = "???" if p.default is p.empty else p.default
            out[p.name] = list(default) if isinstance(default, tuple) else default
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    if kind == "model" and getattr(target, "needs_stream", False):
        return out
    return {**out, **RUNNER_KEYS.get(kind, {})}


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
