"""Every built-in name resolves to something importable, and every config file names a
registered entry with keys its constructor accepts."""
import inspect
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


def _yaml_configs():
    """(kind, file stem, node) of every YAML config of the registry's groups."""
    out = []
    for kind in registry.config_kinds():
        for path in sorted((CONF / registry.config_group(kind)).glob("*.yaml")):
            out.append((kind, path.stem, yaml.safe_load(path.read_text())))
    return out


@pytest.mark.parametrize("kind,name", [(k, n) for k in registry.config_kinds()
                                       for n in registry.BUILTINS[k]])
def test_every_registered_name_has_its_config_with_every_parameter(kind, name):
    """One source of truth: conf/<group>/<name>.yaml exists, selects this name and lists every
    parameter of its target's signature, so `--cfg job` shows each default in effect."""
    path = CONF / registry.config_group(kind) / f"{name}.yaml"
    assert path.exists(), f"{name} is registered but {path} is missing"
    node = yaml.safe_load(path.read_text())
    assert node.pop("name") == name
    expected = registry.signature_defaults(kind, registry.resolve(kind, name))
    assert sorted(node) == sorted(expected), (
        f"{path} lacks {sorted(set(expected) - set(node))}, has extra {sorted(set(node) - set(expected))}")


@pytest.mark.parametrize("kind,stem,node", _yaml_configs(), ids=lambda v: str(v)[:40])
def test_every_config_file_is_a_registered_name_or_a_complete_preset(kind, stem, node):
    assert node["name"] in registry.names(kind)
    expected = registry.signature_defaults(kind, registry.resolve(kind, node["name"]))
    assert sorted(set(node) - {"name"}) == sorted(expected)


def test_cltk_list_prints_every_selectable_config(capsys):
    from cl_toolkit.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, stem, _ in _yaml_configs():
        assert stem in out, f"{registry.config_group(kind)}={stem} is selectable but not listed"
    for kind in registry.config_kinds():
        for name in registry.names(kind):
            assert name in out


def test_kinds_without_a_config_group_have_no_configs():
    """Renderers are chosen by the results["extras"] key they draw, not by a config group."""
    assert "renderer" in registry.NO_CONFIG_GROUP and "renderer" in registry.GROUPS
    assert set(registry.config_kinds()) == set(registry.BUILTINS) - registry.NO_CONFIG_GROUP
    for kind in registry.NO_CONFIG_GROUP:
        assert not (CONF / registry.config_group(kind)).exists(), kind
    for name in registry.BUILTINS["renderer"]:
        assert list(inspect.signature(registry.resolve("renderer", name)).parameters) == \
            ["runs", "out_dir"], name


def test_signature_defaults_follow_kwargs_chains_and_mark_required():
    class Base:
        def __init__(self, lr: float = 0.1, epochs: int = 5):
            pass

    class Child(Base):
        def __init__(self, alpha, beta=(1, 2), **kwargs):
            super().__init__(**kwargs)

    assert registry.signature_defaults("strategy", Child) == {
        "alpha": "???", "beta": [1, 2], "lr": 0.1, "epochs": 5}
    assert registry.signature_defaults("model", lambda input_shape, width=3: None) == {
        "width": 3, "heads": "single"}


def test_avalanche_strategy_gets_naives_training_defaults():
    avalanche = yaml.safe_load((CONF / "strategy" / "avalanche.yaml").read_text())
    naive = yaml.safe_load((CONF / "strategy" / "naive.yaml").read_text())
    for key in ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay"):
        assert avalanche[key] == naive[key], key
