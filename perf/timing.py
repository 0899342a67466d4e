"""Wall-clock timing shared by the CPU perf scripts."""
from __future__ import annotations

import time


def best_seconds(fn, repeats: int, calls: int = 1, warmup: int = 0) -> float:
    """Seconds per call of ``fn``: the best over ``repeats`` runs of ``calls`` calls each (on a
    shared machine the minimum is the run least disturbed by other jobs)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best
