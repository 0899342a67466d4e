"""``cltk``: the command line.

    cltk run [overrides] [-m]         one run, or a sweep with -m (a Hydra multirun)
    cltk report PATH... [-o DIR]      report.md/.html/.csv/.tex over runs and sweeps
    cltk list                         every name each config group accepts

``cltk run`` is a Hydra app on the packaged ``cl_toolkit.conf`` configs, so every Hydra feature
(overrides, ``-m`` sweeps, ``--cfg job``, launcher plugins) works as usual. Before anything runs,
every job's composed config is checked by type and range (`cl_toolkit.validation`); bad input
ends in a one-paragraph error with exit code 2 (``HYDRA_FULL_ERROR=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import traceback
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ClToolkitError, ConfigError, UsageError, suggest

_failures: list[str] = []
MAX_CHECKED_JOBS = 256


def short_dirname(name: str, limit: int = 200) -> str:
    """A directory named by overrides, within the 255 bytes a file name may hold: a longer one
    keeps a readable head plus a hash of the whole, so it stays unique and the same on every
    re-invocation. No overrides: ``defaults``."""
    if not name:
        return "defaults"
    raw = name.encode()
    if len(raw) <= limit:
        return name
    return raw[: limit - 13].decode(errors="ignore") + "-" + hashlib.sha1(raw).hexdigest()[:12]


def sweep_dirname(overrides, exclude_keys) -> str:
    """The name of a sweep's directory: every override of the command (sweeps included), sorted,
    minus the keys that do not change what runs. Two sweeps share a directory only when they
    ask for the same runs; re-invoking one finds its runs again."""
    exclude = set(exclude_keys or ())
    kept = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in exclude)
    return short_dirname(",".join(kept))


# conf/config.yaml names run and sweep directories through these resolvers. They are registered
# when this module is imported, which also happens in launcher workers (they unpickle `_job`).
# The sweep name is cached: Hydra copies the launching process's cache into every job's config,
# so every job resolves the sweep directory to the launcher's one (as it does for ${now:}).
OmegaConf.register_new_resolver("cltk_dirname", short_dirname, replace=True)
OmegaConf.register_new_resolver("cltk_sweep_dirname", sweep_dirname, replace=True,
                                use_cache=True)


def yaml_names(group: str) -> dict[str, str]:
    """``{config name: registered name it selects}`` of the YAML files in one config group, from
    cl_toolkit.conf and from plugins' config packages."""
    import yaml

    from . import registry

    found: dict[str, str] = {}
    for package in ["cl_toolkit.conf", *registry.config_packages()]:
        try:
            folder = resources.files(package) / group
        except (ModuleNotFoundError, TypeError):
            continue
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.endswith(".yaml") and entry.name[:-5] not in found:
                node = yaml.safe_load(entry.read_text()) or {}
                found[entry.name[:-5]] = node.get("name", entry.name[:-5]) \
                    if isinstance(node, dict) else entry.name[:-5]
    return found


def _search_path_plugin():
    """A Hydra SearchPathPlugin that appends every plugin config package
    (entry-point group ``cl_toolkit.configs``) to Hydra's search path."""
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    from . import registry

    class PluginConfigs(SearchPathPlugin):
        def manipulate_search_path(self, search_path) -> None:
            for package in registry.config_packages():
                search_path.append(provider="cl_toolkit-plugin", path=f"pkg://{package}")

    return PluginConfigs


def _register_configs() -> None:
    """Plugins' config packages join Hydra's search path; a plugin name without a YAML gets its
    config node generated from its signature, so ``--cfg job`` shows every default it runs with
    and ``strategy.<param>=...`` needs no ``+``."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from . import registry

    if registry.config_packages():
        Plugins.instance().register(_search_path_plugin())
    cs = ConfigStore.instance()
    for kind in registry.config_kinds():
        group = registry.config_group(kind)
        have = yaml_names(group)
        for name in registry.names(kind):
            if name in registry.BUILTINS[kind] or name in have:
                continue
            try:
                node = registry.signature_defaults(kind, registry.resolve(kind, name))
            except ClToolkitError:
                node = {}  # a broken plugin: the run reports its import error
            cs.store(group=group, name=name, node={"name": name, **node},
                     provider="cl_toolkit-plugin")


def _summary(results: dict, run_dir) -> str:
    """One line: ACC, BWT and forgetting in the score's own units (% for percent scores such
    as accuracy; as they are for the IC, say), named after the score when it is not accuracy."""
    m = results.get("metrics", {})
    metric = results.get("metric") or {}
    percent = metric.get("percent", True)

    def show(key):
        if m.get(key) is None:
            return "n/a"
        return f"{100 * m[key]:.2f}%" if percent else f"{m[key]:.4f}"

    acc = "ACC" if metric.get("key", "accuracy") == "accuracy" else \
        f"Avg {metric.get('label', metric['key'])}"
    return (f"{acc} {show('acc')}  BWT {show('bwt')}  forgetting {show('forgetting')} "
            f"(max-based)  -> {Path(run_dir) / 'results.json'}")


def _print_error(exc: BaseException, label: str = "") -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    print(f"{label}error: {text}", file=sys.stderr, flush=True)  # one paragraph


def _job(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .progress import make_progress
    from .runner import run
    from .validation import check_config

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    plain = OmegaConf.to_container(cfg, resolve=True)
    label = f"[job {hc.job.num}] " if multirun else ""
    progress = make_progress(bool(plain.get("quiet")), label)
    try:
        check_config(plain)
        if not multirun:
            results = run(plain, hc.runtime.output_dir, progress)
            print(_summary(results, hc.runtime.output_dir), flush=True)
            return results
        from . import sweep
        from .trainer import warm_up

        warm_up()  # once per worker: the forked child of each job inherits it
        overrides = list(hc.overrides.task)
        exclude = list(hc.job.config.override_dirname.exclude_keys)

        def log(msg):
            print(f"{label}{msg}", flush=True)

        results = sweep.run_isolated(
            hc.sweep.dir, overrides, exclude, hc.runtime.output_dir,
            lambda: sweep.run_job(plain, hc.runtime.output_dir, hc.sweep.dir, overrides,
                                  exclude, lambda c, d: run(c, d, progress), log=log), log=log)
        print(f"{label}{_summary(results, hc.runtime.output_dir)}", flush=True)
        return results
    except ClToolkitError as exc:
        _print_error(exc, label)
        if not multirun:
            raise SystemExit(exc.exit_code)
        _failures.append(f"{label}error: {exc}")  # a failed run must not stop the sweep
        return None
    except Exception as exc:
        if not multirun:
            raise
        # A bug in one run must not stop the others either; the index and error.txt keep it.
        message = f"{label}error: {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr, flush=True)
        _failures.append(message)
        return None


def _hydra_message(exc: Exception, overrides: list[str]) -> str:
    """Hydra's composition errors as one paragraph naming the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from . import registry

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        options = sorted(exc.options or yaml_names(group))
        return (f"No config {name!r} in group {group!r}.{suggest(name, options)} Choose one of: "
                f"{', '.join(options)} (cltk list shows them all), e.g. {group}={options[0]}."
                if options else f"No config {name!r} in group {group!r}.")
    if isinstance(exc, OverrideParseException):
        return (f"Cannot parse the override {exc.override!r}: {exc.message.strip()}. Write "
                "overrides as key=value (lists as key=[a,b], sweeps as key=a,b with -m).")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("Could not override '"):
        key = text.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        group = parent.split(".")[0]
        kind = {v: k for k, v in registry.CONFIG_GROUPS.items()}.get(group)
        if "." in parent:
            return (f"{parent} has no key {leaf!r}: the config fixes the keys of that mapping. "
                    f"Add one with +{key}=VALUE, or replace the whole mapping with "
                    f"'{parent}={{{leaf}: VALUE}}' where it is null.")
        valid = _node_keys(group, overrides) if kind and parent == group else []
        hint = f"{suggest(leaf, valid)} Valid keys of {parent}: {', '.join(valid)}." \
            if valid else ""
        return (f"Unknown config key {key}.{hint} Check the spelling; to add a key the config "
                f"does not have, write +{key}=VALUE.")
    return f"{text} (Hydra could not compose the config from these overrides.)"


def _node_keys(group: str, overrides: list[str]) -> list[str]:
    """Keys of the ``group`` node selected by ``overrides`` (group choices only)."""
    from hydra import compose, initialize_config_module

    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]
               and "," not in o]
    try:
        with initialize_config_module(config_module="cl_toolkit.conf", version_base=None):
            node = compose(config_name="config", overrides=choices)[group]
        return sorted(k for k in node if k != "name")
    except Exception:
        return []


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def precheck(argv: list[str]) -> None:
    """Compose the config of every job (up to MAX_CHECKED_JOBS) and check it, so bad input is
    refused before any run starts or any directory is made."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser

    from .validation import check_config

    args, unknown = get_args_parser().parse_known_args(argv)
    if unknown:
        raise ConfigError(f"cltk run does not know the option(s) {' '.join(unknown)}. Put "
                          "Hydra flags (-m, --cfg job, -cn NAME) anywhere and config overrides "
                          "as key=value; cltk run --help lists them.")
    if args.hydra_help or args.info or args.shell_completion:
        return
    task = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    hydra_opts = [o for o in args.overrides if o.lstrip("+~").startswith("hydra")]
    try:
        jobs = _job_overrides(task, bool(args.multirun))
        with initialize_config_module(config_module="cl_toolkit.conf", version_base=None):
            for job in jobs[:MAX_CHECKED_JOBS]:
                cfg = compose(config_name=args.config_name or "config",
                              overrides=job + [o for o in hydra_opts if "launcher" not in o
                                               and "sweeper" not in o and "callbacks" not in o],
                              return_hydra_config=False)
                check_config(OmegaConf.to_container(cfg, resolve=True))
    except ClToolkitError:
        raise
    except Exception as exc:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise ConfigError(_hydra_message(exc, task)) from exc
        raise


# Hydra flags that take a value; `_flags_first` keeps each with its value.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}


def _flags_first(argv: list[str]) -> list[str]:
    """Hydra flags (``-m``, ``--cfg job``, ...) before the overrides, wherever they were typed:
    Hydra's parser takes them only there."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            take = 2 if a in VALUE_FLAGS and i + 1 < len(argv) else 1
            flags += argv[i:i + take]
            i += take
        else:
            overrides.append(a)
            i += 1
    return flags + overrides


# Overrides that name a directory. cltk names run and sweep directories by their overrides
# (``seed=1,strategy=replay``), which Hydra's override grammar cannot take unquoted.
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "output_root")


def _quote_dirs(argv: list[str]) -> list[str]:
    """Quote the value of a directory override that Hydra's grammar would refuse (``=`` in it)
    or split (``,``), so ``hydra.run.dir=runs/split_digits/replay/seed=1,strategy=replay``
    names that directory as typed. ``output_root=a,b`` stays a sweep over two roots."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser, out = None, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if (not eq or arg.startswith("-") or key.lstrip("+~") not in DIR_KEYS or not value
                or value[0] in "'\""):
            out.append(arg)
            continue
        parser = parser or OverridesParser.create()
        try:
            parsed = parser.parse_overrides([arg])[0]
            plain = parsed.value_type == ValueType.ELEMENT and isinstance(parsed.value(), str)
            quote = not plain and key.lstrip("+~").startswith("hydra.")
        except Exception:  # noqa: BLE001 - Hydra's parse error: quoting is the fix
            quote = True
        if quote and ('"' not in value or "'" not in value):
            mark = '"' if '"' not in value else "'"
            arg = f"{key}={mark}{value}{mark}"
        out.append(arg)
    return out


def _run(argv: list[str]) -> int:
    import hydra

    from . import ray_launcher, sweep

    if any(a in ("-h", "--help") for a in argv):
        print(run_help())
        return 0
    argv = _quote_dirs(_flags_first(argv))
    _register_configs()
    ray_launcher.register()
    precheck(argv)
    app = hydra.main(version_base=None, config_path="pkg://cl_toolkit.conf",
                     config_name="config")(_job)
    saved = sys.argv
    sys.argv = ["cltk run", *argv]
    sweep.current_sweep.clear()
    _failures.clear()
    try:
        app()
    except SystemExit as exc:  # a single run's error (exit code 2 or 1), or Hydra's own
        if exc.code not in (None, 0):
            return exc.code if isinstance(exc.code, int) else 1
    except sweep.SweepAbort as abort:
        _print_error(abort.error)
        return abort.error.exit_code
    finally:
        sys.argv = saved
        sweep.release_run()
    if sweep.current_sweep:
        # Jobs may have run in other processes (joblib, submitit, Ray): the index knows them all.
        failed = sweep.failures(sweep.current_sweep["dir"], sweep.current_sweep["invocation"])
        if failed:
            lines = "\n".join(f"  {key}: {error}" for key, error in failed)
            print(f"{len(failed)} run(s) failed (see {sweep.current_sweep['dir']}/"
                  f"{sweep.INDEX}):\n{lines}", file=sys.stderr)
            return 1
        print(f"sweep: {sweep.current_sweep['dir']} (cltk report "
              f"{sweep.current_sweep['dir']})", flush=True)
        return 0
    if _failures:
        print(f"{len(_failures)} run(s) failed:\n" + "\n".join(_failures), file=sys.stderr)
        return 1
    return 0


def _report(argv: list[str]) -> int:
    from .report import write_report

    p = argparse.ArgumentParser(
        prog="cltk report",
        description="Aggregate runs and sweeps into report.md, report.html, report.csv and "
                    "report.tex: one section per (benchmark, scenario), mean ± sample std "
                    "(ddof=1) with n per cell.")
    p.add_argument("paths", nargs="+", help="run directories, sweep directories (searched "
                   "recursively) or results.json files")
    p.add_argument("-o", "--out", default=None,
                   help="output directory (default: the first path if it is a directory)")
    args = p.parse_args(argv)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    if args.out or first.exists():
        _check_writable(out, args.paths)
    try:
        written = write_report(args.paths, args.out)
    except PermissionError as exc:  # e.g. a report.md of another user in a writable directory
        if not exc.filename or Path(exc.filename).resolve().parent != out.resolve():
            raise
        raise _unwritable(out, args.paths, exc) from exc
    print("\n".join(f"wrote {path}" for path in written))
    return 0


def _unwritable(out: Path, paths: list[str], exc: OSError) -> UsageError:
    return UsageError(
        f"Cannot write the report into {out} ({exc.strerror or exc}). Write it into a "
        f"directory you can write with -o DIR, e.g. cltk report {' '.join(paths)} -o "
        "/tmp/cltk_report (the runs are only read).")


def _check_writable(out: Path, paths: list[str]) -> None:
    """Refuse, before reading any run, an output directory the report cannot be written into
    (tried, not guessed from permission bits: root, read-only mounts and ACLs all answer
    differently). Leaves nothing behind: a missing directory is tried as a scratch directory
    in its nearest existing parent."""
    import tempfile

    probe, scratch = out, None
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        if probe == out:
            with tempfile.TemporaryFile(dir=out):
                pass
        else:
            scratch = tempfile.mkdtemp(prefix=".cltk_report_", dir=probe)
    except OSError as exc:
        raise _unwritable(out, paths, exc) from None
    finally:
        if scratch is not None:
            os.rmdir(scratch)


def _list(argv: list[str]) -> int:
    from . import registry

    for kind in registry.config_kinds():
        group = registry.config_group(kind)
        print(f"{kind} ({group}=NAME): {', '.join(registry.names(kind))}")
        presets = {n: t for n, t in yaml_names(group).items() if n not in registry.names(kind)}
        if presets:
            print(f"  {group} presets: " + ", ".join(f"{n} ({t})" for n, t in
                                                      sorted(presets.items())))
    experiments = sorted(yaml_names("experiment"))
    if experiments:
        print(f"experiment (experiment=NAME): {', '.join(experiments)}")
    return 0


def config_groups() -> dict[str, list[str]]:
    """Every option of every config group (YAML files and registered names)."""
    from . import registry

    groups = {}
    for kind in registry.config_kinds():
        group = registry.config_group(kind)
        groups[group] = sorted(set(registry.names(kind)) | set(yaml_names(group)))
    groups["experiment"] = sorted(yaml_names("experiment"))
    return groups


def run_help() -> str:
    conf = resources.files("cl_toolkit.conf") / "config.yaml"
    lines = conf.read_text().splitlines()
    top = lines[lines.index(next(ln for ln in lines if ln.startswith("seed:"))):
                lines.index("hydra:")]
    groups = "\n".join(f"  {g}: {', '.join(opts)}" for g, opts in config_groups().items())
    return f"""usage: cltk run [KEY=VALUE ...] [-m] [--cfg job]

One run of a strategy on a task stream, or with -m a sweep over every combination of
comma-separated values (cltk run -m strategy=naive,replay seed=0,1). Overrides are Hydra's:
GROUP=OPTION selects a config, GROUP.KEY=VALUE sets a value, +KEY=VALUE adds a key.

Config groups (cltk list shows what each name is):
{groups}

Top-level keys (defaults):
""" + "\n".join(f"  {ln}" for ln in top if ln.strip() and not ln.startswith("#")) + """

Flags:
  -m, --multirun   sweep (hydra/launcher=joblib|submitit_local|submitit_slurm|cltk_ray)
  --cfg job        print the composed config (every hyperparameter in effect) and exit
  --hydra-help     Hydra's own options

Outputs: a run writes to <output_root>/<benchmark>/<strategy>/<overrides>/, a sweep to
<output_root>/multirun/<sweep overrides>/<run overrides>/ (README: Outputs)."""


COMMANDS = {"run": _run, "report": _report, "list": _list}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"cltk: unknown command {argv[0]!r}.{suggest(argv[0], COMMANDS)}",
                  file=sys.stderr)
        print(__doc__.strip().split("\n\n")[1] + "\n\n" + "cltk run --help lists the config "
              "groups and keys; cltk report --help the report's options.",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ClToolkitError as exc:
        _print_error(exc)
        return exc.exit_code

if __name__ == "__main__":
    sys.exit(main())
