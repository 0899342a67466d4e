"""Every built-in name resolves to something importable, and every config file names a
registered entry with keys its constructor accepts."""
from pathlib import Path

import pytest
import yaml

from cl_toolkit import registry

CONF = Path(__file__).resolve().parents[1] / "conf"
KIND_OF_GROUP = {"strategy": "strategy", "benchmark": "stream", "model": "model"}


@pytest.mark.parametrize("kind,name", [(k, n) for k, table in registry.BUILTINS.items()
                                       for n in table])
def test_builtin_resolves(kind, name):
    assert callable(registry.resolve(kind, name))


@pytest.mark.parametrize("path", sorted(p for g in KIND_OF_GROUP for p in (CONF / g).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_file_matches_constructor(path):
    node = yaml.safe_load(path.read_text())
    kind = KIND_OF_GROUP[path.parent.name]
    name = node.pop("name")
    assert name == path.stem or name in registry.BUILTINS[kind]
    node.pop("heads", None)
    node.pop("shuffle_tasks", None)
    registry.check_kwargs(registry.resolve(kind, name), node, kind)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_composes_with_valid_keys(name):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", [f"experiment={name}"]), resolve=False)
    for group, kind in KIND_OF_GROUP.items():
        node = dict(cfg[group])
        target = registry.resolve(kind, node.pop("name"))
        node.pop("heads", None)
        node.pop("shuffle_tasks", None)
        registry.check_kwargs(target, node, kind)
