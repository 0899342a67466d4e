"""Probes: plugins that watch a run through the training hooks and add a curve to its results.

``cltk run probe=<name>`` selects conf/probe/<name>.yaml; the name is looked up in the registry
kind ``probe`` (plugins: entry-point group ``cl_toolkit.probes``). The runner builds the probe
from ``cfg["probe"]`` (`build_probe`, which also tells it ``smoke``: whether the run is a
``smoke=true`` run), refuses a strategy without the capabilities the probe ``requires``
(`check_compatible`, before anything trains), calls `attach` once and `check_run` once the
strategy is set up (``Probe.check_run``: a probe that cannot measure anything at its settings on
this run is refused before training; `attach` also calls it before the first task trains, for a
runner that does not), keeps ``state_dict()`` in
every checkpoint (a resumed run continues the probe's curve from there) and writes ``results()``
to ``results["extras"][probe.key]``; the report draws it with the renderer registered under the
same key (registry kind ``renderer``).

The contract between a probe and a strategy: a probe reads the strategy only through its public
interface (``predict(x, task)``, ``model``) and the methods behind the capabilities it declares
(``Strategy.capabilities``, e.g. ``"train_step"``: ``strategy.train_step(x, y, t, task)``), never
through the strategy's private state.
"""
from __future__ import annotations

from typing import Any

from .. import registry
from ..errors import ConfigError, PluginError
from ..strategy import HOOK_EVENTS, Hook, Hooks, RunContext, SupervisedStrategy
from ..stream import TaskStream

# What each capability a probe may require means, for the messages of `check_compatible`.
CAPABILITIES = {"train_step": "trains by gradient steps"}


class Probe:
    """Base class of probes. Subclasses take their settings as keyword arguments and list the
    strategy capabilities they call in ``requires``."""

    key: str = ""
    requires: frozenset[str] = frozenset()
    smoke: bool = False  # set by `build_probe`: a smoke=true run (tiny sizes, a few updates)

    def setup(self, stream: TaskStream, ctx: RunContext) -> None:
        """Check that the run suits the probe (raise ConfigError otherwise) and prepare."""

    def check_run(self, stream: TaskStream, strategy: Any) -> None:
        """Called once the strategy is built and set up, before anything trains: refuse
        (ConfigError naming the keys to change) a run on which the probe would measure nothing
        at its settings, e.g. fewer training updates than it waits for (`planned_updates`).
        Under ``self.smoke`` a probe may shrink its own settings to fit instead."""

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


def planned_updates(stream: TaskStream, strategy: Any) -> tuple[list[int] | None, bool]:
    """(training updates per task, whether that count is exact) of ``strategy`` on ``stream``:
    ceil(train size / ``strategy.batch_size``) x ``strategy.epochs`` per task. Exact for a
    `SupervisedStrategy` that trains on each task's own data with the shared loop (naive,
    replay: a replayed batch joins the step, it adds none); a lower bound where the strategy
    chooses its training data (joint: the union of the tasks so far). (None, False) for a
    strategy that declares no integer ``epochs`` and ``batch_size``."""
    epochs, batch = getattr(strategy, "epochs", None), getattr(strategy, "batch_size", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epochs, batch)) \
            or batch < 1:
        return None, False
    per_task = [epochs * -(-len(t.train) // batch) for t in stream.tasks]
    cls = type(strategy)
    exact = isinstance(strategy, SupervisedStrategy) and \
        cls.train_data is SupervisedStrategy.train_data and cls.learn is SupervisedStrategy.learn
    return per_task, exact


def check_run(probe: Probe | None, stream: TaskStream, strategy: Any) -> None:
    """``probe.check_run(stream, strategy)``, once per run (a second call does nothing)."""
    if probe is None or getattr(probe, "_run_checked", False):
        return
    probe.check_run(stream, strategy)
    probe._run_checked = True


def build_probe(cfg: dict) -> Probe | None:
    """The probe named by ``cfg["probe"]`` (None or absent: no probe)."""
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
    probe.smoke = bool(cfg.get("smoke"))
    return probe


def check_compatible(probe: Probe | type[Probe] | None, strategy: Any,
                     strategy_name: str | None = None) -> None:
    """Refuse a strategy that lacks a capability the probe requires (``Probe.requires`` against
    ``Strategy.capabilities``), naming the strategies that have them. Works on instances and on
    classes alike (the runner checks the registered classes before it builds anything);
    ``strategy_name`` is the name the run selected it by."""
    if probe is None:
        return
    requires = frozenset(getattr(probe, "requires", ()))
    missing = sorted(requires - frozenset(getattr(strategy, "capabilities", ())))
    if not missing:
        return
    needs = " and ".join(f"{CAPABILITIES.get(c, 'supports ' + repr(c))} (capability {c!r})"
                         for c in missing)
    probe_cls = probe if isinstance(probe, type) else type(probe)
    cls = strategy if isinstance(strategy, type) else type(strategy)
    name = strategy_name or getattr(cls, "name", "") or cls.__name__
    usable = registry.strategies_declaring("capabilities", requires)
    hint = f"Use {', '.join(usable)}." if usable else "No registered strategy has it."
    raise ConfigError(f"probe={getattr(probe_cls, 'key', '') or probe_cls.__name__} needs a "
                      f"strategy that {needs}; strategy={name} does not. {hint}")


def attach(probe: Probe | None, stream: TaskStream, ctx: RunContext) -> None:
    """Set the probe up and add its callbacks to a copy of the run's hooks (the caller's
    `Hooks` object stays as it was). The first ``before_task`` calls `check_run` if the runner
    has not yet (it is before the first training step either way)."""
    if probe is None:
        return
    probe.setup(stream, ctx)
    ctx.hooks = Hooks(**{e: list(getattr(ctx.hooks, e)) for e in HOOK_EVENTS})

    def first_check(strategy, **_) -> None:
        check_run(probe, stream, strategy)

    ctx.hooks.before_task.insert(0, first_check)
    for event, fn in probe.hooks().items():
        if event not in HOOK_EVENTS:
            raise PluginError(f"Probe {type(probe).__name__} asks for hook {event!r}; the "
                              f"events are {', '.join(HOOK_EVENTS)}.")
        getattr(ctx.hooks, event).append(fn)


def add_results(results: dict, probe: Probe | None) -> dict:
    if probe is not None:
        results["extras"] = {**results.get("extras", {}), probe.key: probe.results()}
    return results
