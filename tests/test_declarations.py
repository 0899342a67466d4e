"""Ranges and smoke sizes are declared by the owner of each parameter (a strategy, model or
stream builder: ``ranges = {...}``, ``smoke = {...}``), and validation and ``smoke=true`` read
the declarations of the names a config selects (cl_toolkit/validation.py, cl_toolkit/smoke.py),
so a plugin's keys are checked and shrunk like the built-ins'."""
from __future__ import annotations

import inspect

import pytest

from cl_toolkit import registry, smoke, validation
from cl_toolkit.errors import ConfigError
from cl_toolkit.strategy import SupervisedStrategy
from cl_toolkit.validation import at_least, between, one_of

KINDS = (("strategy", "strategy"), ("stream", "benchmark"), ("model", "model"))


def _own_keys(owner) -> set[str] | None:
    """The parameters ``owner`` itself takes (a class: through **kwargs to its parents)."""
    if isinstance(owner, type):
        keys = registry.accepted_kwargs(owner)
        return None if keys is None else set(keys)
    return set(inspect.signature(owner).parameters)


@pytest.mark.parametrize("kind,name", [(k, n) for k, _ in KINDS for n in registry.BUILTINS[k]])
def test_every_declared_key_is_a_parameter_of_its_owner(kind, name):
    """A declared key that its owner does not take is a typo, which would never be checked."""
    target = registry.resolve(kind, name)
    owners = target.__mro__ if isinstance(target, type) else [target]
    for owner in owners:
        for attribute in ("ranges", "smoke"):
            own = vars(owner).get(attribute) if hasattr(owner, "__dict__") else None
            if not own:
                continue
            keys = _own_keys(owner)
            assert keys is None or set(own) <= keys, (owner, attribute, set(own) - keys)
        ranges = vars(owner).get("ranges") or {}
        assert all(isinstance(r, validation.Range) for r in ranges.values()), owner


class Toy(SupervisedStrategy):
    """A plugin's strategy: its own keys declare their range and smoke size."""

    name = "toy"
    ranges = {"rank": at_least(1), "mix": between(0, 1), "lr": one_of(0.1, 0.2)}
    smoke = {"rank": 2, "epochs": 3}

    def __init__(self, rank: int = 64, mix: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.mix = rank, mix


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.BUILTINS["strategy"], "toy", f"{__name__}:Toy")


def _cfg(**strategy) -> dict:
    node = {"name": "toy", **registry.signature_defaults("strategy", Toy), **strategy}
    return {"benchmark": {"name": "split_digits", "n_tasks": 5}, "model": {"name": "mlp"},
            "strategy": node}


def test_a_plugins_declarations_are_checked_and_shrunk(toy):
    with pytest.raises(ConfigError, match=r"strategy.rank must be >= 1; got 0"):
        validation.check_config(_cfg(rank=0))
    with pytest.raises(ConfigError, match=r"strategy.mix must be >= 0 and <= 1; got 1.5"):
        validation.check_config(_cfg(mix=1.5))
    # The owner's entry wins over the shared one (lr > 0).
    with pytest.raises(ConfigError, match=r"strategy.lr=0.3 is not one of 0.1, 0.2"):
        validation.check_config(_cfg(lr=0.3))
    validation.check_config(_cfg(lr=0.1))
    small = smoke.shrink_config(_cfg(lr=0.1))
    assert small["strategy"]["rank"] == 2 and small["strategy"]["epochs"] == 3
    assert small["strategy"]["batch_size"] == smoke.SHARED["batch_size"]
    assert small["benchmark"]["n_tasks"] == 2


def test_smoke_refuses_a_bad_size_instead_of_replacing_it(toy):
    with pytest.raises(ConfigError, match=r"strategy.rank must be >= 1; got -3"):
        smoke.shrink_config(_cfg(rank=-3))
    cfg = {"model": {"name": "mom", "hidden_size": -8}}
    with pytest.raises(ConfigError, match=r"model.hidden_size must be >= 1; got -8"):
        smoke.shrink_config(cfg)


@pytest.mark.parametrize("heads,width", [(1, 16), (2, 16), (3, 18), (4, 16), (5, 20)])
def test_smoke_width_is_split_by_the_heads(heads, width):
    cfg = smoke.shrink_config({"model": {"name": "transformer", "hidden_size": 60,
                                         "num_layers": 4, "num_heads": heads}})
    assert cfg["model"]["hidden_size"] == width and cfg["model"]["num_layers"] == 1
