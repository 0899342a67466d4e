"""A Hydra launcher that runs each job of a sweep as a Ray task: ``hydra/launcher=cltk_ray``.

Why our own and not ``hydra-ray-launcher``: that plugin pins ``cloudpickle<3`` while
``joblib>=1.5`` (needed by ``hydra-joblib-launcher`` and recent scikit-learn) requires
``cloudpickle>=3``, so the two cannot be installed together without downgrading joblib; it also
pulls ``ray[default]``, boto3 and aiohttp for its AWS autoscaler mode. Ray's own API is enough
here: ``ray.init(address)`` joins a running cluster (``ray start --head`` / ``RAY_ADDRESS``) or
starts a local instance, each job is a ``ray.remote`` task that rebuilds the job's config and
calls Hydra's ``run_job``, exactly as the joblib launcher does in its workers.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace. Rather than shipping a
second top-level package, :func:`register` registers this class with Hydra's documented
``Plugins.instance().register`` under the name ``hydra_plugins.cltk_ray_launcher.RayLauncher``
and stores its config as ``hydra/launcher/cltk_ray``; ``cltk run`` calls it before Hydra starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

from .errors import ConfigError

PLUGIN_NAME = "hydra_plugins.cltk_ray_launcher"
log = logging.getLogger(__name__)


def _execute(hydra_context, sweep_config, task_function, singleton_state) -> JobReturn:
    """Body of one Ray task: the same steps as Hydra's joblib worker."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, task_function=task_function,
                   config=sweep_config, job_dir_key="hydra.sweep.dir",
                   job_subdir_key="hydra.sweep.subdir")


class RayLauncher(Launcher):
    """``address``: a Ray cluster to join (``auto``, ``ray://host:10001``) or null for a local
    instance that lives as long as the sweep; ``num_cpus``: CPUs of that local instance;
    ``cpus_per_job``: CPUs Ray reserves per job (how many run at once); ``timeout_s``: give up
    waiting for the sweep after this long (null: no limit)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 cpus_per_job: float = 1, timeout_s: float | None = None,
                 init_kwargs: dict | None = None) -> None:
        self.address, self.num_cpus, self.cpus_per_job = address, num_cpus, cpus_per_job
        self.timeout_s = timeout_s
        self.init_kwargs = dict(init_kwargs or {})
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("hydra/launcher=cltk_ray needs Ray: pip install "
                              "'cl_toolkit[ray]'.") from exc
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        started_here = not ray.is_initialized()
        if started_here:
            kwargs = {"include_dashboard": False, "log_to_driver": True, **self.init_kwargs}
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(address=self.address, **kwargs)
        try:
            task = ray.remote(num_cpus=self.cpus_per_job, max_retries=0)(_execute)
            state = Singleton.get_state()
            refs = []
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                        list(overrides))
                with open_dict(cfg):
                    cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
                    cfg.hydra.job.num = idx
                log.info(f"#{idx}: {' '.join(overrides)}")
                refs.append(task.remote(self.hydra_context, cfg, self.task_function, state))
            return ray.get(refs, timeout=self.timeout_s)
        finally:
            if started_here:
                ray.shutdown()


JOBLIB_PLUGIN_NAME = "hydra_plugins.cltk_joblib_launcher"


def _register_joblib() -> None:
    """``hydra/launcher=joblib`` runs hydra-joblib-launcher's launcher with our ``launch``
    (`cl_toolkit.sweep.launch_joblib`): the death of a worker process ends its own job, not the
    sweep. Same options; ``--cfg hydra`` shows the target
    ``hydra_plugins.cltk_joblib_launcher.JoblibLauncher``. Without the plugin: nothing."""
    import sys
    import types

    from hydra.core.plugins import Plugins

    try:
        from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    except ImportError:
        return
    module = sys.modules.get(JOBLIB_PLUGIN_NAME)
    if module is None:
        class Resilient(JoblibLauncher):
            __doc__ = JoblibLauncher.__doc__

            def launch(self, job_overrides, initial_job_idx):
                from .sweep import launch_joblib

                return launch_joblib(self, job_overrides, initial_job_idx)

        Resilient.__name__ = Resilient.__qualname__ = "JoblibLauncher"
        Resilient.__module__ = JOBLIB_PLUGIN_NAME
        module = types.ModuleType(JOBLIB_PLUGIN_NAME)
        module.JoblibLauncher = Resilient
        sys.modules[JOBLIB_PLUGIN_NAME] = module
        Plugins.instance().register(Resilient)
    node = OmegaConf.structured(JobLibLauncherConf)
    node._target_ = f"{JOBLIB_PLUGIN_NAME}.JoblibLauncher"
    ConfigStore.instance().store(group="hydra/launcher", name="joblib", node=node,
                                 provider="cl_toolkit")


def register() -> None:
    """Make ``hydra/launcher=cltk_ray`` available and ``hydra/launcher=joblib`` survive a dead
    worker (called by ``cltk run`` before Hydra)."""
    import sys
    import types

    from hydra.core.plugins import Plugins

    if RayLauncher.__module__ != PLUGIN_NAME:
        try:
            import hydra_plugins  # noqa: F401  (namespace package of installed plugins)
        except ImportError:
            sys.modules["hydra_plugins"] = types.ModuleType("hydra_plugins")
        # Hydra resolves the launcher's _target_ by name and accepts only hydra_plugins.*.
        sys.modules[PLUGIN_NAME] = sys.modules[__name__]
        RayLauncher.__module__ = PLUGIN_NAME
        Plugins.instance().register(RayLauncher)
    ConfigStore.instance().store(group="hydra/launcher", name="cltk_ray", node=OmegaConf.create({
        "_target_": f"{PLUGIN_NAME}.RayLauncher", "address": None, "num_cpus": None,
        "cpus_per_job": 1, "timeout_s": None, "init_kwargs": {}}), provider="cl_toolkit")
    _register_joblib()
