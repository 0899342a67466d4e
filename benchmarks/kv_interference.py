"""Proactive interference (PI-LLM, Wang & Sun 2025, https://arxiv.org/abs/2506.08184): ``K``
keys, each updated ``U`` times in one stream of (key, value) pairs, then every key is queried
for its *last* value::

    x:  k2 a  k1 b  k2 c  k1 d | k1 k2        (U = 2 updates per key, K = 2 keys)
    y:  -100 ...               | d  c         (-100: no loss)

In LLMs accuracy falls log-linearly with U although the answer is the most recent mention. Token
0 is padding, keys come from ``[1, 1 + key_tokens)``, values from the rest of the vocabulary;
the K keys of a sequence are distinct and so are all its ``K * U`` values, so every wrong answer
falls in exactly one class: **stale** (an earlier value of the same key; which update it was is
recorded), **other key** (a value of another key) or **no value** (anything else).

Update order (``order``), as PI-LLM's two update tests: ``"random"`` interleaves the keys' updates
at random (their main test), ``"sequential"`` writes all U updates of one key, then all of the
next ("strictly sequential blocks", their sequential test). Training and the main probe use
``order``; ``probe_orders`` adds the U curve in the other order (not trained on).

Tasks: ``split="mixture"`` trains one task on sequences with K = ``num_keys`` and U drawn from
``train_updates`` (left-padded to one length); ``"updates"``: one task per U; ``"keys"``: one task
per K in ``train_keys`` at ``keys_updates`` updates per key (U fixed, as PI-LLM's keys test);
``"keys_fixed_total"``: one task per K at ``total_updates = K * U`` (a fixed sequence length, so
U falls as K rises: a length control, not the paper's keys test).

After every task the analysis ``kv_interference`` scores fresh sequences:

- ``by_updates``: against ``probe_updates`` at K = ``num_keys`` (also outside training);
- ``by_keys``: against ``probe_keys`` at a fixed ``keys_updates`` updates per key (PI-LLM's keys
  test: K varies, U per key does not);
- ``by_keys_fixed_total``: against ``probe_keys_fixed_total`` at K x U = ``total_updates``;
- at the training sizes (every (K, U) a task was trained on, in ``order``, left-padded to the
  length it had in training): ``train_accuracy``, their mean, and ``learned = train_accuracy >= learned_gate``. A run that did not learn its
  training distribution says nothing about interference;
- ``extrapolated``: the probe points of each curve outside the training box (K and U beyond
  the smallest / largest trained);
- beside each curve, ``chance``: the expected accuracy and error shares (analytic, at each
  point) of three guessers: ``uniform_value`` (any value token), ``value_in_context`` (one of
  the K x U values in the sequence: stale and other-key shares from combinatorics alone) and
  ``value_of_key`` (one of the queried key's U values: binds keys, ignores recency);
- two summaries of the U curve: ``auc_log_updates``, the area under accuracy against log U over
  the log range (ours, in [0, 1]), and ``auc_log15_updates``, PI-LLM's ``auc_log1.5``: the mean
  of the accuracies weighted by log_1.5(max(U, 2)) (as the scorer on the PI-LLM dataset card,
  huggingface.co/datasets/giantfish-fly/pi-llm, and OpenCompass' PI-LLM evaluator define it;
  each point here holds the same number of sequences, so per point = per sequence).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX, Task, TaskStream, TensorData
from cl_toolkit.validation import at_least, between, one_of

from .common import TOKEN_SCENARIO

SPLITS = ("mixture", "updates", "keys", "keys_fixed_total")
ORDERS = ("random", "sequential")
CHANCE = ("uniform_value", "value_in_context", "value_of_key")
CLASSES = ("accuracy", "stale", "other_key", "no_value")
PAD = 0


def seq_len(num_keys: int, updates: int) -> int:
    return 2 * num_keys * updates + num_keys


def check(vocab_size: int, key_tokens: int, num_keys: int, updates: int) -> None:
    if num_keys < 1 or updates < 1:
        raise ConfigError(f"kv_interference needs >= 1 key and >= 1 update; got K={num_keys}, "
                          f"U={updates}. With split=keys_fixed_total or probe_keys_fixed_total, "
                          "raise benchmark.total_updates to at least the largest K.")
    values = vocab_size - 1 - key_tokens
    if key_tokens < num_keys or values < num_keys * updates:
        raise ConfigError(
            f"benchmark.vocab_size={vocab_size} with benchmark.key_tokens={key_tokens} is too "
            f"small for K={num_keys} keys updated U={updates} times: it needs {num_keys} key "
            f"tokens and {num_keys * updates} distinct values, i.e. vocab_size >= "
            f"{1 + max(key_tokens, num_keys) + num_keys * updates}. Raise "
            "benchmark.vocab_size (or key_tokens), or lower the numbers of keys / updates.")


def text_form(vocab_size: int, key_tokens: int) -> tuple[str, ...]:
    """The text of every token id (for pretrained LMs, cl_toolkit/models/hf_lm.py), as PI-LLM's
    "key: value" update lines: padding is empty, key k is ``"\\nkey{k}"``, the j-th value
    ``": {j}"`` (the colon opens the value, so that all keys and all values share their leading
    LM tokens: fewer multi-token prefixes to score), numbers zero-padded to one width per kind
    so that no text is a prefix of another (our choice)."""
    kw, vw = len(str(key_tokens)), len(str(vocab_size - 1 - key_tokens))
    return ("",) + tuple(f"\nkey{k:0{kw}d}" for k in range(1, key_tokens + 1)) + \
        tuple(f": {j:0{vw}d}" for j in range(1, vocab_size - key_tokens))


def sample(n: int, vocab_size: int, key_tokens: int, num_keys: int, updates: int,
           generator: torch.Generator, order: str = "random"
           ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` random sequences, see `assemble`; ``order`` of the updates: ``"random"``
    (interleaved) or ``"sequential"`` (key slot 0's U updates, then slot 1's, ...). The same
    generator state gives the same keys, values and query order in both orders."""
    check(vocab_size, key_tokens, num_keys, updates)
    if order not in ORDERS:
        raise ConfigError(f"benchmark.order={order!r}; choose one of {', '.join(ORDERS)}.")
    K, U, g = num_keys, updates, generator
    keys = torch.rand(n, key_tokens, generator=g).argsort(1)[:, :K] + 1
    values = torch.rand(n, vocab_size - 1 - key_tokens, generator=g).argsort(1)[:, :K * U] + \
        1 + key_tokens
    slot = torch.arange(K).repeat_interleave(U).expand(n, K * U)
    shuffle = torch.rand(n, K * U, generator=g).argsort(1)
    if order == "random":
        slot = slot.gather(1, shuffle)  # interleaved
    queries = torch.rand(n, K, generator=g).argsort(1)
    return assemble(keys, slot, values, queries)


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


def chance(num_keys: int, updates: int, values: int) -> dict[str, dict[str, float]]:
    """Expected shares of the answer classes for three guessers at (K, U) with ``values``
    value tokens in the vocabulary: ``uniform_value`` answers any value token, uniformly;
    ``value_in_context`` one of the K * U values of the sequence; ``value_of_key`` one of the
    queried key's U values (it binds keys but ignores which update came last)."""
    K, U, V = num_keys, updates, values
    return {"uniform_value": {"accuracy": 1 / V, "stale": (U - 1) / V,
                              "other_key": (K - 1) * U / V, "no_value": 1 - K * U / V},
            "value_in_context": {"accuracy": 1 / (K * U), "stale": (U - 1) / (K * U),
                                 "other_key": (K - 1) / K, "no_value": 0.0},
            "value_of_key": {"accuracy": 1 / U, "stale": (U - 1) / U, "other_key": 0.0,
                             "no_value": 0.0}}


def auc_log(updates: Sequence[int], accuracy: Sequence[float]) -> float:
    """Area under accuracy against log U, divided by the log range (mean accuracy on a log
    axis; one point: its accuracy)."""
    if len(updates) == 1:
        return float(accuracy[0])
    u = [math.log(v) for v in updates]
    area = sum((u[i + 1] - u[i]) * (accuracy[i] + accuracy[i + 1]) / 2 for i in range(len(u) - 1))
    return area / (u[-1] - u[0])


def auc_log15(updates: Sequence[int], accuracy: Sequence[float]) -> float:
    """PI-LLM's ``auc_log1.5``: the mean accuracy weighted by log_1.5(max(U, 2)), so harder
    points (more updates) count more and U = 1 counts as U = 2 (the scorer on the PI-LLM
    dataset card / OpenCompass' PI-LLM evaluator, per sequence; here every point holds the same
    number of sequences)."""
    w = [math.log(max(int(u), 2)) / math.log(1.5) for u in updates]
    return sum(a * wi for a, wi in zip(accuracy, w)) / sum(w)


def _task(index: int, name: str, groups: list[tuple[int, int]], n_train: int, n_test: int,
          vocab_size: int, key_tokens: int, order: str, g: torch.Generator) -> Task:
    """A task over (K, U) groups, an equal share of sequences each, left-padded to one length."""
    def data(n):
        parts = [sample(n // len(groups) + (i < n % len(groups)), vocab_size, key_tokens, k, u,
                        g, order)[:2] for i, (k, u) in enumerate(groups)]
        L = max(x.shape[1] for x, _ in parts)
        pad = [(torch.nn.functional.pad(x, (L - x.shape[1], 0), value=PAD),
                torch.nn.functional.pad(y, (L - y.shape[1], 0), value=IGNORE_INDEX))
               for x, y in parts]
        x, y = torch.cat([p[0] for p in pad]), torch.cat([p[1] for p in pad])
        perm = torch.randperm(len(x), generator=g)
        return TensorData(x[perm], y[perm])

    return Task(index, name, data(n_train), data(n_test), (),
                info={"groups": [list(kv) for kv in groups], "order": order})


def outside(points: Sequence[tuple[int, int]], trained: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each (K, U) lies outside the box of the trained (K, U): K or U below the
    smallest or above the largest trained (a point inside the box but not trained on, U = 3
    between 2 and 4, is interpolation and counts as inside)."""
    ks, us = [k for k, _ in trained], [u for _, u in trained]
    return [not (min(ks) <= k <= max(ks) and min(us) <= u <= max(us)) for k, u in points]


def kv_interference_stream(vocab_size: int = 48, key_tokens: int = 8, num_keys: int = 2,
                           train_updates: Sequence[int] = (1, 2, 4), split: str = "mixture",
                           order: str = "random", train_keys: Sequence[int] = (1, 2),
                           keys_updates: int = 4, total_updates: int = 8,
                           train_size: int = 19200, test_size: int = 256,
                           probe_updates: Sequence[int] = (1, 2, 4, 8, 16),
                           probe_orders: Sequence[str] = ("random", "sequential"),
                           probe_keys: Sequence[int] = (1, 2, 4, 8),
                           probe_keys_fixed_total: Sequence[int] = (2, 4, 8),
                           probe_size: int = 256, learned_gate: float = 0.9,
                           scenario: str = "domain-il", seed: int = 0) -> TaskStream:
    """The PI stream (see the module doc). A ``probe_*`` list = ``[]`` skips that curve."""
    if split not in SPLITS:
        raise ConfigError(f"benchmark.split={split!r}; choose one of {', '.join(SPLITS)}.")
    if order not in ORDERS:
        raise ConfigError(f"benchmark.order={order!r}; choose one of {', '.join(ORDERS)}.")
    bad = [o for o in probe_orders if o not in ORDERS]
    if bad:
        raise ConfigError(f"benchmark.probe_orders holds {bad}; each must be one of "
                          f"{', '.join(ORDERS)}, e.g. benchmark.probe_orders=[random,sequential]"
                          " (or [] for the training order only).")
    if not 0 <= learned_gate <= 1:
        raise ConfigError(f"benchmark.learned_gate={learned_gate!r} must be an accuracy in "
                          "[0, 1], e.g. benchmark.learned_gate=0.9.")
    K = num_keys
    if split == "mixture":
        plan = [("mixture", [(K, int(u)) for u in train_updates])]
    elif split == "updates":
        plan = [(f"U{u}", [(K, int(u))]) for u in train_updates]
    elif split == "keys":
        plan = [(f"K{k}", [(int(k), keys_updates)]) for k in train_keys]
    else:
        plan = [(f"K{k}", [(int(k), total_updates // int(k))]) for k in train_keys]
    trained = [kv for _, groups in plan for kv in groups]
    # the length a trained (K, U) had in training: its task's longest, left-padded to it
    train_length = {kv: max(seq_len(*p) for p in groups) for _, groups in plan for kv in groups}
    u_probe = [(K, int(u)) for u in probe_updates]
    k_probe = [(int(k), keys_updates) for k in probe_keys]
    t_probe = [(int(k), total_updates // int(k)) for k in probe_keys_fixed_total]
    points = trained + u_probe + k_probe + t_probe
    for k, u in sorted(points, key=lambda p: (-p[0] * p[1], -p[0])):  # the largest need first
        check(vocab_size, key_tokens, k, u)
    g = torch.Generator().manual_seed(seed)
    tasks = [_task(i, name, groups, train_size, test_size, vocab_size, key_tokens, order, g)
             for i, (name, groups) in enumerate(plan)]
    values = vocab_size - 1 - key_tokens
    other_orders = [o for o in dict.fromkeys(probe_orders) if o != order]

    def analyse(predict) -> dict:
        """Accuracy, error classes and chance against U, against K (U fixed) and against K
        (K x U fixed); accuracy at the training sizes and the gate."""
        pg = torch.Generator().manual_seed(seed + 7919)

        def curve(pts, in_order=order, as_trained=False):
            rows = []
            for k, u in pts:
                x, _, truth = sample(probe_size, vocab_size, key_tokens, k, u, pg, in_order)
                pad = train_length[k, u] - x.shape[1] if as_trained else 0
                x = torch.nn.functional.pad(x, (pad, 0), value=PAD)
                rows.append(score(predict(x).gather(1, truth["query_pos"] + pad),
                                  truth["history"]))
            if not rows:
                return {}
            out = {key: [r[key] for r in rows] for key in rows[0]}
            guess = [chance(k, u, values) for k, u in pts]
            out["chance"] = {name: {c: [p[name][c] for p in guess] for c in CLASSES}
                             for name in CHANCE}
            return out

        def aucs(ups, curve_):
            return {"auc_log_updates": auc_log(ups, curve_["accuracy"]),
                    "auc_log15_updates": auc_log15(ups, curve_["accuracy"])}

        at_train = curve(trained, as_trained=True)  # padded as in training
        train_acc = sum(at_train["accuracy"]) / len(trained)
        updates = [u for _, u in u_probe]
        out = {"num_keys": K, "order": order, "split": split,
               "train_updates": [int(u) for u in train_updates],
               "train_points": [list(p) for p in trained],
               "train_point_accuracy": at_train["accuracy"], "train_accuracy": train_acc,
               "learned_gate": learned_gate, "learned": train_acc >= learned_gate,
               "updates": updates, "by_updates": curve(u_probe),
               "keys": [k for k, _ in k_probe], "keys_updates": keys_updates,
               "by_keys": curve(k_probe),
               "keys_fixed_total": [k for k, _ in t_probe], "total_updates": total_updates,
               "by_keys_fixed_total": curve(t_probe),
               "extrapolated": {
                   "updates": [u for (_, u), o in zip(u_probe, outside(u_probe, trained)) if o],
                   "keys": [k for (k, _), o in zip(k_probe, outside(k_probe, trained)) if o],
                   "keys_fixed_total": [k for (k, _), o in zip(t_probe, outside(t_probe,
                                                                                 trained)) if o]},
               "other_orders": {}}
        if updates:
            out.update(aucs(updates, out["by_updates"]))
            out["chance_auc"] = {name: aucs(updates, out["by_updates"]["chance"][name])
                                 for name in CHANCE}
            for o in other_orders:  # not trained on: every point is extrapolation
                c = curve(u_probe, o)
                out["other_orders"][o] = {"by_updates": c, **aucs(updates, c)}
        return out

    longest = max(seq_len(k, u) for k, u in points)  # probes included: models must take them
    probes = list(probe_updates) or list(probe_keys) or list(probe_keys_fixed_total)
    return TaskStream("kv_interference", tasks, scenario, vocab_size, (longest,), seed,
                      info={"split": split, "num_keys": K, "order": order,
                            "key_tokens": key_tokens},
                      vocab_size=vocab_size, token_text=text_form(vocab_size, key_tokens),
                      analyses={"kv_interference": analyse} if probes else {})


# What a context policy (cl_toolkit/context) manages here: (key, value) pairs, then the queries
kv_interference_stream.fragments = "key_value_pairs"
kv_interference_stream.task_kind = "tokens"  # what the stream holds, known before it is built (see validation)
kv_interference_stream.ranges = {
    "vocab_size": at_least(1), "key_tokens": at_least(1), "num_keys": at_least(1),
    "train_updates": at_least(1, min_items=1), "train_keys": at_least(1, min_items=1),
    "split": one_of(*SPLITS), "order": one_of(*ORDERS),
    "keys_updates": at_least(1), "total_updates": at_least(1),
    "train_size": at_least(1), "test_size": at_least(1),
    "probe_updates": at_least(1), "probe_keys": at_least(1),
    "probe_keys_fixed_total": at_least(1), "probe_size": at_least(1),
    "learned_gate": between(0, 1, note="an accuracy: the share of queries answered right at "
                            "the training sizes"),
    "scenario": TOKEN_SCENARIO}
# smoke=true: a small training set (the runner keeps 24 sequences) and few probe sequences
kv_interference_stream.smoke = {"train_size": 64, "test_size": 32, "probe_size": 16}
