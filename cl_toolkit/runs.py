"""Runs as they lie on disk, for the code that reads them after the fact (the report, its
renderers, the tracking sinks, the sweep bookkeeping): finding ``results.json`` files, reading a
sweep's index, flattening a config, a run's stream settings (what makes a report section) and
grouping runs that differ only in their seed, each group labelled by what tells it apart.

A leaf module: it imports nothing of the runner, the sweep machinery or the report, so any of
them can use it without an import cycle.
"""
from __future__ import annotations

import itertools
import json
import os
from collections import defaultdict
from pathlib import Path

from .config import NON_RUN_KEYS
from .errors import UsageError
from .store import RESULTS

INDEX = "sweep_index.json"
# Runs that differ only in these keys (the seed and the keys that do not change a run) are
# grouped as repeats of one configuration.
GROUP_EXCLUDE = {"seed", *NON_RUN_KEYS}


def find_results(paths, allow_empty: bool = False) -> list[Path]:
    """Every ``results.json`` under ``paths`` (run or sweep directories, searched recursively,
    or the files themselves)."""
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RESULTS)))
        else:
            raise UsageError(f"{p} does not exist; pass run or sweep directories (searched "
                             "recursively) or results.json files (e.g. runs/multirun).")
    if not found and not allow_empty:
        raise UsageError(f"No {RESULTS} under {', '.join(map(str, paths))}: no run has finished a "
                         "task there yet. Start one with cltk run, or pass the directory that "
                         "holds the runs.")
    return found


def read_index(sweep_dir: str | os.PathLike) -> dict:
    """The sweep's ``sweep_index.json`` (an empty index when there is none yet)."""
    path = Path(sweep_dir) / INDEX
    if not path.exists():
        return {"format": 1, "runs": {}}
    return json.loads(path.read_text())


def flatten_config(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"a.b": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_config(r: dict) -> dict:
    """The flattened config of a run minus the keys in `GROUP_EXCLUDE`."""
    return {k: v for k, v in flatten_config(r["config"]).items()
            if k.split(".")[0] not in GROUP_EXCLUDE}


def _strategy_rank(name: str) -> tuple:
    from .registry import BUILTINS

    order = list(BUILTINS["strategy"])
    return (order.index(name) if name in order else len(order), name)


# Keys of the benchmark node that say where the data lie or how they are fetched, not what the
# stream is (also any key ending in _root, _dir or _path): with the seeds, they do not make
# another stream (another report section).
LOCATION_KEYS = ("root", "download", "path")
ABSENT = "—"  # how a key that a run's config does not have is shown


def _is_seed(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "seed" or leaf.endswith("_seed")


def _is_location(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in LOCATION_KEYS or leaf.endswith(("_root", "_dir", "_path"))


def stream_settings(r: dict) -> dict:
    """The settings that make a run's stream: its config's benchmark node, flattened, minus the
    name, the seeds (``*seed``, e.g. a class order's: repeats of one stream) and where the data
    lie (`LOCATION_KEYS`, ``*_root``, ``*_dir``, ``*_path``, at any depth). Runs of one report
    section have equal stream settings."""
    node = (r.get("config") or {}).get("benchmark")
    flat = flatten_config(node) if isinstance(node, dict) else {}
    return {k: flat[k] for k in sorted(flat)
            if k != "name" and not _is_seed(k) and not _is_location(k)}


def _value(flat: dict, key: str) -> str:
    return json.dumps(flat[key], sort_keys=True, default=str) if key in flat else ABSENT


def varying_keys(flats: list[dict]) -> list[str]:
    """Keys whose values (a missing key counts as a value) differ among ``flats``, sorted."""
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({_value(f, k) for f in flats}) > 1]


def _rank_key(key: str) -> tuple:
    """Which differing keys a label prefers: the strategy's, the model's, then the others."""
    head = key.split(".")[0]
    order = ("strategy", "model", "trainer", "benchmark", "probe")
    return (order.index(head) if head in order else len(order), key)


def distinguishing_keys(flats: list[dict], exclude=()) -> list[str]:
    """The shortest list of keys whose values tell all ``flats`` apart (searched exhaustively
    up to three keys, then grown greedily), preferring the strategy's keys, then the model's.
    Flats that no key tells apart get every varying key."""
    candidates = sorted((k for k in varying_keys(flats) if k not in exclude), key=_rank_key)
    n = len({json.dumps(f, sort_keys=True, default=str) for f in flats})

    def parts(keys) -> int:
        return len({tuple(_value(f, k) for k in keys) for f in flats})

    if n <= 1:
        return []
    for size in range(1, min(3, len(candidates)) + 1):
        for keys in itertools.combinations(candidates, size):
            if parts(keys) == n:
                return list(keys)
    chosen: list[str] = []
    while parts(chosen) < n and len(chosen) < len(candidates):
        chosen.append(max((k for k in candidates if k not in chosen),
                          key=lambda k: (parts(chosen + [k]), -candidates.index(k))))
    return chosen if parts(chosen) == n else candidates


def short_names(keys) -> dict[str, str]:
    """``{key: name to show}``: a dotted key without its group (``strategy.lr`` -> ``lr``)
    where no other of ``keys`` ends the same way."""
    keys = list(keys)
    tails = defaultdict(list)
    for k in keys:
        tails[k.split(".", 1)[-1]].append(k)
    return {k: k.split(".", 1)[-1] if len(tails[k.split(".", 1)[-1]]) == 1 else k for k in keys}


def show(value) -> str:
    """A config value as labels and legends show it."""
    return ABSENT if value is ABSENT else str(value)


def describe_groups(results: list[dict]) -> list[dict]:
    """Group runs by config minus the seed (and the keys that do not change a run); one dict per
    group: ``label`` (what tells it apart from the other groups: the model's name where models
    differ, the strategy's name, then the shortest set of differing keys among the groups of that
    model and strategy), ``id`` (``R1``, ``R2``, ... in row order), ``settings`` (``{key:
    value}`` of every key that differs among all the groups, as `show` writes them) and
    ``runs``. Ordered as the registry lists strategies (baselines first), then by label."""
    keyed, flats = defaultdict(list), {}
    for r in results:
        flat = flat_config(r)
        key = json.dumps(flat, sort_keys=True, default=str)
        keyed[key].append(r)
        flats[key] = flat
    models = {str(f["model.name"]) for f in flats.values() if "model.name" in f}
    with_model = len(models) > 1

    def head(flat: dict) -> str:
        parts = [str(flat["model.name"])] if with_model and "model.name" in flat else []
        return " · ".join(parts + [str(flat.get("strategy.name"))])

    family = defaultdict(list)
    for key, flat in flats.items():
        family[head(flat)].append(key)
    varying = varying_keys(list(flats.values()))
    names = short_names(varying)
    groups = []
    for label, keys in family.items():
        members = [flats[k] for k in keys]
        shown = distinguishing_keys(members, exclude=("model.name", "strategy.name"))
        for key in keys:
            flat = flats[key]
            extra = ", ".join(f"{names[k]}={show(flat.get(k, ABSENT))}" for k in shown)
            groups.append({"label": label + (f" ({extra})" if extra else ""),
                           "settings": {k: show(flat.get(k, ABSENT)) for k in varying},
                           "runs": keyed[key]})
    groups.sort(key=lambda g: (_strategy_rank(str(g["runs"][0]["config"]["strategy"]["name"])),
                               g["label"]))
    for i, g in enumerate(groups, 1):
        g["id"] = f"R{i}"
    return groups


def group_runs(results: list[dict]) -> dict[str, list[dict]]:
    """``{label: runs}`` of `describe_groups`, in its order."""
    return {g["label"]: g["runs"] for g in describe_groups(results)}
