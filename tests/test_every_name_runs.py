"""Every registered name of every kind composes through Hydra by its name, builds and learns.

The names come from the registry itself, so names added later (new strategies, models, streams,
probes) are walked without editing this file. Each case composes ``<group>=<name>`` with its
partners' defaults, shrinks every size key it has (TINY), cuts each task to a few samples and
runs learn + evaluate on two tasks. A case is skipped only when it needs data or weights that
are not on this machine, and then the skip says which.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cl_toolkit import registry, runner
from cl_toolkit.errors import ClToolkitError, DatasetNotFoundError
from cl_toolkit.stream import TaskStream

# Size keys made tiny wherever a config has them.
TINY = {"epochs": 1, "pretrain_epochs": 1, "generator_epochs": 1, "coef_steps": 2,
        "num_features": 32, "vrf_hidden": 16, "z_dim": 4, "generator_hidden": [16],
        "coreset_per_class": 2, "support_per_class": 2, "generated_per_class": 2,
        "buffer_size": 8, "k_shot": 2, "unlabeled_per_task": 4, "batch_size": 16,
        "hidden": [16], "channels": [4, 4, 4], "nf": 4, "hidden_size": 16, "num_layers": 1,
        "n_tasks": 2, "max_train_per_task": 64, "max_test_per_task": 32, "max_train": 16,
        "max_test": 8, "image_size": 32}
TRAIN, TEST = 24, 12
# Cases skipped without trying: they always download (the offline message is checked by
# tests/test_bad_input.py).
NEEDS_DOWNLOAD = {("stream", "avalanche"): "Avalanche benchmarks download their datasets"}
DEFAULT_PARTNERS = {"benchmark": "split_digits", "model": "mlp", "strategy": "naive"}


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(hydra_compose("config", overrides), resolve=True)
    for group in DEFAULT_PARTNERS:
        node = cfg.get(group) or {}
        for key, value in TINY.items():
            if key in node and not isinstance(node[key], dict):
                node[key] = value
    return cfg


def tiny_stream(stream: TaskStream) -> TaskStream:
    tasks = [dataclasses.replace(
        t, train=t.train.subset(torch.randperm(len(t.train), generator=torch.Generator()
                                               .manual_seed(0))[:TRAIN]),
        test=t.test.subset(torch.arange(min(TEST, len(t.test)))))
        for t in stream.tasks[:2]]
    return dataclasses.replace(stream, tasks=tasks)


def learn_two_tasks(cfg: dict) -> list[float]:
    from cl_toolkit.strategy import RunContext

    runner.seed_everything(0)
    try:
        stream = tiny_stream(runner.build_stream(cfg))
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


def cases():
    out = []
    for kind, table in registry.BUILTINS.items():
        for name in sorted(set(table) | set(registry.names(kind))):
            out.append(pytest.param(kind, name, id=f"{kind}={name}"))
    return out


@pytest.mark.parametrize("kind,name", cases())
def test_every_registered_name_composes_builds_and_learns(kind, name, tmp_path, monkeypatch):
    # Downloads must fail at once, not hang on a network that is not there.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("CLTK_DATA", str(tmp_path / "data"))
    group = registry.config_group(kind)
    overrides = [f"{group}={name}"]
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
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
