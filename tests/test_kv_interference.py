"""PI generator against hand-built sequences; error classes, the summary scores, the chance
baselines and the learned-the-task gate against hand-computed cases, Monte-Carlo counts and
predictors that read the sequence themselves; the report section against hand-made extras."""
import math
import random

import pytest
import torch

from cl_toolkit.benchmarks import kv_interference as kv
from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import IGNORE_INDEX
from test_report_sections import table

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
    x, y, _ = kv.sample(40, V, P, 3, 4, torch.Generator().manual_seed(1))
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
                                       keys_updates=2, probe_keys_fixed_total=[2, 4],
                                       total_updates=8, probe_size=8)
    analyse = stream.analyses["kv_interference"]
    good, first = analyse(last_value), analyse(first_value)
    assert good["by_updates"]["accuracy"] == [1.0, 1.0, 1.0] and good["auc_log_updates"] == 1.0
    assert first["by_updates"]["accuracy"] == [1.0, 0.0, 0.0]  # U = 1: first = last
    assert first["by_updates"]["stale"] == [0.0, 1.0, 1.0]
    assert first["by_keys"]["accuracy"] == [0.0, 0.0] and first["keys"] == [2, 4]
    assert first["by_keys_fixed_total"]["accuracy"] == [0.0, 0.0]
    assert first["other_orders"]["sequential"]["by_updates"]["accuracy"] == [1.0, 0.0, 0.0]
    assert good["other_orders"]["sequential"]["by_updates"]["accuracy"] == [1.0, 1.0, 1.0]
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
                                    probe_updates=[], probe_keys=[], probe_keys_fixed_total=[])
    assert len(mix) == 1 and mix[0].train.x.shape == (10, kv.seq_len(2, 3))
    padded = (mix[0].train.x[:, 0] == kv.PAD)
    assert int(padded.sum()) == 5 and bool((mix[0].train.y[padded, :8] == N_).all())
    none = {"probe_updates": [], "probe_keys": [], "probe_keys_fixed_total": [],
            "train_size": 4, "test_size": 4}
    per_u = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, split="updates",
                                      train_updates=[1, 2], **none)
    assert [t.train.x.shape[1] for t in per_u] == [6, 10]
    # split=keys: U per key fixed (keys_updates = 3), so the sequence grows with K
    per_k = kv.kv_interference_stream(vocab_size=V, key_tokens=P, split="keys",
                                      train_keys=[2, 4], keys_updates=3, **none)
    assert [t.train.x.shape[1] for t in per_k] == [2 * 2 * 3 + 2, 2 * 4 * 3 + 4]
    # split=keys_fixed_total: K x U = 8 fixed, so only the K queries add length
    fixed = kv.kv_interference_stream(vocab_size=V, key_tokens=P, split="keys_fixed_total",
                                      train_keys=[2, 4], total_updates=8, **none)
    assert [t.train.x.shape[1] for t in fixed] == [2 * 8 + 2, 2 * 8 + 4]
    a = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, seed=5, **none)
    b = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2, seed=5, **none)
    assert torch.equal(a[0].train.x, b[0].train.x)


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="too small for K=8 keys updated U=32 times.*"
                                          "vocab_size >= 289"):
        kv.kv_interference_stream(vocab_size=200, key_tokens=32, num_keys=8,
                                  probe_updates=[1, 32])
    with pytest.raises(ConfigError, match="8 key tokens"):
        kv.kv_interference_stream(vocab_size=512, key_tokens=4, num_keys=8)


# ---------------------------------------------------------------------------------------------
# Update order, the K tests, chance, the PI-LLM AUC, the gate (issue 23)


def test_sequential_order_writes_each_keys_updates_in_one_block():
    x, y, _ = kv.sample(20, V, P, 3, 4, torch.Generator().manual_seed(3), "sequential")
    for row in x[:, :24:2].tolist():  # the 12 update keys: 3 blocks of 4 equal keys
        assert [row[i] for i in range(0, 12, 4)] == [row[i + j] for i in range(0, 12, 4)
                                                     for j in range(4)][::4]
        assert all(row[i] == row[i + j] for i in range(0, 12, 4) for j in range(4))
        assert len(set(row)) == 3
    assert torch.equal(y, torch.where(y != N_, last_value(x), N_))
    # the same generator state: the same keys, values and queries, only the order differs
    xr, _, _ = kv.sample(20, V, P, 3, 4, torch.Generator().manual_seed(3), "random")
    assert torch.equal(x[:, 24:], xr[:, 24:])
    assert sorted(x[0, 1:24:2].tolist()) == sorted(xr[0, 1:24:2].tolist())
    assert not torch.equal(x[:, :24], xr[:, :24])


def test_auc_log15_is_pi_llms_weighted_mean():
    # weights log_1.5(max(U, 2)) for U = 1, 2, 4, 8 are proportional to 1, 1, 2, 3
    assert math.isclose(kv.auc_log15([1, 2, 4, 8], [1.0, 1.0, 0.5, 0.0]), 3 / 7)
    assert math.isclose(kv.auc_log15([2, 4], [1.0, 0.0]), 1 / 3)
    assert kv.auc_log15([16], [0.25]) == 0.25


def test_chance_is_hand_computed():
    c = kv.chance(2, 4, 39)  # K = 2 keys, U = 4 updates, 39 value tokens
    assert c["value_in_context"] == {"accuracy": 1 / 8, "stale": 3 / 8, "other_key": 1 / 2,
                                     "no_value": 0.0}
    assert c["value_of_key"] == {"accuracy": 1 / 4, "stale": 3 / 4, "other_key": 0.0,
                                 "no_value": 0.0}
    assert c["uniform_value"] == pytest.approx({"accuracy": 1 / 39, "stale": 3 / 39,
                                                "other_key": 4 / 39, "no_value": 31 / 39})


def guesser(which, seed=0):
    """A reader that answers a uniformly random value: of the sequence, of the queried key,
    or any value token (P + 1 .. V - 1)."""
    rng = random.Random(seed)
    choose = {"value_in_context": lambda mine, others: rng.choice(mine + others),
              "value_of_key": lambda mine, others: rng.choice(mine),
              "uniform_value": lambda mine, others: rng.randrange(P + 1, V)}[which]
    return reader(choose)


@pytest.mark.parametrize("which", kv.CHANCE)
def test_chance_matches_a_monte_carlo_guesser_on_the_probe_sequences(which):
    """The analysis' chance columns against the counts of a guesser run through it: within
    4 binomial standard errors at every point and class (K = 3 keys, U = 1..6)."""
    ups = [1, 3, 6]
    stream = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=3,
                                       train_updates=[1], train_size=4, test_size=4,
                                       probe_updates=ups, probe_keys=[2, 4], keys_updates=3,
                                       probe_keys_fixed_total=[], probe_orders=[],
                                       probe_size=600)
    out = stream.analyses["kv_interference"](guesser(which))
    n = 600 * 3
    for curve, points in (("by_updates", [(3, u) for u in ups]),
                          ("by_keys", [(2, 3), (4, 3)])):
        for i, (k, u) in enumerate(points):
            expected = kv.chance(k, u, V - 1 - P)[which]
            for cls in kv.CLASSES:
                p = expected[cls]
                assert out[curve]["chance"][which][cls][i] == p
                tol = 4 * math.sqrt(max(p * (1 - p), 1e-4) / n)
                assert abs(out[curve][cls][i] - p) <= tol, (curve, k, u, cls)


def test_gate_and_extrapolation():
    """A reader right only up to U = 2 (first value beyond) trained on U in {1, 2, 4}: right
    at 2 of 3 training sizes (2/3 < 0.9: not learned; >= 0.6: learned)."""
    def until_two(x):
        return reader(lambda mine, others: mine[-1] if len(mine) <= 2 else mine[0])(x)

    def make(gate):
        return kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2,
                                         train_updates=[1, 2, 4], train_size=4, test_size=4,
                                         probe_updates=[1, 2, 4, 8], probe_keys=[1, 2, 3],
                                         keys_updates=2, probe_keys_fixed_total=[2, 4],
                                         total_updates=8, probe_size=8, learned_gate=gate)
    out = make(0.9).analyses["kv_interference"](until_two)
    assert out["train_points"] == [[2, 1], [2, 2], [2, 4]]
    assert out["train_point_accuracy"] == [1.0, 1.0, 0.0]
    assert math.isclose(out["train_accuracy"], 2 / 3) and out["learned"] is False
    assert make(0.6).analyses["kv_interference"](until_two)["learned"] is True
    assert make(0.6).analyses["kv_interference"](first_value)["learned"] is False  # 1/3
    # trained box: K = 2, U in [1, 4]
    assert out["extrapolated"] == {"updates": [8], "keys": [1, 3],
                                   "keys_fixed_total": [4]}  # (2, 4) inside, (4, 2) not


def test_k_curve_holds_u_per_key_and_the_control_holds_k_times_u():
    seen = []

    def spy(x):  # (K, U) of the sequences it is shown, read off the tokens
        row = [t for t in x[0].tolist() if t != kv.PAD]
        keys = [t for t in row[:-1:2] if 1 <= t <= P]
        K = len(set(keys))
        seen.append((K, (len(row) - K) // (2 * K)))
        return last_value(x)

    stream = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2,
                                       train_updates=[1], train_size=4, test_size=4,
                                       probe_updates=[], probe_orders=[], probe_keys=[1, 2, 4],
                                       keys_updates=3, probe_keys_fixed_total=[2, 4, 8],
                                       total_updates=8, probe_size=4)
    out = stream.analyses["kv_interference"](spy)
    assert seen == [(2, 1), (1, 3), (2, 3), (4, 3), (2, 4), (4, 2), (8, 1)]
    assert out["keys"] == [1, 2, 4] and out["keys_updates"] == 3
    assert out["keys_fixed_total"] == [2, 4, 8] and out["total_updates"] == 8


@pytest.mark.parametrize("override,words", [
    ({"order": "sideways"}, ["benchmark.order='sideways'", "random, sequential"]),
    ({"probe_orders": ["random", "backwards"]}, ["probe_orders", "backwards", "random"]),
    ({"split": "keys_total"}, ["benchmark.split='keys_total'", "keys_fixed_total"]),
    ({"learned_gate": 1.5}, ["learned_gate=1.5", "[0, 1]"]),
    ({"split": "keys_fixed_total", "train_keys": [4], "total_updates": 2},
     ["U=0", "benchmark.total_updates"]),
])
def test_bad_options_are_config_errors(override, words):
    with pytest.raises(ConfigError) as err:
        kv.kv_interference_stream(vocab_size=V, key_tokens=P, train_size=4, test_size=4,
                                  **override)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_declared_ranges_refuse_bad_order_and_gate():
    ranges = kv.kv_interference_stream.ranges
    with pytest.raises(ConfigError, match="not one of random, sequential"):
        ranges["order"].check("benchmark.order", "sideways", "random")
    with pytest.raises(ConfigError, match="learned_gate must be >= 0 and <= 1"):
        ranges["learned_gate"].check("benchmark.learned_gate", 2.0, 0.9)


def test_defaults_are_the_cpu_preset_that_learns():
    """The builder's and the benchmark config's defaults are the setting that learns on a CPU
    (RESULTS.md): 48 tokens, 8 key tokens, K = 2, U in {1, 2, 4}, 19,200 sequences."""
    import inspect

    from omegaconf import OmegaConf
    defaults = {k: v.default for k, v in
                inspect.signature(kv.kv_interference_stream).parameters.items()}
    conf = OmegaConf.to_container(OmegaConf.load(
        __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "benchmark" /
        "kv_interference.yaml"))
    for key, want in (("vocab_size", 48), ("key_tokens", 8), ("num_keys", 2),
                      ("train_updates", [1, 2, 4]), ("train_size", 19200),
                      ("probe_updates", [1, 2, 4, 8, 16]), ("order", "random")):
        assert conf[key] == want
        assert (list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]) \
            == want
    assert set(conf) - {"name", "shuffle_tasks"} == set(defaults) - {"seed"}


# The report section -----------------------------------------------------------------------


def analysed(model, predict, seed=0, gate=0.9, **kw):
    """A results.json-like run of ``model`` whose extras come from the real analysis of
    ``predict`` on a small stream."""
    opts = {"vocab_size": V, "key_tokens": P, "num_keys": 2, "train_updates": [1, 2],
            "train_size": 4, "test_size": 4, "probe_updates": [1, 2, 4],
            "probe_keys": [1, 2, 4], "keys_updates": 2, "probe_keys_fixed_total": [2, 4],
            "total_updates": 4, "probe_size": 16, "learned_gate": gate}
    opts.update(kw)
    extra = kv.kv_interference_stream(**opts).analyses["kv_interference"](predict)
    return {"config": {"seed": seed, "model": {"name": model}, "strategy": {"name": "naive"},
                       "benchmark": {"name": "kv_interference"}},
            "extras": {"kv_interference": extra}}


def test_report_draws_only_runs_that_learned_with_chance_rows_and_both_aucs(tmp_path):
    from cl_toolkit.renderers.tokens import check_kv_interference, render_kv_interference

    runs = [analysed("gdn_lm", last_value, s) for s in (0, 1)] + \
        [analysed("gla_lm", first_value)]  # first value: right only at U = 1 of {1, 2}: 50 %
    for r in runs:
        check_kv_interference(r["extras"]["kv_interference"])
    md, page = render_kv_interference(runs, tmp_path)
    head, rows = table(md, "### Learned the task?")
    assert rows["gdn_lm"][2:] == ["100.0 ± 0.0", "90", "2 of 2"]
    assert rows["gla_lm"][2:] == ["50.0", "90", "0 of 1"]
    assert ("gla_lm (1 of 1 runs): did not learn its training distribution (acc 50.0 % < "
            "gate 90 %)") in md and "did not learn its training distribution" in page
    head, rows = table(md, "### Proactive interference: accuracy (%) against updates")
    assert head == ["run", "n", "AUC log U", "AUC log1.5 (PI-LLM)", "U=1", "U=2", "U=4*"]
    assert "gla_lm" not in rows  # not drawn as a PI curve
    assert rows["gdn_lm"][2:] == ["100.0 ± 0.0"] * 5
    # chance of a random value of the sequence, K = 2: 1 / (2U); its AUCs by hand
    ctx = rows["chance: a random value of the sequence"]
    assert ctx[4:] == ["50.0", "25.0", "12.5"]
    assert ctx[2] == f"{100 * (0.375 + 0.1875) / 2:.1f}"  # trapezoids on log U, / log 4
    assert ctx[3] == f"{100 * (0.5 + 0.25 + 2 * 0.125) / 4:.1f}"  # weights 1, 1, 2
    assert rows["chance: a random value of the queried key"][4:] == ["100.0", "50.0", "25.0"]
    head, rows = table(md, "### Accuracy (%) against U in the sequential")
    assert head[-3:] == ["U=1*", "U=2*", "U=4*"] and "gla_lm" not in rows
    head, rows = table(md, "### Accuracy (%) against the number of keys K at a fixed")
    assert "U = 2" in md and head == ["run", "n", "K=1*", "K=2", "K=4*"]
    assert rows["chance: a random value of the sequence"][2:] == ["50.0", "25.0", "12.5"]
    head, rows = table(md, "### Accuracy (%) against the number of keys K at K x U = 4")
    assert head == ["run", "n", "K=2", "K=4*"]
    head, rows = table(md, "### Errors at each row's largest U")
    # a random value of the sequence at K = 2, U = 4: stale 3/8, other key 1/2, each update 1/8
    assert rows["chance: a random value of the sequence"][1:] == ["4", "37.5", "50.0", "0.0",
                                                                  "12.5", "12.5"]
    assert (tmp_path / "kv_interference.png").stat().st_size > 1000


def test_report_with_no_run_that_learned_draws_no_curve(tmp_path):
    from cl_toolkit.renderers.tokens import render_kv_interference

    md, _ = render_kv_interference([analysed("gla_lm", no_value)], tmp_path)
    assert "did not learn its training distribution (acc 0.0 % < gate 90 %)" in md
    assert "### Proactive interference" not in md and "U=1" not in md
    assert not (tmp_path / "kv_interference.png").exists()


def test_check_refuses_a_chance_curve_of_the_wrong_length():
    from cl_toolkit.renderers.tokens import check_kv_interference

    extra = analysed("gdn_lm", last_value)["extras"]["kv_interference"]
    extra["by_updates"]["chance"]["value_of_key"]["accuracy"].pop()
    with pytest.raises(ValueError, match="chance 'value_of_key' has 2 accuracies for 3"):
        check_kv_interference(extra)
    extra = analysed("gdn_lm", last_value)["extras"]["kv_interference"]
    extra["learned"] = "yes"
    with pytest.raises(TypeError, match="not true / false"):
        check_kv_interference(extra)


def test_the_gate_scores_the_training_sizes_as_they_were_trained_left_padded():
    """In a mixture task every sequence was left-padded to the longest (U = 4). A model right
    only at that length passes the gate when the gate pads as training did (it would score
    2/3 on unpadded sequences: U = 2 answered with its first value)."""
    L = kv.seq_len(2, 4)

    def only_at_training_length(x):
        return (last_value if x.shape[1] == L else first_value)(x)

    stream = kv.kv_interference_stream(vocab_size=V, key_tokens=P, num_keys=2,
                                       train_updates=[1, 2, 4], train_size=4, test_size=4,
                                       probe_updates=[1, 2, 4], probe_keys=[],
                                       probe_keys_fixed_total=[], probe_size=8)
    out = stream.analyses["kv_interference"](only_at_training_length)
    assert out["train_point_accuracy"] == [1.0, 1.0, 1.0] and out["learned"] is True
    assert out["by_updates"]["accuracy"][1] == 0.0  # the probe curves stay unpadded
