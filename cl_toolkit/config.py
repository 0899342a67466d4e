"""Names shared by the config checks, the runner, the CLI and the report (a leaf module: it
imports nothing, so everything may import it without a cycle).

``NON_RUN_KEYS`` is the one list of top-level keys that do not change what a run computes: a
resumed run may differ in them, output directories leave them out of their names (Hydra's
``override_dirname.exclude_keys`` in conf/config.yaml must equal it; a test checks), and the
report groups runs that differ only in them (and the seed).
"""
from __future__ import annotations

SCENARIOS = ("task-il", "class-il", "domain-il")
NON_RUN_KEYS = ("resume", "overwrite", "quiet", "output_root", "tensorboard", "threads",
                "mlflow", "mlflow_uri", "csv", "wandb", "wandb_project", "wandb_mode",
                "log_every")


def semantic_config(cfg: dict) -> dict:
    """``cfg`` without the keys that do not change what a run computes."""
    return {k: v for k, v in cfg.items() if k not in NON_RUN_KEYS}
