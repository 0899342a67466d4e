"""``cltk``: the command line.

    cltk run [hydra overrides]        one run (or a sweep with -m)
    cltk report PATH... [-o DIR]      report.md + report.html over runs and sweeps
    cltk list                         registered strategies, streams and models

``cltk run`` is a Hydra app on the packaged ``cl_toolkit.conf`` configs, so every Hydra feature
(overrides, ``-m`` sweeps, ``--cfg job``, launcher plugins) works as usual. Installed plugins that
register a strategy, stream or model through the entry points appear as config-group options.
"""
from __future__ import annotations

import argparse
import hashlib
import sys

from omegaconf import OmegaConf

from .errors import ClToolkitError

_failures: list[str] = []


def short_dirname(name: str, limit: int = 200) -> str:
    """A sweep run's directory is named by its overrides, but a file name holds at most 255
    bytes: a longer one keeps a readable head plus a hash of the whole, so it stays unique and
    the same on every re-invocation."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    return raw[: limit - 13].decode(errors="ignore") + "-" + hashlib.sha1(raw).hexdigest()[:12]


# conf/config.yaml names sweep directories through this resolver. It is registered when this
# module is imported, which also happens in launcher workers (they unpickle `_job` from here).
OmegaConf.register_new_resolver("cltk_dirname", short_dirname, replace=True)


def _register_plugin_configs() -> None:
    """Make ``strategy=<plugin>`` etc. valid Hydra choices for entry-point plugins that have no
    YAML file in conf/: their config node is just their name."""
    from hydra.core.config_store import ConfigStore

    from . import registry

    cs = ConfigStore.instance()
    group_of = {"strategy": "strategy", "stream": "benchmark", "model": "model",
                "probe": "probe"}
    for kind, group in group_of.items():
        for name in registry.names(kind):
            if name not in registry.BUILTINS[kind]:
                cs.store(group=group, name=name, node={"name": name})


def _job(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .progress import make_progress
    from .runner import run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    plain = OmegaConf.to_container(cfg, resolve=True)
    label = f"[job {hc.job.num}] " if multirun else ""
    progress = make_progress(bool(plain.get("quiet")), label)
    try:
        if not multirun:
            return run(plain, hc.runtime.output_dir, progress)
        from . import sweep

        return sweep.run_job(
            plain, hc.runtime.output_dir, hc.sweep.dir, list(hc.overrides.task),
            list(hc.job.config.override_dirname.exclude_keys),
            lambda c, d: run(c, d, progress),
            log=lambda msg: print(f"{label}{msg}", flush=True))
    except ClToolkitError as exc:
        message = f"{label}error: {exc}"
        print(message, file=sys.stderr, flush=True)
        if not multirun:
            raise SystemExit(1)
        _failures.append(message)  # a failed run must not stop the rest of the sweep
        return None
    except Exception as exc:
        if not multirun:
            raise
        # A bug in one run must not stop the others either; the index and error.txt keep it.
        message = f"{label}error: {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr, flush=True)
        _failures.append(message)
        return None


def _run(argv: list[str]) -> int:
    import hydra

    from . import ray_launcher, sweep

    _register_plugin_configs()
    ray_launcher.register()
    app = hydra.main(version_base=None, config_path="pkg://cl_toolkit.conf",
                     config_name="config")(_job)
    saved = sys.argv
    sys.argv = ["cltk run", *argv]
    sweep.current_sweep.clear()
    try:
        app()
    except sweep.SweepAbort as abort:
        print(f"error: {abort.error}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    if sweep.current_sweep:
        # Jobs may have run in other processes (joblib, submitit, Ray): the index knows them all.
        failed = sweep.failures(sweep.current_sweep["dir"], sweep.current_sweep["invocation"])
        if failed:
            lines = "\n".join(f"  {key}: {error}" for key, error in failed)
            print(f"{len(failed)} run(s) failed (see {sweep.current_sweep['dir']}/"
                  f"{sweep.INDEX}):\n{lines}", file=sys.stderr)
            return 1
        return 0
    if _failures:
        print(f"{len(_failures)} run(s) failed:\n" + "\n".join(_failures), file=sys.stderr)
        return 1
    return 0


def _report(argv: list[str]) -> int:
    from .report import write_report

    p = argparse.ArgumentParser(prog="cltk report",
                                description="Aggregate runs and sweeps into report.md/html.")
    p.add_argument("paths", nargs="+", help="run directories, sweep directories or results.json")
    p.add_argument("-o", "--out", default=None,
                   help="output directory (default: the first path if it is a directory)")
    args = p.parse_args(argv)
    md, html = write_report(args.paths, args.out)
    print(f"wrote {md}\nwrote {html}")
    return 0


def _list(argv: list[str]) -> int:
    from . import registry

    for kind in registry.BUILTINS:
        print(f"{kind}: {', '.join(registry.names(kind))}")
    return 0


COMMANDS = {"run": _run, "report": _report, "list": _list}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"cltk: unknown command {argv[0]!r}.", file=sys.stderr)
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ClToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
