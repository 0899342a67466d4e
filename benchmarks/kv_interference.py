"""Proactive interference (PI-LLM, Wang & Sun 2025, https://arxiv.org/abs/2506.08184): ``K``
keys, each updated ``U`` times in one interleaved stream of (key, value) pairs, then every key
is queried for its *last* value::

    x:  k2 a  k1 b  k2 c  k1 d | k1 k2        (U = 2 updates per key, K = 2 keys)
    y:  -100 ...               | d  c         (-100: no loss)

In LLMs accuracy falls log-linearly with U although the answer is the most recent mention. Token
0 is padding, keys come from ``[1, 1 + key_tokens)``, values from the rest of the vocabulary;
the K keys of a sequence are distinct and so are all its ``K * U`` values, so every wrong answer
falls in exactly one class: **stale** (an earlier value of the same key; which update it was is
recorded), **other key** (a value of another key) or **no value** (anything else).

Tasks: ``split="mixture"`` trains one task on sequences whose U is drawn from
``train_updates`` (left-padded to one length); ``"updates"``: one task per U;
``"keys"``: one task per K in ``train_keys`` at a fixed number of updates
``total_updates = K * U`` (fixed length, the paper's control). After every task the analysis
``kv_interference`` scores fresh sequences across ``probe_updates`` (also outside the training
range) and across ``probe_keys`` at ``total_updates``, with the error classes, and a summary:
the area under accuracy against log U, normalised to [0, 1].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX, Task, TaskStream, TensorData
from cl_toolkit.validation import at_least

from .common import TOKEN_SCENARIO

SPLITS = ("mixture", "updates", "keys")
PAD = 0


def seq_len(num_keys: int, updates: int) -> int:
    return 2 * num_keys * updates + num_keys


def check(vocab_size: int, key_tokens: int, num_keys: int, updates: int) -> None:
    if num_keys < 1 or updates < 1:
        raise ConfigError(f"kv_interference needs >= 1 key and >= 1 update; got K={num_keys}, "
                          f"U={updates}.")
    values = vocab_size - 1 - key_tokens
    if key_tokens < num_keys or values < num_keys * updates:
        raise ConfigError(
            f"benchmark.vocab_size={vocab_size} with benchmark.key_tokens={key_tokens} is too "
            f"small for K={num_keys} keys updated U={updates} times: it needs {num_keys} key "
            f"tokens and {num_keys * updates} distinct values, i.e. vocab_size >= "
            f"{1 + max(key_tokens, num_keys) + num_keys * updates}. Raise "
            "benchmark.vocab_size (or key_tokens), or lower the numbers of keys / updates.")


def sample(n: int, vocab_size: int, key_tokens: int, num_keys: int, updates: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` random sequences, see `assemble`."""
    check(vocab_size, key_tokens, num_keys, updates)
    K, U, g = num_keys, updates, generator
    keys = torch.rand(n, key_tokens, generator=g).argsort(1)[:, :K] + 1
    values = torch.rand(n, vocab_size - 1 - key_tokens, generator=g).argsort(1)[:, :K * U] + \
        1 + key_tokens
    slot = torch.arange(K).repeat_interleave(U).expand(n, K * U)
    slot = slot.gather(1, torch.rand(n, K * U, generator=g).argsort(1))  # interleaved order
    order = torch.rand(n, K, generator=g).argsort(1)
    return assemble(keys, slot, values, order)


def assemble(keys: torch.Tensor, slot: torch.Tensor, values: torch.Tensor, order: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sequences ``x, y [n, 2KU + K]`` from their parts: update ``j`` writes ``values[:, j]``
    to key slot ``slot[:, j]`` (token ``keys[:, slot]``); the queries ask the key slots in
    ``order [n, K]``. Also returns the ground truth: ``history [n, K, U]`` (the values of key
    slot k in update order) and ``query_pos [n, K]`` (where key slot k is queried)."""
    n, K = keys.shape
    U = slot.shape[1] // K
    nth = torch.nn.functional.one_hot(slot, K).cumsum(1).gather(2, slot[..., None])[..., 0] - 1
    history = torch.empty(n, K * U, dtype=torch.long).scatter_(1, slot * U + nth, values)
    history = history.view(n, K, U)
    x = torch.empty(n, seq_len(K, U), dtype=torch.long)
    x[:, 0:2 * K * U:2], x[:, 1:2 * K * U:2] = keys.gather(1, slot), values
    x[:, 2 * K * U:] = keys.gather(1, order)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, 2 * K * U:] = history[:, :, -1].gather(1, order)
    query_pos = torch.empty_like(order).scatter_(1, order,
                                                 2 * K * U + torch.arange(K).expand(n, K))
    return x, y, {"history": history, "query_pos": query_pos}


def classify(pred: torch.Tensor, history: torch.Tensor) -> dict[str, torch.Tensor]:
    """Answers ``pred [N, K]`` (to the query of key slot k) against ``history [N, K, U]``:
    boolean ``[N, K]`` masks ``correct``, ``stale``, ``other_key``, ``no_value`` (exactly one is
    true per query) and ``stale_update [N, K]``: which update (1 = first) a stale answer
    repeats, 0 otherwise."""
    K = history.shape[1]
    correct = pred == history[:, :, -1]
    earlier = pred[:, :, None] == history[:, :, :-1]
    stale = earlier.any(-1)
    first = earlier.float().argmax(-1) + 1 if earlier.shape[-1] else torch.zeros_like(pred)
    stale_update = torch.where(stale, first, 0)
    anywhere = (pred[:, :, None, None] == history[:, None]).any(-1)  # [N, K(query), K(owner)]
    other_key = (anywhere & ~torch.eye(K, dtype=torch.bool)).any(-1)
    return {"correct": correct, "stale": stale, "other_key": other_key,
            "no_value": ~(correct | stale | other_key), "stale_update": stale_update}


def score(pred: torch.Tensor, history: torch.Tensor) -> dict:
    """Fractions of all queries: accuracy and each error class; ``stale_by_update[j-1]``: the
    fraction of queries answered with update j (j = 1 .. U-1)."""
    c = classify(pred, history)
    total = c["correct"].numel()
    U = history.shape[2]
    by_update = torch.bincount(c["stale_update"].flatten(), minlength=U)[1:U]
    return {"accuracy": float(c["correct"].sum()) / total,
            "stale": float(c["stale"].sum()) / total,
            "other_key": float(c["other_key"].sum()) / total,
            "no_value": float(c["no_value"].sum()) / total,
            "stale_by_update": [int(v) / total for v in by_update]}


def auc_log(updates: Sequence[int], accuracy: Sequence[float]) -> float:
    """Area under accuracy against log U, divided by the log range (mean accuracy on a log
    axis; one point: its accuracy)."""
    if len(updates) == 1:
        return float(accuracy[0])
    u = [math.log(v) for v in updates]
    area = sum((u[i + 1] - u[i]) * (accuracy[i] + accuracy[i + 1]) / 2 for i in range(len(u) - 1))
    return area / (u[-1] - u[0])


def _task(index: int, name: str, groups: list[tuple[int, int]], n_train: int, n_test: int,
          vocab_size: int, key_tokens: int, g: torch.Generator) -> Task:
    """A task over (K, U) groups, an equal share of sequences each, left-padded to one length."""
    def data(n):
        parts = [sample(n // len(groups) + (i < n % len(groups)), vocab_size, key_tokens, k, u,
                        g)[:2] for i, (k, u) in enumerate(groups)]
        L = max(x.shape[1] for x, _ in parts)
        pad = [(torch.nn.functional.pad(x, (L - x.shape[1], 0), value=PAD),
                torch.nn.functional.pad(y, (L - y.shape[1], 0), value=IGNORE_INDEX))
               for x, y in parts]
        x, y = torch.cat([p[0] for p in pad]), torch.cat([p[1] for p in pad])
        perm = torch.randperm(len(x), generator=g)
        return TensorData(x[perm], y[perm])

    return Task(index, name, data(n_train), data(n_test), (),
                info={"groups": [list(kv) for kv in groups]})


def kv_interference_stream(vocab_size: int = 512, key_tokens: int = 32, num_keys: int = 8,
                           train_updates: Sequence[int] = (1, 2, 4), split: str = "mixture",
                           train_keys: Sequence[int] = (2, 4, 8), total_updates: int = 32,
                           train_size: int = 2000, test_size: int = 256,
                           probe_updates: Sequence[int] = (1, 2, 4, 8, 16, 32),
                           probe_keys: Sequence[int] = (2, 4, 8, 16), probe_size: int = 128,
                           scenario: str = "domain-il", seed: int = 0) -> TaskStream:
    """The PI stream (see the module doc). ``probe_*`` = ``[]`` skips that curve."""
    if split not in SPLITS:
        raise ConfigError(f"benchmark.split={split!r}; choose one of {', '.join(SPLITS)}.")
    K = num_keys
    if split == "mixture":
        plan = [("mixture", [(K, int(u)) for u in train_updates])]
    elif split == "updates":
        plan = [(f"U{u}", [(K, int(u))]) for u in train_updates]
    else:
        plan = [(f"K{k}", [(int(k), total_updates // int(k))]) for k in train_keys]
    key_probe = [(int(k), total_updates // int(k)) for k in probe_keys]
    points = [kv for _, groups in plan for kv in groups] + \
        [(K, int(u)) for u in probe_updates] + key_probe
    for k, u in sorted(points, key=lambda p: (-p[0] * p[1], -p[0])):  # the largest need first
        check(vocab_size, key_tokens, k, u)
    g = torch.Generator().manual_seed(seed)
    tasks = [_task(i, name, groups, train_size, test_size, vocab_size, key_tokens, g)
             for i, (name, groups) in enumerate(plan)]

    def analyse(predict) -> dict:
        """Accuracy and error classes against U (K fixed) and against K (K * U fixed)."""
        pg = torch.Generator().manual_seed(seed + 7919)

        def curve(points):
            rows = []
            for k, u in points:
                x, _, truth = sample(probe_size, vocab_size, key_tokens, k, u, pg)
                rows.append(score(predict(x).gather(1, truth["query_pos"]), truth["history"]))
            return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

        by_u = curve([(K, int(u)) for u in probe_updates])
        out = {"num_keys": K, "train_updates": [int(u) for u in train_updates], "split": split,
               "updates": [int(u) for u in probe_updates], "by_updates": by_u,
               "keys": [k for k, _ in key_probe], "total_updates": total_updates,
               "by_keys": curve(key_probe)}
        if by_u:
            out["auc_log_updates"] = auc_log(out["updates"], by_u["accuracy"])
        return out

    longest = max(seq_len(k, u) for k, u in points)  # probes included: models must take them
    return TaskStream("kv_interference", tasks, scenario, vocab_size, (longest,), seed,
                      info={"split": split, "num_keys": K}, vocab_size=vocab_size,
                      analyses={"kv_interference": analyse}
                      if list(probe_updates) or list(probe_keys) else {})


kv_interference_stream.task_kind = "tokens"  # what the stream holds, known before it is built (see validation)
kv_interference_stream.ranges = {
    "vocab_size": at_least(1), "key_tokens": at_least(1), "num_keys": at_least(1),
    "train_updates": at_least(1, min_items=1), "train_keys": at_least(1, min_items=1),
    "total_updates": at_least(1), "train_size": at_least(1), "test_size": at_least(1),
    "probe_updates": at_least(1), "probe_keys": at_least(1), "probe_size": at_least(1),
    "scenario": TOKEN_SCENARIO}
