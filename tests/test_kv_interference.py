"""PI generator against hand-built sequences; error classes and the summary score against
hand-computed cases and predictors that read the sequence themselves."""
import math

import pytest
import torch

from cl_toolkit.benchmarks import kv_interference as kv
from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX

N_ = IGNORE_INDEX
V, P = 64, 8  # vocabulary, key tokens: keys 1..8, values 9..63


def reader(pick):
    """A fake model that reads each sequence: at every key position it answers
    ``pick(values seen for that key so far, values of the other keys)``; 0 elsewhere."""
    def predict(x):
        out = torch.zeros_like(x)
        for b, row in enumerate(x.tolist()):
            seen = {}
            for i, tok in enumerate(row):
                if 1 <= tok <= P:
                    nxt = row[i + 1] if i + 1 < len(row) else 0
                    if nxt > P:  # an update
                        seen.setdefault(tok, []).append(nxt)
                    else:        # a query
                        others = [v for k, vs in seen.items() if k != tok for v in vs]
                        out[b, i] = pick(seen[tok], others)
        return out
    return predict


first_value = reader(lambda mine, others: mine[0])
last_value = reader(lambda mine, others: mine[-1])
second_value = reader(lambda mine, others: mine[1])
other_key = reader(lambda mine, others: others[-1])
no_value = reader(lambda mine, others: 1)  # a key token: not a value at all


def test_assemble_matches_hand_built_sequence():
    keys, slot = torch.tensor([[5, 2]]), torch.tensor([[1, 0, 0, 1]])
    values, order = torch.tensor([[9, 10, 11, 12]]), torch.tensor([[1, 0]])
    x, y, truth = kv.assemble(keys, slot, values, order)
    assert x.tolist() == [[2, 9, 5, 10, 5, 11, 2, 12, 2, 5]]
    assert y.tolist() == [[N_] * 8 + [12, 11]]
    assert truth["history"].tolist() == [[[10, 11], [9, 12]]]
    assert truth["query_pos"].tolist() == [[9, 8]]


def test_every_query_asks_for_the_last_value():
    x, y, truth = kv.sample(40, V, P, 3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(y, torch.where(y != N_, last_value(x), N_))
    assert [int((row == k).sum()) for row in x[:, :24:2] for k in row.unique()] == [4] * 120


def test_first_value_model_scores_zero_and_every_error_is_stale():
    x, _, truth = kv.sample(30, V, P, 4, 3, torch.Generator().manual_seed(2))
    s = kv.score(first_value(x).gather(1, truth["query_pos"]), truth["history"])
    assert s["accuracy"] == 0.0 and s["stale"] == 1.0 and s["other_key"] == s["no_value"] == 0
    assert s["stale_by_update"] == [1.0, 0.0]  # all of them the first update
    s2 = kv.score(second_value(x).gather(1, truth["query_pos"]), truth["history"])
    assert s2["stale_by_update"] == [0.0, 1.0]


def test_error_classes_on_hand_computed_case():
    history = torch.tensor([[[10, 11, 12], [20, 21, 22]]])  # 1 sequence, 2 keys, 3 updates
    pred = torch.tensor([[12, 11]])   # key 0 right; key 1 answers key 0's value
    s = kv.score(pred, history)
    assert (s["accuracy"], s["other_key"], s["stale"], s["no_value"]) == (0.5, 0.5, 0.0, 0.0)
    c = kv.classify(torch.tensor([[20, 99]]), history)
    assert c["other_key"].tolist() == [[True, False]] and c["no_value"].tolist() == [[False, True]]
    c = kv.classify(torch.tensor([[11, 20]]), history)
    assert c["stale_update"].tolist() == [[2, 1]]


def test_readers_through_the_analysis():
    stream = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2,
                                       train_updates=[1], train_size=4, test_size=4,
                                       probe_updates=[1, 2, 4], probe_keys=[2, 4],
                                       total_updates=8, probe_size=8)
    analyse = stream.analyses["kv_interference"]
    good, first = analyse(last_value), analyse(first_value)
    assert good["by_updates"]["accuracy"] == [1.0, 1.0, 1.0] and good["auc_log_updates"] == 1.0
    assert first["by_updates"]["accuracy"] == [1.0, 0.0, 0.0]  # U = 1: first = last
    assert first["by_updates"]["stale"] == [0.0, 1.0, 1.0]
    assert first["by_keys"]["accuracy"] == [0.0, 0.0] and first["keys"] == [2, 4]
    # area under [1, 0, 0] on log U in {1, 2, 4}: (log 2 * 0.5) / log 4 = 0.25
    assert math.isclose(first["auc_log_updates"], 0.25)
    others = analyse(other_key)["by_updates"]
    assert others["other_key"][1:] == [1.0, 1.0] and analyse(no_value)["by_updates"][
        "no_value"] == [1.0, 1.0, 1.0]


def test_auc_log_hand_computed():
    assert math.isclose(kv.auc_log([1, 2, 8], [1.0, 0.5, 0.0]),
                        (math.log(2) * 0.75 + math.log(4) * 0.25) / math.log(8))
    assert kv.auc_log([4], [0.3]) == 0.3


def test_stream_splits_and_padding():
    mix = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2,
                                    train_updates=[1, 3], train_size=10, test_size=4,
                                    probe_updates=[], probe_keys=[])
    assert len(mix) == 1 and mix[0].train.x.shape == (10, kv.seq_len(2, 3))
    padded = (mix[0].train.x[:, 0] == kv.PAD)
    assert int(padded.sum()) == 5 and bool((mix[0].train.y[padded, :8] == N_).all())
    per_u = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, split="updates",
                                      train_updates=[1, 2], train_size=4, test_size=4,
                                      probe_updates=[], probe_keys=[])
    assert [t.train.x.shape[1] for t in per_u] == [6, 10]
    per_k = kv.kv_interference_stream(vocab_size=V, key_tokens=P, split="keys",
                                      train_keys=[2, 4], total_updates=8, train_size=4,
                                      test_size=4, probe_updates=[], probe_keys=[])
    assert [t.train.x.shape[1] for t in per_k] == [2 * 8 + 2, 2 * 8 + 4]  # fixed update count
    a = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, train_size=6,
                                  test_size=2, probe_updates=[], probe_keys=[], seed=5)
    b = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, train_size=6,
                                  test_size=2, probe_updates=[], probe_keys=[], seed=5)
    assert torch.equal(a[0].train.x, b[0].train.x)


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="too small for K=8 keys updated U=32 times.*"
                                          "vocab_size >= 289"):
        kv.kv_interference_stream(vocab_size=200, key_tokens=32, num_keys=8,
                                  probe_updates=[1, 32])
    with pytest.raises(ConfigError, match="8 key tokens"):
        kv.kv_interference_stream(vocab_size=512, key_tokens=4, num_keys=8)
