"""Every registered name of every kind composes through Hydra by its name, builds and learns.

The names come from the registry itself, so names added later (new strategies, models, streams,
probes) are walked without editing this file. Each case composes ``<group>=<name>`` with its
partners' defaults, shrinks it as ``smoke=true`` does (cl_toolkit/smoke.py) and runs learn +
evaluate on (at most) two tasks. A case is skipped only when it needs data or weights that are
not on this machine, and then the skip says which.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from cl_toolkit import registry, runner, smoke
from cl_toolkit.errors import ClToolkitError, DatasetNotFoundError
from cl_toolkit.task_kinds import task_kind

# Cases skipped without trying: they always download (the offline message is checked by
# tests/test_bad_input.py).
NEEDS_DOWNLOAD = {("stream", "avalanche"): "Avalanche benchmarks download their datasets"}


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(hydra_compose("config", overrides), resolve=True)
    return smoke.shrink_config(cfg)


def learn_two_tasks(cfg: dict) -> list[float]:
    from cl_toolkit.strategy import RunContext

    runner.seed_everything(0)
    try:
        stream = smoke.shrink_stream(runner.build_stream(cfg))
    except DatasetNotFoundError as exc:
        pytest.skip(f"needs data not on this machine: {str(exc)[:160]}")
    try:
        model = runner.build_model(cfg, stream)
    except ClToolkitError as exc:
        if "offline" in str(exc).lower() or "HF_HUB_OFFLINE" in str(exc):
            pytest.skip(f"needs model weights not on this machine: {str(exc)[:160]}")
        raise
    strategy = runner.build_strategy(cfg)
    strategy.setup(stream, model, RunContext(generator=torch.Generator().manual_seed(0)))
    accs = []
    for task in stream:
        strategy.learn(task)
        accs.append(runner.evaluate(strategy, task, 64, torch.device("cpu")))
    return accs


def _is_token_stream(name: str) -> bool:
    """A token stream says so (``is_tokens``); built at smoke size to find out."""
    cfg = compose([f"benchmark={name}"])
    try:
        return bool(smoke.shrink_stream(runner.build_stream(cfg)).is_tokens)
    except DatasetNotFoundError:
        return False


def token_partner(kind: str, name: str) -> list[str]:
    """Token streams run with a language model (a model name ending in ``_lm``), and language
    models with the first token stream."""
    if kind == "model" and name.endswith("_lm"):
        streams = [s for s in registry.names("stream")
                   if ("stream", s) not in NEEDS_DOWNLOAD and _is_token_stream(s)]
        if not streams:
            pytest.skip(f"no token stream registered for the language model {name}")
        return [f"benchmark={streams[0]}"]
    if kind == "stream" and _is_token_stream(name):
        models = [m for m in registry.names("model") if m.endswith("_lm")]
        if not models:
            pytest.skip(f"no language model registered for the token stream {name}")
        return [f"model={models[0]}"]
    return []


def own_model_partner(kind: str, name: str) -> list[str]:
    """Streams of a kind only its own models take (``needs_own_model``: cross_section,
    segmentation) run with a model that declares that kind in ``task_kinds``, and such models
    with the first such stream."""
    kind_of = lambda s: getattr(registry.resolve("stream", s), "task_kind", None)  # noqa: E731
    takes = lambda m: getattr(registry.resolve("model", m), "task_kinds", None)  # noqa: E731
    if kind == "model" and takes(name):
        streams = sorted((s for s in registry.names("stream") if ("stream", s) not in
                          NEEDS_DOWNLOAD and kind_of(s) in takes(name)),
                         key=lambda s: "root" in inspect.signature(
                             registry.resolve("stream", s)).parameters)  # data here first
        return [f"benchmark={streams[0]}"] if streams else []
    if kind == "stream" and kind_of(name) and task_kind(kind_of(name)).needs_own_model:
        models = [m for m in registry.names("model") if kind_of(name) in (takes(m) or ())]
        return [f"model={models[0]}"] if models else []
    return []


def cases():
    out = []
    for kind in registry.config_kinds():
        for name in sorted(set(registry.BUILTINS[kind]) | set(registry.names(kind))):
            out.append(pytest.param(kind, name, id=f"{kind}={name}"))
    return out


@pytest.mark.parametrize("kind,name", cases())
def test_every_registered_name_composes_builds_and_learns(kind, name, tmp_path, monkeypatch):
    # Downloads must fail at once, not hang on a network that is not there.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("CLTK_DATA", str(tmp_path / "data"))
    group = registry.config_group(kind)
    overrides = [f"{group}={name}"] + token_partner(kind, name) + own_model_partner(kind, name)
    if (kind, name) in NEEDS_DOWNLOAD:
        pytest.skip(NEEDS_DOWNLOAD[kind, name])
    if kind not in ("strategy", "stream", "model"):
        # Another kind (probes, ...): its config composes by its name and resolves; what it
        # attaches is run by its owner's tests.
        cfg = compose(overrides)
        node = cfg[group]
        assert node["name"] == name and callable(registry.resolve(kind, name))
        return
    cfg = compose(overrides)
    assert cfg[group]["name"] == name
    accs = learn_two_tasks(cfg)
    stream_kind = getattr(registry.resolve("stream", cfg["benchmark"]["name"]), "task_kind", None)
    low = -1.0 if stream_kind == "cross_section" else 0.0
    assert 1 <= len(accs) <= 2 and all(low <= a <= 1.0 for a in accs)  # an IC may be negative
