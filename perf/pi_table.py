"""Proactive interference (PI-LLM) tables from ``cltk run`` results: per row (model, and any
override that differs between runs), mean ± 95 % t-interval over seeds of the gate (accuracy at
the training sizes), both AUCs, accuracy against U in each update order probed, against K at a
fixed U per key and at a fixed K x U, with the chance guessers' values beside them.

    python -m perf.pi_table runs/multirun [more dirs] [--by model.hidden_size]

Reads every ``results.json`` under the directories (``extras["kv_interference"]``, written by
``cl_toolkit.benchmarks.kv_interference``). Runs that did not pass their gate are counted in
the gate table and left out of the curves (they did not learn the task).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from cl_toolkit.probes.retention_metrics import mean_ci


def ci(values: list[float]) -> str:
    """``mean ± half-width`` of the 95 % t-interval, in %; one value: the value."""
    v = [100 * x for x in values]
    if not v:
        return ""
    m, half = mean_ci(v)
    return f"{m:.1f}" if half is None else f"{m:.1f} ± {half:.1f}"


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if node != {} else None


def load(dirs: list[str], by: list[str]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for d in dirs:
        for f in sorted(Path(d).rglob("results.json")):
            r = json.loads(f.read_text())
            e = r.get("extras", {}).get("kv_interference")
            if e is None:
                continue
            label = " ".join([r["config"]["model"]["name"]] +
                             [f"{k.split('.')[-1]}={_get(r['config'], k)}" for k in by])
            rows.setdefault(label, []).append(e)
    return rows


def loglinear(updates: list[int], acc: list[float]) -> tuple[float, float]:
    """Least-squares line of accuracy against log2 U: (slope per doubling, R^2; nan when the
    accuracy does not vary)."""
    x = [math.log2(u) for u in updates]
    mx, my = sum(x) / len(x), sum(acc) / len(acc)
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, acc))
    syy = sum((b - my) ** 2 for b in acc)
    slope = sxy / sxx
    return slope, (sxy * sxy / (sxx * syy) if syy > 0 else float("nan"))


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def curve_table(rows, points_key, node_of, star_key, chance=True, aucs=False) -> str:
    learned = {k: [e for e in ex if e["learned"]] for k, ex in rows.items()}
    learned = {k: ex for k, ex in learned.items() if ex and node_of(ex[0])}
    if not learned:
        return "(no run passed its gate)"
    first = next(iter(learned.values()))[0]
    pts = first[points_key]
    ext = set(first["extrapolated"].get(star_key, [])) if star_key else set(pts)
    header = ["row", "n"] + (["AUC log U", "AUC log1.5 (PI-LLM)", "slope / doubling of U",
                              "R2 log-linear (mean curve)"] if aucs else []) + \
        [f"{points_key[0].upper()}={p}{'*' if p in ext else ''}" for p in pts]
    out = []
    for k, ex in learned.items():
        cells = [k, str(len(ex))]
        if aucs:
            cells += [ci([node_of(e)["auc_log_updates"] for e in ex]),
                      ci([node_of(e)["auc_log15_updates"] for e in ex])]
        curve = [node_of(e)["by_updates"] if aucs else node_of(e) for e in ex]
        if aucs:
            mean = [sum(c["accuracy"][i] for c in curve) / len(curve) for i in range(len(pts))]
            cells += [ci([loglinear(pts, c["accuracy"])[0] for c in curve]),
                      f"{loglinear(pts, mean)[1]:.2f}"]
        cells += [ci([c["accuracy"][i] for c in curve]) for i in range(len(pts))]
        out.append(cells)
    if chance:
        c0 = (node_of(first)["by_updates"] if aucs else node_of(first))["chance"]
        for name in ("value_in_context", "value_of_key"):
            extra = [ci([first["chance_auc"][name]["auc_log_updates"]]),
                     ci([first["chance_auc"][name]["auc_log15_updates"]]),
                     ci([loglinear(pts, c0[name]["accuracy"])[0]]),
                     f"{loglinear(pts, c0[name]['accuracy'])[1]:.2f}"] if aucs else []
            out.append([f"chance: {name}", ""] + extra + [ci([a]) for a in c0[name]["accuracy"]])
    return table(header, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--by", nargs="*", default=[], help="config keys that split rows")
    a = ap.parse_args(argv)
    rows = load(a.dirs, a.by)
    print("**Gate** (accuracy % at the training sizes; learned = >= gate)\n")
    print(table(["row", "n", "train accuracy", "learned"],
                [[k, str(len(ex)), ci([e["train_accuracy"] for e in ex]),
                  f"{sum(e['learned'] for e in ex)} of {len(ex)}"] for k, ex in rows.items()]))
    order = next(iter(rows.values()))[0]["order"]
    print(f"\n**Accuracy (%) against U, {order} order (the training order)**\n")
    print(curve_table(rows, "updates", lambda e: e, "updates", aucs=True))
    for o in next(iter(rows.values()))[0]["other_orders"]:
        print(f"\n**Accuracy (%) against U, {o} order (not trained on)**\n")
        print(curve_table(rows, "updates", lambda e, o=o: e["other_orders"][o], None,
                          aucs=True))
    e0 = next(iter(rows.values()))[0]
    print(f"\n**Accuracy (%) against K at U = {e0['keys_updates']} per key**\n")
    print(curve_table(rows, "keys", lambda e: e["by_keys"], "keys"))
    print(f"\n**Accuracy (%) against K at K x U = {e0['total_updates']}**\n")
    print(curve_table(rows, "keys_fixed_total", lambda e: e["by_keys_fixed_total"],
                      "keys_fixed_total"))
    print("\n**Errors at the largest U, % of queries, per update order**\n")
    out = []
    for k, ex in rows.items():
        ex = [e for e in ex if e["learned"]]
        for o in ([e0["order"]] + list(e0["other_orders"])) if ex else []:
            def node(e, o=o):
                return e["by_updates"] if o == e["order"] else e["other_orders"][o]["by_updates"]
            out.append([f"{k} ({o})", str(len(ex))] + [ci([node(e)[c][-1] for e in ex])
                                                       for c in ("stale", "other_key",
                                                                 "no_value")])
    ch = e0["by_updates"]["chance"]["value_in_context"]
    out.append(["chance: value_in_context", ""] + [ci([ch[c][-1]]) for c in
                                                   ("stale", "other_key", "no_value")])
    print(table(["row", "n", "stale", "other key", "no value"], out))


if __name__ == "__main__":
    main()
