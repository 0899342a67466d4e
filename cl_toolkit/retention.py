"""``python -m cl_toolkit.retention RUN_OR_SWEEP_DIR... [-o DIR]``: print the tables of the
retention runs found there (``probe=retention``, `cl_toolkit.probes.retention`) and write their
plots to DIR (default: the first path), as the report's ``retention`` renderer draws them:
every effect against the unstudied control set, with 95 % confidence intervals over seeds.

A missing path, a folder without retention runs, malformed retention results or runs that
measured nothing end in one ``error: ...`` line and exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ClToolkitError, UsageError
from .renderers.retention import check, render
from .runs import find_results
from .store import read_json


def retention_runs(paths: list[str]) -> list[dict]:
    """The results under ``paths`` that hold a retention curve; refused (UsageError) when there
    are none, when one is malformed, or when none measured anything."""
    files = find_results(paths)
    runs, where = [], ", ".join(paths)
    for f in files:
        r = read_json(f)
        extra = (r.get("extras") or {}).get("retention") if isinstance(r, dict) else None
        if extra is None:
            continue
        try:
            check(extra)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{f}: its extras['retention'] is malformed ({exc}); it was not "
                             "written by this version of probe=retention (runs before the "
                             "unstudied control set lack 'set' and 'recall_rouge') or was "
                             "edited. Rerun that run or leave it out.") from None
        runs.append({**r, "_file": str(f)})
    if not runs:
        raise UsageError(f"No retention probe results under {where}: none of its {len(files)} "
                         "results.json ran with probe=retention. Run one with cltk run "
                         "benchmark=fortunes model=gdn_lm probe=retention, or pass the "
                         "directory that holds such runs.")
    if not any(r["extras"]["retention"]["points"] for r in runs):
        why = "; ".join(f"{r['_file']}: {r['extras']['retention'].get('note') or _why(r)}"
                        for r in runs[:3]) + ("; ..." if len(runs) > 3 else "")
        raise UsageError(f"The {len(runs)} retention run(s) under {where} measured nothing "
                         f"after their study ({why}). Rerun with probe.study_after=null (after "
                         "the last task), a lower probe.study_after or more training updates.")
    return runs


def _why(r: dict) -> str:
    extra = r["extras"]["retention"]
    if extra.get("study_update") is None:
        return (f"{extra.get('updates', '?')} training updates so far, probe.study_after="
                f"{extra.get('study_after', '?')}")
    return f"studied at update {extra['study_update']}, no measurement point reached yet"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_toolkit.retention")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", default=None)
    args = p.parse_args(argv)
    try:
        runs = retention_runs(args.paths)
    except ClToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for r in runs:
        if not r["extras"]["retention"]["points"]:
            print(f"note: {r['_file']} measured nothing ("
                  f"{r['extras']['retention'].get('note') or _why(r)}); left out.",
                  file=sys.stderr)
    md, _ = render([r for r in runs if r["extras"]["retention"]["points"]],
                   Path(args.out or args.paths[0]))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
