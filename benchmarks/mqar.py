"""Multi-query associative recall (MQAR), the recall test of Zoology (Arora et al. 2023,
https://arxiv.org/abs/2312.04927): ``D`` key-value pairs, then every key again at a random
later position, where the model must emit the value paired with it::

    x:  k1 v1 k2 v2 ... kD vD | f  f  k2 f  f  f  k1 f ...     (f: filler)
    y:  -100 ...        -100  | -  -  v2 -  -  -  v1 - ...      (-100: no loss)

Keys come from the lower half of the vocabulary (token 0 excluded), values from the upper half,
both without repetition inside a sequence. Queries sit at even offsets of the query region;
the offset ``s`` (0 = right after the pairs) is drawn with probability proportional to
``(s + 1) ** (power_a - 1)``, the power law of Zoology (``power_a = 1``: uniform). Fillers are
random tokens (Zoology's default) or 0.

As a stream, tasks either grow the number of pairs (``split="pairs"``) or draw their keys from
disjoint blocks of the key vocabulary (``split="keys"``); ``split="mixture"`` is one task with
an equal share of every number of pairs (Zoology's training mix). After every task the analysis
``mqar`` measures accuracy against the number of pairs on fresh sequences over the whole key
vocabulary. Everything is generated from the seed, in memory.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX, Task, TaskStream, TensorData
from cl_toolkit.task_kinds import answer_scores
from cl_toolkit.validation import at_least

from .common import SPLIT_SMOKE, TOKEN_SCENARIO

SPLITS = ("pairs", "keys", "mixture")


def assemble(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
             fillers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences from their parts: pairs ``keys[:, i], values[:, i]`` ``[N, D]`` first, then
    key ``i`` queried at position ``2 D + 2 slots[:, i]``; ``fillers [N, L]`` fill the rest.
    Returns ``x, y`` ``[N, L]`` with the value as target at each query position."""
    n, d = keys.shape
    x, y = fillers.clone(), torch.full_like(fillers, IGNORE_INDEX)
    x[:, 0:2 * d:2], x[:, 1:2 * d:2] = keys, values
    pos = 2 * d + 2 * slots
    x.scatter_(1, pos, keys)
    y.scatter_(1, pos, values)
    return x, y


def sample(n: int, vocab_size: int, seq_len: int, num_pairs: int, key_range: tuple[int, int],
           generator: torch.Generator, power_a: float = 0.01, random_fillers: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR sequences ``x, y [n, seq_len]`` with keys drawn from ``key_range``
    (half-open) and values from ``[vocab_size // 2, vocab_size)``."""
    check(vocab_size, seq_len, num_pairs, key_range)
    lo, hi = key_range
    g = generator
    keys = torch.rand(n, hi - lo, generator=g).argsort(1)[:, :num_pairs] + lo
    half = vocab_size // 2
    values = torch.rand(n, vocab_size - half, generator=g).argsort(1)[:, :num_pairs] + half
    space = (seq_len - 2 * num_pairs) // 2
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    slots = torch.multinomial(weights.expand(n, space), num_pairs, replacement=False,
                              generator=g)
    fillers = torch.randint(vocab_size, (n, seq_len), generator=g) if random_fillers else \
        torch.zeros(n, seq_len, dtype=torch.long)
    return assemble(keys, values, slots, fillers)


def check(vocab_size: int, seq_len: int, num_pairs: int, key_range: tuple[int, int]) -> None:
    if num_pairs < 1 or 4 * num_pairs > seq_len:
        raise ConfigError(
            f"MQAR with {num_pairs} pairs needs 1 <= pairs and 4 * pairs <= seq_len (pairs, "
            f"then a query region at least as long); got seq_len={seq_len}. Raise "
            "benchmark.seq_len or lower the number of pairs.")
    if key_range[1] - key_range[0] < num_pairs or vocab_size - vocab_size // 2 < num_pairs:
        raise ConfigError(
            f"benchmark.vocab_size={vocab_size} is too small for {num_pairs} distinct keys "
            f"(key block [{key_range[0]}, {key_range[1]})) and values (upper half of the "
            "vocabulary); raise benchmark.vocab_size or lower the number of pairs / tasks.")
    check_vocabulary(vocab_size, seq_len)


def check_vocabulary(vocab_size: int, seq_len: int) -> None:
    """Zoology's MQAR asserts ``vocab_size > input_seq_len``; so do we, so results compare."""
    if vocab_size <= seq_len:
        raise ConfigError(
            f"benchmark.vocab_size={vocab_size} must exceed benchmark.seq_len={seq_len}, as "
            "Zoology's MQAR requires (vocab_size > input_seq_len), so that results compare "
            f"with its figures; raise benchmark.vocab_size above {seq_len} or shorten the "
            "sequences.")


def text_form(vocab_size: int) -> tuple[str, ...]:
    """The text of every token id (for pretrained LMs, cl_toolkit/models/hf_lm.py): token 0 (the
    zero filler) is empty, keys are ``" k{i}"``, values ``" v{j}"``, numbers zero-padded to one
    width so that no text is a prefix of another (our choice)."""
    half, w = vocab_size // 2, len(str(vocab_size))
    return ("",) + tuple(f" k{i:0{w}d}" for i in range(1, half)) + \
        tuple(f" v{j:0{w}d}" for j in range(vocab_size - half))


def mqar_stream(vocab_size: int = 256, seq_len: int = 64, num_pairs: Sequence[int] = (4, 8, 16),
                split: str = "pairs", n_tasks: int = 3, train_size: int = 2000,
                test_size: int = 256, power_a: float = 0.01, random_fillers: bool = True,
                probe_pairs: Sequence[int] = (2, 4, 8, 16), probe_size: int = 256,
                scenario: str = "domain-il", seed: int = 0) -> TaskStream:
    """The MQAR stream. ``split="pairs"``: one task per entry of ``num_pairs``;
    ``split="keys"``: ``n_tasks`` tasks with ``num_pairs[0]`` pairs, task ``i`` drawing keys
    from the ``i``-th of ``n_tasks`` equal blocks of the key vocabulary; ``split="mixture"``:
    one task mixing every entry of ``num_pairs``. ``probe_pairs``: the numbers of pairs of the
    accuracy curve (``[]``: none)."""
    if split not in SPLITS:
        raise ConfigError(f"benchmark.split={split!r}; choose one of {', '.join(SPLITS)}.")
    num_pairs = [int(p) for p in num_pairs]
    keys = (1, vocab_size // 2)
    if split == "pairs":
        plan = [(f"pairs{p}", [p], keys) for p in num_pairs]
    elif split == "mixture":
        plan = [("mixture", num_pairs, keys)]
    else:
        width = (keys[1] - keys[0]) // n_tasks
        plan = [(f"keys{i}", num_pairs[:1], (keys[0] + i * width, keys[0] + (i + 1) * width))
                for i in range(n_tasks)]
    for _, ps, block in plan:
        for p in ps:
            check(vocab_size, seq_len, p, block)
    for p in probe_pairs:
        check(vocab_size, seq_len, int(p), keys)
    g = torch.Generator().manual_seed(seed)
    opts = dict(power_a=power_a, random_fillers=random_fillers)

    def data(n, ps, block):
        """``n`` sequences, an equal share per number of pairs, shuffled."""
        parts = [sample(n // len(ps) + (i < n % len(ps)), vocab_size, seq_len, p, block, g,
                        **opts) for i, p in enumerate(ps)]
        perm = torch.randperm(n, generator=g)
        return TensorData(torch.cat([x for x, _ in parts])[perm],
                          torch.cat([y for _, y in parts])[perm])

    tasks = [Task(i, name, data(train_size, ps, block), data(test_size, ps, block), (),
                  info={"num_pairs": ps, "keys": list(block)})
             for i, (name, ps, block) in enumerate(plan)]

    def analyse(predict) -> dict:
        """Accuracy and exact match against the number of pairs, on fresh sequences."""
        pg = torch.Generator().manual_seed(seed + 7919)
        acc, em = [], []
        for p in probe_pairs:
            x, y = sample(probe_size, vocab_size, seq_len, int(p), keys, pg, **opts)
            correct, answers = answer_scores(predict(x), y)
            acc.append(float(correct.sum() / answers.sum()))
            em.append(float((correct == answers).float().mean()))
        return {"num_pairs": [int(p) for p in probe_pairs], "accuracy": acc, "exact_match": em,
                "seq_len": seq_len, "vocab_size": vocab_size}

    return TaskStream("mqar", tasks, scenario, vocab_size, (seq_len,), seed,
                      info={"split": split, "power_a": power_a}, vocab_size=vocab_size,
                      token_text=text_form(vocab_size),
                      analyses={"mqar": analyse} if probe_pairs else {})


mqar_stream.task_kind = "tokens"  # what the stream holds, known before it is built (see validation)
mqar_stream.ranges = {
    "vocab_size": at_least(1), "seq_len": at_least(1), "num_pairs": at_least(1, min_items=1),
    "n_tasks": at_least(1), "train_size": at_least(1), "test_size": at_least(1),
    "probe_pairs": at_least(1), "probe_size": at_least(1),
    "scenario": TOKEN_SCENARIO}
mqar_stream.smoke = SPLIT_SMOKE
mqar_stream.check_config = lambda node, cfg: check_vocabulary(node["vocab_size"], node["seq_len"])
