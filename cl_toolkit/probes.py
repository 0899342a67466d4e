"""Probes: plugins that watch a run through the training hooks and add a curve to its results.

``cltk run probe=<name>`` selects conf/probe/<name>.yaml; the name is looked up in the registry
kind ``probe`` (plugins: entry-point group ``cl_toolkit.probes``). The runner builds the probe
from ``cfg["probe"]``, calls `attach` once, keeps ``state_dict()`` in every checkpoint (a resumed
run continues the probe's curve from there) and writes ``results()`` to
``results["extras"][probe.key]``.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError, PluginError
from .strategy import HOOK_EVENTS, Hook, Hooks, RunContext
from .stream import TaskStream


class Probe:
    """Base class of probes. Subclasses take their settings as keyword arguments."""

    key: str = ""

    def setup(self, stream: TaskStream, ctx: RunContext) -> None:
        """Check that the run suits the probe (raise ConfigError otherwise) and prepare."""

    def hooks(self) -> dict[str, Hook]:
        """``{event: callback}`` for events of `cl_toolkit.strategy.HOOK_EVENTS`."""
        return {}

    def results(self) -> Any:
        """JSON-able measurements so far."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_probe(cfg: dict) -> Probe | None:
    """The probe named by ``cfg["probe"]`` (None or absent: no probe)."""
    from . import registry

    node = cfg.get("probe")
    if node is None:
        return None
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"The probe config needs a 'name' key (one of "
                          f"{', '.join(registry.names('probe'))}); got {node!r}.")
    kwargs = dict(node)
    probe = registry.build("probe", kwargs.pop("name"), **kwargs)
    if not isinstance(probe, Probe):
        raise PluginError(f"Probe {node['name']!r} built a {type(probe).__name__}, which does "
                          "not subclass cl_toolkit.probes.Probe; derive it from that class.")
    return probe


def attach(probe: Probe | None, stream: TaskStream, ctx: RunContext) -> None:
    """Set the probe up and add its callbacks to a copy of the run's hooks (the caller's
    `Hooks` object stays as it was)."""
    if probe is None:
        return
    probe.setup(stream, ctx)
    ctx.hooks = Hooks(**{e: list(getattr(ctx.hooks, e)) for e in HOOK_EVENTS})
    for event, fn in probe.hooks().items():
        if event not in HOOK_EVENTS:
            raise PluginError(f"Probe {type(probe).__name__} asks for hook {event!r}; the "
                              f"events are {', '.join(HOOK_EVENTS)}.")
        getattr(ctx.hooks, event).append(fn)


def add_results(results: dict, probe: Probe | None) -> dict:
    if probe is not None:
        results["extras"] = {**results.get("extras", {}), probe.key: probe.results()}
    return results
