"""RESULTS.md tables of context policies on the PI stream: per (model, policy), mean ± 95 %
t-interval over seeds of accuracy against U in each update order, PI-LLM's auc_log1.5, the
share of context kept and the rows that keep exactly each key's last update (the oracle's rule).

    python -m cl_toolkit.context.table DIR [DIR ...]

Reads every results.json under the directories (runs and `cl_toolkit.context.evaluate`
outputs); a run without a context layer counts as ``none``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..probes.retention_metrics import mean_ci
from ..renderers.tokens import _POLICY_ORDER, _policy_label


def ci(values: list[float]) -> str:
    """``mean ± half-width`` of the 95 % t-interval, in %; one value: the value."""
    v = [100 * x for x in values if x is not None]
    if not v:
        return "-"
    mean, half = mean_ci(v)
    return f"{mean:.1f}" if half is None else f"{mean:.1f} ± {half:.1f}"


def load(dirs: list[str]) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("results.json")):
            r = json.loads(p.read_text())
            e = r.get("extras", {}).get("kv_interference")
            if e is None or r.get("status") != "done":
                continue
            key = (r["config"]["model"]["name"], _policy_label(r["config"]))
            rows.setdefault(key, []).append(e)
    return dict(sorted(rows.items(), key=lambda kv: (
        kv[0][0], _POLICY_ORDER.get(kv[0][1].split(" ")[0], 9), kv[0][1])))


def _md(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def tables(rows: dict[tuple[str, str], list[dict]]) -> str:
    ups = sorted({u for ex in rows.values() for e in ex for u in e["updates"]})

    def at(e, u, values):
        return values[e["updates"].index(u)] if u in e["updates"] else None

    def ctx(e, field, u):
        c = e.get("context")
        if c is None:
            return 1.0 if field == "kept_share" else None
        return at(e, u, c["by_updates"][field])

    out = []
    header = ["model", "context", "n", "gate"] + [f"U={u}" for u in ups] + ["AUC log1.5"]
    body = [[m, p, str(len(ex)), f"{sum(bool(e.get('learned', True)) for e in ex)}/{len(ex)}"] +
            [ci([at(e, u, e["by_updates"]["accuracy"]) for e in ex]) for u in ups] +
            [ci([e.get("auc_log15_updates") for e in ex])] for (m, p), ex in rows.items()]
    out.append("Accuracy (%), training (randomised) order\n\n" + _md(header, body))
    orders = sorted({o for ex in rows.values() for e in ex for o in e.get("other_orders", {})})
    for o in orders:
        body = [[m, p, str(len(ex)), f"{sum(bool(e.get('learned', True)) for e in ex)}/{len(ex)}"]
                + [ci([at(e, u, e["other_orders"][o]["by_updates"]["accuracy"]) for e in ex
                       if o in e.get("other_orders", {})]) for u in ups] +
                [ci([e["other_orders"][o].get("auc_log15_updates") for e in ex
                     if o in e.get("other_orders", {})])] for (m, p), ex in rows.items()]
        out.append(f"Accuracy (%), {o} order (not trained on)\n\n" + _md(header, body))
    header = ["model", "context"] + [f"kept U={u}" for u in ups] + \
        [f"rule U={u}" for u in ups] + [f"stale U={max(ups)}"]
    body = [[m, p] + [ci([ctx(e, "kept_share", u) for e in ex]) for u in ups] +
            [ci([ctx(e, "oracle_match", u) for e in ex]) for u in ups] +
            [ci([at(e, max(ups), e["by_updates"]["stale"]) for e in ex])]
            for (m, p), ex in rows.items()]
    out.append("Context kept (% of pairs) and rows keeping exactly each key's last update "
               "(rule, %), training order\n\n" + _md(header, body))
    return "\n\n".join(out)


if __name__ == "__main__":
    print(tables(load(sys.argv[1:])))
