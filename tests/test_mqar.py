"""MQAR generator against hand-built sequences and a parse of every generated sequence."""
import pytest
import torch

from cl_toolkit.benchmarks.mqar import assemble, mqar_stream, sample
from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX

N_ = IGNORE_INDEX


def test_assemble_matches_hand_built_sequence():
    keys, values, slots = torch.tensor([[3, 5]]), torch.tensor([[7, 6]]), torch.tensor([[1, 0]])
    x, y = assemble(keys, values, slots, torch.zeros(1, 8, dtype=torch.long))
    assert x.tolist() == [[3, 7, 5, 6, 5, 0, 3, 0]]
    assert y.tolist() == [[N_, N_, N_, N_, 6, N_, 7, N_]]


def parse(x, y, num_pairs):
    """Independent reading of one sequence: its pairs, and (position, key, target) per answer."""
    x, y = x.tolist(), y.tolist()
    pairs = {x[2 * i]: x[2 * i + 1] for i in range(num_pairs)}
    answers = [(i, x[i], y[i]) for i in range(len(y)) if y[i] != IGNORE_INDEX]
    return pairs, answers


@pytest.mark.parametrize("random_fillers", [False, True])
def test_every_key_is_queried_once_for_its_value(random_fillers):
    V, L, D = 18, 16, 3
    x, y = sample(50, V, L, D, (1, V // 2), torch.Generator().manual_seed(3),
                  random_fillers=random_fillers)
    for xs, ys in zip(x, y):
        pairs, answers = parse(xs, ys, D)
        assert len(pairs) == D and all(1 <= k < V // 2 for k in pairs)
        assert len(set(pairs.values())) == D and all(V // 2 <= v < V for v in pairs.values())
        assert sorted(k for _, k, _ in answers) == sorted(pairs)
        for pos, key, target in answers:
            assert pos >= 2 * D and (pos - 2 * D) % 2 == 0 and target == pairs[key]
        if not random_fillers:
            answer_pos = {p for p, _, _ in answers}
            assert all(xs[i] == 0 for i in range(2 * D, L) if i not in answer_pos)


def test_deterministic_given_the_seed():
    a = mqar_stream(vocab_size=32, seq_len=16, num_pairs=[2, 4], train_size=20, test_size=5,
                    probe_pairs=[], seed=1)
    b = mqar_stream(vocab_size=32, seq_len=16, num_pairs=[2, 4], train_size=20, test_size=5,
                    probe_pairs=[], seed=1)
    c = mqar_stream(vocab_size=32, seq_len=16, num_pairs=[2, 4], train_size=20, test_size=5,
                    probe_pairs=[], seed=2)
    assert torch.equal(a[1].train.x, b[1].train.x) and torch.equal(a[1].test.y, b[1].test.y)
    assert not torch.equal(a[1].train.x, c[1].train.x)


def test_power_law_favours_queries_right_after_the_pairs():
    def first_slot_share(power_a):
        x, y = sample(4000, 64, 32, 1, (1, 32), torch.Generator().manual_seed(0), power_a)
        slot = ((y != IGNORE_INDEX).float().argmax(1) - 2) // 2
        return float((slot == 0).float().mean())
    # 15 slots: the power law with a = 0.01 puts ~30 % on slot 0, uniform 1/15
    assert first_slot_share(0.01) > 0.25
    assert abs(first_slot_share(1.0) - 1 / 15) < 0.02


def test_stream_splits():
    pairs = mqar_stream(vocab_size=64, seq_len=32, num_pairs=[2, 4, 8], train_size=10,
                        test_size=4, probe_pairs=[])
    assert [t.name for t in pairs] == ["pairs2", "pairs4", "pairs8"]
    assert [int((t.train.y != IGNORE_INDEX).sum(1).unique()) for t in pairs] == [2, 4, 8]
    keys = mqar_stream(vocab_size=64, seq_len=32, num_pairs=[2], split="keys", n_tasks=3,
                       train_size=30, test_size=4, probe_pairs=[])
    blocks = []
    for t in keys:
        used = set(t.train.x[:, 0:4:2].flatten().tolist())
        lo, hi = t.info["keys"]
        assert all(lo <= k < hi for k in used)
        blocks.append(set(range(lo, hi)))
    assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2])
    assert keys.describe()["vocab_size"] == 64
    mix = mqar_stream(vocab_size=64, seq_len=32, num_pairs=[2, 4], split="mixture",
                      train_size=10, test_size=4, probe_pairs=[])
    counts = (mix[0].train.y != IGNORE_INDEX).sum(1)
    assert len(mix) == 1 and sorted(counts.tolist()) == [2] * 5 + [4] * 5


def test_analysis_scores_against_pairs():
    stream = mqar_stream(vocab_size=64, seq_len=32, num_pairs=[2], train_size=4, test_size=4,
                         probe_pairs=[2, 8], probe_size=16, random_fillers=False)

    def recall(x, wrong_after=None):
        """Answers each query from the pairs (the perfect model); with wrong_after, every
        sequence with more pairs than that is answered with token 0. Zero fillers end the
        pairs."""
        out = torch.zeros_like(x)
        for b, row in enumerate(x.tolist()):
            d = 0
            while row[2 * d] != 0 and row[2 * d] < 32 <= row[2 * d + 1]:
                d += 1
            pairs = {row[2 * i]: row[2 * i + 1] for i in range(d)}
            for i in range(2 * d, len(row)):
                if row[i] in pairs and (wrong_after is None or d <= wrong_after):
                    out[b, i] = pairs[row[i]]
        return out

    perfect = stream.analyses["mqar"](recall)
    assert perfect["num_pairs"] == [2, 8] and perfect["accuracy"] == [1.0, 1.0]
    assert perfect["exact_match"] == [1.0, 1.0]
    partial = stream.analyses["mqar"](lambda x: recall(x, wrong_after=2))
    assert partial["accuracy"] == [1.0, 0.0]


def test_bad_input():
    with pytest.raises(ConfigError, match="4 \\* pairs <= seq_len"):
        mqar_stream(seq_len=16, num_pairs=[8])
    with pytest.raises(ConfigError, match="vocab_size=16 is too small for 8 distinct keys"):
        mqar_stream(vocab_size=16, seq_len=32, num_pairs=[8], probe_pairs=[])
    with pytest.raises(ConfigError, match="benchmark.split='task'"):
        mqar_stream(split="task")


def test_report_renders_mean_and_std_over_seeds(tmp_path):
    from cl_toolkit.renderers.tokens import render_mqar

    def run(model, seed, acc):
        return {"config": {"model": {"name": model}, "strategy": {"name": "naive"},
                           "benchmark": {"name": "mqar"}, "seed": seed},
                "stream": {"scenario": "domain-il"},
                "extras": {"mqar": {"num_pairs": [2, 8], "accuracy": acc,
                                    "exact_match": acc}}}

    md, page = render_mqar([run("mom_lm", 0, [0.4, 0.1]), run("mom_lm", 1, [0.6, 0.1]),
                            run("gdn_lm", 0, [1.0, 0.5])], tmp_path)
    # sample std of 40 and 60: sqrt((10^2 + 10^2) / 1) = 14.14
    assert "| mom_lm | 2 | 50.0 ± 14.1 | 10.0 ± 0.0 |" in md
    assert "| gdn_lm | 1 | 100.0 | 50.0 |" in md
    assert (tmp_path / "mqar_accuracy.png").stat().st_size > 0 and "<img" in page


def test_vocabulary_must_exceed_the_sequence_length_as_in_zoology():
    """Zoology's generator asserts vocab_size > input_seq_len; so do we (with a fix)."""
    with pytest.raises(ConfigError, match=r"vocab_size=64 must exceed benchmark.seq_len=64"):
        mqar_stream(vocab_size=64, seq_len=64, num_pairs=[2], probe_pairs=[])
    mqar_stream(vocab_size=65, seq_len=64, num_pairs=[2], train_size=4, test_size=4,
                probe_pairs=[])
