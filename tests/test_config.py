"""The keys that do not change a run have one source (cl_toolkit.config.NON_RUN_KEYS): Hydra's
directory naming must leave out exactly those, and the resume check must ignore exactly them."""
from pathlib import Path

import yaml

from cl_toolkit.config import NON_RUN_KEYS
from cl_toolkit.config import semantic_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


def test_hydra_exclude_keys_are_the_non_run_keys():
    cfg = yaml.safe_load(CONF.read_text())
    exclude = cfg["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert sorted(exclude) == sorted(NON_RUN_KEYS)


def test_every_non_run_key_is_a_top_level_key_and_resume_ignores_them():
    cfg = yaml.safe_load(CONF.read_text())
    assert set(NON_RUN_KEYS) <= set(cfg)
    full = {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}
    assert set(full) - set(semantic_config(full)) == set(NON_RUN_KEYS)
