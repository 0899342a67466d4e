"""Cost of ``probe=retention`` against the same run without the probe.

Since issue 23 the probe runs Orhan's protocol in branches of its own (one per exposure count,
each a study plus up to 1,000 retention updates, restored afterwards), so at its defaults it
costs several times the run's own training; ``--probe`` passes probe keys to measure a lighter
setting (the old target, < 10 % of the run's training time, was for the issue-17 probe: one
shared study, measurements riding on the run's own updates, e.g. ``--probe
probe.exposure=massed 'probe.schedule=[0,1,3,10]' probe.n_study=8``).

    python -m perf.retention_overhead
        [--models mom_lm gdn_lm gla_lm transformer_lm] [--epochs 2] [--repeats 1]
        [--probe KEY=VALUE ...]

Both runs of a model use the configs that ``cltk run benchmark=fortunes model=<m>
[probe=retention]`` composes (plus ``strategy.epochs``), train on the same batches (the probe
draws its stimuli from its own generator) and are timed by the runner (``timings.train_s``,
which includes the hooks). The probe's own seconds (study steps + measurements, timed inside
the run) give its share of the run's training time, a ratio measured within one run and so
robust to the machine's load; the with/without difference compares two runs and moves with
the load on a shared machine (the script prints the load average). The order of the two runs
alternates between repeats.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def timed_run(model: str, epochs: int, probe: bool, out: Path,
              probe_args: list[str] | None = None) -> tuple[float, float, int]:
    """(training seconds, probe seconds, training updates) of one run."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cl_toolkit.runner import run

    overrides = ["benchmark=fortunes", f"model={model}", f"strategy.epochs={epochs}",
                 "threads=1", "quiet=true"] + \
        (["probe=retention", *(probe_args or [])] if probe else [])
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    r = run(cfg, out)
    extra = r.get("extras", {}).get("retention", {})
    return sum(r["timings"]["train_s"]), extra.get("probe_s", 0.0), extra.get("updates", 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["mom_lm", "gdn_lm", "gla_lm", "transformer_lm"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--probe", nargs="*", default=[], help="probe keys, e.g. probe.n_study=8")
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; benchmark=fortunes (defaults), "
          f"strategy.epochs={args.epochs}, probe {' '.join(args.probe) or 'defaults'}")
    print("| model | updates | train s without | train s with probe | probe s | probe share "
          "of the run | with / without - 1 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            base = with_ = probe_s = 0.0
            for rep in range(args.repeats):
                order = [False, True] if rep % 2 == 0 else [True, False]
                for probe in order:
                    s, ps, n = timed_run(model, args.epochs, probe,
                                         Path(tmp) / f"{model}-{rep}-{probe}", args.probe)
                    if probe:
                        with_, probe_s, updates = with_ + s, probe_s + ps, n
                    else:
                        base += s
            print(f"| {model} | {updates} | {base / args.repeats:.1f} | "
                  f"{with_ / args.repeats:.1f} | {probe_s / args.repeats:.1f} | "
                  f"{100 * probe_s / with_:.1f} % | {100 * (with_ - base) / base:+.1f} % |")


if __name__ == "__main__":
    main()
