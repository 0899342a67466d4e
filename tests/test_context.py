"""Context management (Sculptor, arXiv 2508.04664): the operators on hand-made contexts, the
batched path against them, the policies, the policy-gradient scorer and the runner wiring."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from cl_toolkit.benchmarks import kv_interference as kv

from cl_toolkit import runner
from cl_toolkit.context import operators as ops
from cl_toolkit.context.policies import Learned, NoContext, Oracle, Recency
from cl_toolkit.context.wrapper import ContextManaged, attach, build_policy
from cl_toolkit.errors import ConfigError

KT = 8  # key tokens 1..8, values 9..
A, B, C, D, E = 20, 21, 22, 23, 24  # values
PAIRS = [(2, A), (1, B), (2, C), (1, D), (3, E)]


def test_fragment_per_update_and_per_window():
    f1 = ops.fragment(PAIRS, 1)
    assert [f.id for f in f1] == [0, 1, 2, 3, 4] and [f.start for f in f1] == [0, 1, 2, 3, 4]
    assert f1[2].pairs == ((2, C),)
    f2 = ops.fragment(PAIRS, 2)
    assert [(f.id, f.start, f.pairs) for f in f2] == [
        (0, 0, ((2, A), (1, B))), (1, 2, ((2, C), (1, D))), (2, 4, ((3, E),))]
    with pytest.raises(ConfigError, match="context.window"):
        ops.fragment(PAIRS, 0)


def test_summarise_keeps_the_latest_value_of_each_key():
    f = ops.Fragment(3, 6, ((1, A), (2, B), (1, C), (3, D), (2, E)))
    s = ops.summarise(f)
    assert s.pairs == ((1, C), (3, D), (2, E)) and s.summary and s.covers == 5
    assert (s.id, s.start) == (3, 6)


def test_search_returns_fragments_holding_the_key_latest_first():
    frags = ops.fragment(PAIRS, 2)
    assert ops.search(frags, 2) == [1, 0]
    assert ops.search(frags, 1) == [1, 0]
    assert ops.search(frags, 3) == [2]
    assert ops.search(frags, 7) == []
    per = ops.fragment(PAIRS, 1)
    assert ops.search(per, 1) == [3, 1] and ops.search(per, 2) == [2, 0]


def test_hide_restore_is_reversible_and_logged():
    ws = ops.Workspace(ops.fragment(PAIRS, 1))
    ws.hide(0, step=1)
    ws.hide(2, step=2)
    assert [f.id for f in ws.visible()] == [1, 3, 4]
    ws.restore(0, step=3)
    assert [f.id for f in ws.visible()] == [0, 1, 3, 4]
    assert ws.log == [(1, "hide", 0), (2, "hide", 2), (3, "restore", 0)]
    assert ws.hidden_at(1) == {0} and ws.hidden_at(2) == {0, 2} and ws.hidden_at(3) == {2}
    with pytest.raises(KeyError, match="not hidden"):
        ws.restore(1)
    with pytest.raises(KeyError, match="no fragment 9"):
        ws.hide(9)
    ws2 = ops.Workspace(ops.fragment(PAIRS, 5))
    ws2.replace(0, step=4)
    assert ws2.visible()[0].pairs == ((2, C), (1, D), (3, E)) and ws2.log == [(4, "summarise", 0)]


def test_render_left_pads_and_keeps_queries_last():
    frags = ops.fragment(PAIRS, 1)
    assert ops.render([frags[3], frags[2]], [1, 2], 9) == [0, 0, 0, 2, C, 1, D, 1, 2]
    assert ops.render([], [1], 3) == [0, 0, 1]
    with pytest.raises(ValueError, match="do not fit"):
        ops.render(frags, [1, 2], 5)


def _pi(n, updates, seed, order="random", pad=0):
    g = torch.Generator().manual_seed(seed)
    x, y, truth = kv.sample(n, 48, KT, 2, updates, g, order)
    return torch.nn.functional.pad(x, (pad, 0)), torch.nn.functional.pad(y, (pad, 0),
                                                                      value=-100), truth


def _mixed(seed=0):
    """Rows of U = 1, 2, 4 left-padded to one length, as the mixture task holds them."""
    parts = [_pi(6, u, seed + u, pad=16 - kv.seq_len(2, u) + 2) for u in (1, 2, 4)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_parse_matches_the_reference_split_and_the_streams_labels():
    x, y = _mixed()
    lay = ops.parse(x, KT)
    for b in range(len(x)):
        pairs, queries = ops.split(x[b].tolist(), KT)
        n = len(pairs)
        assert int(lay.n_pairs[b]) == n
        assert list(zip(lay.keys[b, :n].tolist(), lay.values[b, :n].tolist())) == pairs
        assert x[b][lay.query[b]].tolist() == queries
    # the reward's truth is the stream's label at every query (an independent definition)
    assert torch.equal(torch.where(lay.query, lay.truth, -100), y)


def test_parse_refuses_a_row_of_another_layout():
    bad = torch.tensor([[0, 1, 20, 20, 1, 2]])  # a value where a key belongs
    with pytest.raises(ValueError, match="not a left-padded sequence"):
        ops.parse(bad, KT)
    with pytest.raises(ValueError, match="not a left-padded"):
        ops.parse(torch.tensor([[1, 20, 0, 2, 21, 1]]), KT)  # padding inside


def test_render_batch_equals_the_reference_render_for_any_keep_mask():
    x, _ = _mixed(3)
    lay = ops.parse(x, KT)
    keep = torch.rand(lay.keys.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    out = ops.render_batch(x, lay, keep)
    for b in range(len(x)):
        pairs, queries = ops.split(x[b].tolist(), KT)
        frags = ops.fragment(pairs, 1)
        kept = [f for f in frags if bool(keep[b, f.id])]
        assert out[b].tolist() == ops.render(kept, queries, x.shape[1])


def _reference_oracle(row):
    """Oracle through the operators: per key, search, keep the latest hit, hide the rest."""
    pairs, queries = ops.split(row, KT)
    ws = ops.Workspace(ops.fragment(pairs, 1))
    keep = {ops.search(ws.fragments, k)[0] for k in {k for k, _ in pairs}}
    for f in ws.fragments:
        if f.id not in keep:
            ws.hide(f.id)
    return ops.render(ws.visible(), queries, len(row)), len(pairs) - len(keep), len(keep)


def test_oracle_on_a_hand_made_context_and_against_the_operators():
    x = torch.tensor([[0, 0, 2, A, 1, B, 2, C, 1, D, 1, 2]])
    lay = ops.parse(x, KT)
    keep, n = Oracle().decide(lay)
    assert ops.render_batch(x, lay, keep).tolist() == [[0] * 6 + [2, C, 1, D, 1, 2]]
    assert (int(n["hides"][0]), int(n["searches"][0]), int(n["fragments"][0])) == (2, 2, 4)
    for order in ("random", "sequential"):
        x, _, _ = _pi(32, 4, 7, order)
        lay = ops.parse(x, KT)
        keep, n = Oracle().decide(lay)
        out = ops.render_batch(x, lay, keep)
        for b in range(len(x)):
            row, hides, searches = _reference_oracle(x[b].tolist())
            assert out[b].tolist() == row
            assert int(n["hides"][b]) == hides and int(n["searches"][b]) == searches


def test_recency_and_summarised_windows_on_a_hand_made_context():
    x = torch.tensor([[2, A, 1, B, 2, C, 1, D, 3, E, 1, 2, 3]])
    lay = ops.parse(x, KT)
    keep, n = Recency(keep=2).decide(lay)
    assert ops.render_batch(x, lay, keep).tolist() == [[0] * 6 + [1, D, 3, E, 1, 2, 3]]
    assert (int(n["fragments"][0]), int(n["hides"][0])) == (5, 3)
    # windows of 4 pairs: [0..3], [4]; keep the last 2 windows, each summarised
    keep, n = Recency(keep=2, window=4, summarise=True).decide(lay)
    frags = [ops.summarise(f) for f in ops.fragment(ops.split(x[0].tolist(), KT)[0], 4)]
    want = ops.render(frags, [1, 2, 3], x.shape[1])
    assert ops.render_batch(x, lay, keep)[0].tolist() == want == \
        [0] * 4 + [2, C, 1, D, 3, E, 1, 2, 3]
    assert (int(n["fragments"][0]), int(n["summaries"][0]), int(n["hides"][0])) == (2, 2, 0)
    # windows of 2 pairs: a summary reduces its own window only, so a key's update that a later
    # window repeats stays (each window holds distinct keys here: nothing is dropped)
    keep, _ = Recency(keep=3, window=2, summarise=True).decide(lay)
    frags = [ops.summarise(f) for f in ops.fragment(ops.split(x[0].tolist(), KT)[0], 2)]
    assert ops.render_batch(x, lay, keep)[0].tolist() == \
        ops.render(frags, [1, 2, 3], x.shape[1]) == x[0].tolist()
    keep, _ = NoContext().decide(lay)
    assert torch.equal(ops.render_batch(x, lay, keep), x)


def _reader_accuracy(x, lay, constant=False):
    """A perfect recency reader (answers the latest value of the key it still sees): the
    share of each rollout's queries answered right."""
    def accuracy(keep):
        xs = torch.cat([ops.render_batch(x, lay, k) for k in keep])
        seen = ops.parse(xs, KT).truth
        G = len(keep)
        right = (seen == lay.truth.repeat(G, 1)) & lay.query.repeat(G, 1)
        acc = (right.sum(1).float() / lay.query.sum(1).repeat(G)).view(G, -1)
        return torch.ones_like(acc) if constant else acc
    return accuracy


def _train(constant, steps=240):
    pol = Learned(budget=0.0, penalty=0.5, rollouts=4, lr=0.03, seed=0)
    pol.build(KT)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, _, _ = kv.sample(16, 48, KT, 2, (1, 2, 4)[step % 3], g)
        lay = ops.parse(x, KT)
        pol.step(lay, _reader_accuracy(x, lay, constant))
    x, _, _ = kv.sample(256, 48, KT, 2, 4, g)
    lay = ops.parse(x, KT)
    keep, _ = pol.decide(lay)
    keep_o, _ = Oracle().decide(lay)
    return float((keep == keep_o).all(1).float().mean())


def test_policy_gradient_finds_the_oracles_rule_and_not_without_the_reward():
    torch.set_num_threads(1)
    assert _train(constant=False) >= 0.85  # exactly each key's last update, per sequence
    assert _train(constant=True) <= 0.1    # a constant reward teaches nothing


def test_learned_policy_needs_a_budget_and_valid_settings():
    with pytest.raises(ConfigError, match="context.budget"):
        build_policy({"name": "learned"})
    with pytest.raises(ConfigError, match="context.budget=2"):
        build_policy({"name": "learned", "budget": 2})
    with pytest.raises(ConfigError, match="context.rollouts"):
        build_policy({"name": "learned", "budget": 0, "rollouts": 1})
    with pytest.raises(ConfigError, match="context.during"):
        build_policy({"name": "oracle", "during": "always"})
    with pytest.raises(ConfigError, match="context.keep"):
        build_policy({"name": "recency", "keep": 0})


def _cfg(context, **model):
    return {"seed": 0, "context": context,
            "benchmark": {"name": "kv_interference", "vocab_size": 24, "key_tokens": 4,
                          "num_keys": 2, "train_updates": [1, 2], "train_size": 64,
                          "test_size": 8, "probe_updates": [1, 2, 4], "probe_keys": [2],
                          "probe_keys_fixed_total": [], "probe_size": 8},
            "model": {"name": "transformer_lm", "hidden_size": 16, "num_layers": 1,
                      "num_heads": 2, **model},
            "strategy": {"name": "naive", "batch_size": 16, "lr": 0.01}}


def test_a_stream_without_fragments_is_refused_naming_the_fix():
    cfg = {"seed": 0, "context": {"name": "oracle", "during": "test"},
           "benchmark": {"name": "mqar", "vocab_size": 64, "seq_len": 16, "num_pairs": [2], "probe_pairs": [2],
                         "train_size": 8, "test_size": 4},
           "model": {"name": "transformer_lm", "hidden_size": 16, "num_layers": 1}}
    with pytest.raises(ConfigError, match="benchmark=kv_interference"):
        runner.build_model(cfg, runner.build_stream(cfg))
    img = {"seed": 0, "context": {"name": "oracle"}, "benchmark": {"name": "split_digits"},
           "model": {"name": "mlp"}}
    with pytest.raises(ConfigError, match="context=oracle .*'split_digits' has none"):
        runner.build_model(img, runner.build_stream(img))


def _learn(cfg):
    from cl_toolkit.strategy import RunContext
    runner.seed_everything(0)
    stream = runner.build_stream(cfg)
    model = runner.build_model(cfg, stream)
    strategy = runner.build_strategy(cfg)
    strategy.setup(stream, model, RunContext(generator=torch.Generator().manual_seed(0)))
    strategy.learn(stream.tasks[0])
    return stream, model, strategy


def test_test_time_policies_leave_the_backbones_training_bit_identical():
    torch.set_num_threads(1)
    _, plain, _ = _learn(_cfg(None))
    stream, wrapped, strategy = _learn(_cfg({"name": "learned", "budget": 0.0, "steps": 3,
                                             "rollouts": 2, "during": "test"}))
    other = runner.build_stream(_cfg(None))
    state = torch.get_rng_state()  # building the scorer draws nothing from the global RNG
    attach(_cfg({"name": "learned", "budget": 0.0}), other, plain)
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(wrapped, ContextManaged) and wrapped.policy.trained_steps == 3
    for (k, v), (k2, v2) in zip(plain.state_dict().items(), wrapped.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # at test time the backbone reads the policy's rows; the analysis reports the context
    x = stream.tasks[0].test.x
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), wrapped.model(wrapped.transform(x)))
    out = runner.run_analyses(strategy, stream, stream.tasks[0], 64, torch.device("cpu"))
    ctx = out["kv_interference"]["context"]
    assert ctx["policy"] == "learned" and ctx["scorer_steps"] == 3
    assert len(ctx["by_updates"]["kept_share"]) == 3
    assert ctx["by_updates"]["fragments"] == [2.0, 4.0, 8.0]  # K x U per-update fragments


def test_oracle_in_training_changes_what_the_backbone_reads():
    _, plain, _ = _learn(_cfg(None))
    _, wrapped, _ = _learn(_cfg({"name": "oracle", "during": "train_and_test"}))
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                      wrapped.model.state_dict().values()))


def test_oracle_reports_each_keys_last_update_in_the_analysis():
    cfg = _cfg({"name": "oracle", "during": "test"})
    stream = runner.build_stream(cfg)
    model = attach(copy.deepcopy(cfg), stream, runner.build_model(_cfg(None), stream))
    seen = []
    model.model.forward = lambda x, t=None: seen.append(x) or torch.zeros(*x.shape, 24)
    model.eval()
    out = stream.analyses["kv_interference"](lambda x: model(x).argmax(-1))
    ctx = out["context"]
    assert ctx["by_updates"]["oracle_match"] == [1.0, 1.0, 1.0]
    assert ctx["by_updates"]["kept_pairs"] == [2.0, 2.0, 2.0]
    assert ctx["by_updates"]["hides"] == [0.0, 2.0, 6.0]
    assert ctx["by_updates"]["kept_share"] == [1.0, 0.5, 0.25]
    assert all(int(ops.parse(x, 4).n_pairs.max()) <= 2 for x in seen)


class _Reader(torch.nn.Module):
    """A perfect reader of what it is shown: at each query, the latest value of the key among
    the pairs it reads (token 0 if none): accuracy is then decided by the context alone."""

    def __init__(self, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab

    def forward(self, x, t=None):
        seen = ops.parse(x, 4).truth.clamp(min=0)
        return torch.nn.functional.one_hot(seen, self.vocab).float()


def _reader_run(context, model="gdn_lm"):
    cfg = _cfg(context)
    stream = runner.build_stream(cfg)
    wrapped = attach(cfg, stream, _Reader(24)).eval() if context else _Reader(24)
    extra = stream.analyses["kv_interference"](lambda x: wrapped(x).argmax(-1))
    return {"config": {"seed": 0, "model": {"name": model}, "strategy": {"name": "naive"},
                       "benchmark": {"name": "kv_interference"}, "context": context},
            "extras": {"kv_interference": extra}}


def test_reader_accuracy_per_policy_and_the_report_side_by_side(tmp_path):
    from cl_toolkit.renderers.tokens import (
        check_kv_interference,
        render_kv_interference,
    )

    runs = [_reader_run(None), _reader_run({"name": "oracle", "during": "test"}),
            _reader_run({"name": "recency", "keep": 1, "window": 1, "summarise": False,
                         "during": "test"})]
    acc = [r["extras"]["kv_interference"]["by_updates"]["accuracy"] for r in runs]
    assert acc[0] == acc[1] == [1.0, 1.0, 1.0]   # the latest value is always there
    assert acc[2] == [0.5, 0.5, 0.5]             # one pair: one key of two answered
    ctx = runs[2]["extras"]["kv_interference"]["context"]["by_updates"]
    assert ctx["oracle_match"] == [0.0] * 3 and ctx["last_kept"] == [0.5] * 3  # per row
    assert ctx["kept_share"] == [0.5, 0.25, 0.125] and ctx["hides"] == [1.0, 3.0, 7.0]
    seq = runs[2]["extras"]["kv_interference"]["other_orders"]["sequential"]["by_updates"]
    assert seq["accuracy"] == [0.5, 0.5, 0.5]
    for r in runs:
        check_kv_interference(r["extras"]["kv_interference"])
    md, _ = render_kv_interference(runs, tmp_path)
    section = md[md.index("### Context management (Sculptor)"):]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[5:-1]
            for line in section.splitlines()[4:7]}
    assert [c.strip() for c in rows["gdn_lm", "none"]] == ["100.0"] * 3
    assert [c.strip() for c in rows["gdn_lm", "oracle"]] == ["100.0"] * 3
    assert [c.strip() for c in rows["gdn_lm", "recency (k=1)"]] == ["50.0"] * 3
    kept = section[section.index("### Context kept"):]
    assert "| gdn_lm | oracle | 100.0 / 100.0 | 50.0 / 100.0 | 25.0 / 100.0 | 6.0 / 2.0 / 0.0 |" \
        in kept
    assert (tmp_path / "kv_interference_context.png").stat().st_size > 1000


def test_posthoc_evaluation_equals_a_run_with_the_policy(tmp_path):
    """cl_toolkit.context.evaluate applies a test-time policy to a finished run's backbone:
    the same numbers as a run trained and tested with that policy."""
    from cl_toolkit.context.evaluate import evaluate

    node = {"name": "oracle", "during": "test"}
    base = runner.run(_cfg(None), tmp_path / "base")
    full = runner.run(_cfg(node), tmp_path / "full")
    post = evaluate(tmp_path / "base", tmp_path / "post", node)
    a, b = full["extras"]["kv_interference"], post["extras"]["kv_interference"]
    assert a["by_updates"] == b["by_updates"] and a["context"] == b["context"]
    assert full["matrix"] == post["matrix"] and full["metrics"] == post["metrics"]
    assert full["extras"]["exact_match"]["matrix"] == post["extras"]["exact_match"]["matrix"]
    assert base["extras"]["kv_interference"].get("context") is None
    with pytest.raises(ConfigError, match="context=none"):
        evaluate(tmp_path / "full", tmp_path / "again", node)


def test_online_scorer_steps_on_every_training_batch_and_train_and_test_reads_the_policy():
    stream, wrapped, _ = _learn(_cfg({"name": "learned", "budget": 0.0, "steps": 2,
                                      "rollouts": 2, "online": True,
                                      "during": "train_and_test"}))
    batches = -(-len(stream.tasks[0].train.x) // 16)
    assert wrapped.policy.trained_steps == batches + 2 == len(wrapped.scorer_log)


def test_a_checkpoint_carries_the_learned_scorers_optimiser_generator_and_steps():
    """A resumed run's scorer goes on as the uninterrupted one would: the next step after
    restoring the state dict equals the next step without the interruption."""
    cfg = _cfg({"name": "learned", "budget": 0.0, "steps": 3, "rollouts": 2, "during": "test"})
    stream, wrapped, _ = _learn(cfg)
    fresh = runner.build_model(cfg, stream)
    buf = io.BytesIO()                  # through bytes, as a checkpoint on disk (no aliasing)
    torch.save(wrapped.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.policy.trained_steps == wrapped.policy.trained_steps == 3
    x = stream.tasks[0].train.x[:16]
    a, b = wrapped._scorer_step(x, None), fresh._scorer_step(x, None)
    assert a == b
    for p, q in zip(wrapped.scorer.parameters(), fresh.scorer.parameters()):
        assert torch.equal(p, q)
