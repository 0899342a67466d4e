"""Task-free routing of the MoM learner: the routing loss against a hand-computed value and a
naive loop, the test-time switch (no task id read, top-k among all memories), the task
inference the router is scored by, what the routing loss teaches and how the router forgets,
the config errors, and the equal-parameter rows of perf/mom_evidence.py."""
import functools
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cl_toolkit.errors import ConfigError
from cl_toolkit.layers.mom import routing_loss
from cl_toolkit.models.sequence import SequenceImageBackbone
from cl_toolkit.runner import build_model, build_stream
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext
from cl_toolkit.validation import check_config

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2}


@functools.lru_cache(maxsize=None)
def digits(scenario="task-il"):
    return build_stream({"benchmark": {"name": "split_digits", "scenario": scenario}})


def backbone(**kw):
    args = dict(input_shape=(1, 8, 8), mixer="mom", task_routing=True, num_tasks=5,
                memories_per_task=2, topk=1, task_free=True, routing_loss_weight=1.0, **TINY)
    args.update(kw)
    return SequenceImageBackbone(**args)


def compose_cfg(*overrides):
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        return OmegaConf.to_container(compose("config", list(overrides)), resolve=True)


def naive_routing_loss(logits, target):
    """-log of the router's probability mass on the block, token by token."""
    B, T, E = logits.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            p = [math.exp(v) for v in logits[b, t].tolist()]
            total += -math.log(sum(p[e] for e in range(E) if target[b, e]) / sum(p))
    return total / (B * T)


def test_routing_loss_hand_computed_and_against_a_loop():
    # softmax([0, ln 3, 0, 0]) = [1, 3, 1, 1] / 6; block {0, 1} holds 4/6: -log(2/3).
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0, 0.0]]])
    block = torch.tensor([[True, True, False, False]])
    assert routing_loss(logits, block).item() == pytest.approx(math.log(1.5), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, generator=g, dtype=torch.float64) * 3
    target = torch.zeros(3, 6, dtype=torch.bool)
    for b, task in enumerate([0, 2, 1]):
        target[b, 2 * task:2 * task + 2] = True
    assert routing_loss(logits, target).item() == pytest.approx(
        naive_routing_loss(logits, target), rel=1e-9)


def router_logits_of(model, x, t):
    """The router's logits of the one MoM layer in a training forward (a forward hook)."""
    seen = []
    layer = model.blocks[0].mixer
    handle = layer.router.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        model(x, t)
    finally:
        handle.remove()
    return seen[0]


def test_routing_loss_enters_the_aux_loss_with_its_weight():
    stream = digits()
    x, _, t = next(stream[2].train.batches(6))
    aux = {}
    for weight in (0.0, 2.5):
        torch.manual_seed(0)
        model = backbone(routing_loss_weight=weight).double().train()
        logits = router_logits_of(model, x.double(), t)
        aux[weight] = model.aux_loss.item()
    target = torch.zeros(6, 10, dtype=torch.bool)
    for b, task in enumerate(t.tolist()):
        target[b, 2 * task:2 * task + 2] = True
    expected = 2.5 * naive_routing_loss(logits, target)
    assert expected > 0.1
    assert aux[2.5] - aux[0.0] == pytest.approx(expected, rel=1e-9)


def test_routing_loss_moves_the_router_rows_of_other_tasks_and_the_mask_does_not():
    stream = digits()
    x, _, t = next(stream[3].train.batches(8))
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = backbone(routing_loss_weight=weight, aux_loss_weight=0.0).train()
        (model(x, t).sum() + model.aux_loss).backward()
        grad = model.blocks[0].mixer.router.weight.grad
        others = grad[[r for r in range(10) if r // 2 != 3]]
        assert (others.abs().max() > 0) == (weight > 0)


def chosen(model, x, t):
    layer = model.blocks[0].mixer
    layer.record_routes = True
    try:
        model(x, t)
        return layer.last_routes.clone()
    finally:
        layer.record_routes, layer.last_routes = False, None


def test_task_free_switch_routes_by_the_task_id_in_training_only():
    torch.manual_seed(0)
    model = backbone()
    x = digits()[0].test.x[:16]
    t = torch.full((16,), 3)
    model.train()
    assert bool(((chosen(model, x, t) // 2) == 3).all())  # training: inside task 3's block
    model.eval()
    free = chosen(model, x, t)
    # Test time: the top-1 of the unmasked router (the oracle: its logits' argmax) ...
    layer = model.blocks[0].mixer
    logits = router_logits_of(model, x, t)
    assert torch.equal(free[..., 0], logits.argmax(-1))
    assert not bool(((free // 2) == 3).all())  # ... which at init leaves task 3's block
    # ... and no task id is read: any t, or none, gives the same features.
    torch.testing.assert_close(model(x, t), model(x, None), rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.zeros(16, dtype=torch.long)), model(x, None),
                               rtol=0, atol=0)
    with model.oracle_routing():  # the isolation upper bound: the id again
        assert bool(((chosen(model, x, t) // 2) == 3).all())
    model.train()
    model(x, t)
    assert layer.routing_target is None  # the training target does not outlive a forward


def test_router_task_inference_counts_against_hand_computed_routes(monkeypatch):
    torch.manual_seed(0)
    model = backbone(num_layers=2)
    x = torch.zeros(3, 1, 8, 8)  # 16 tokens each
    # Layer routes, per sample: memory ids (owners = id // 2).
    table = {0: torch.tensor([[4] * 16, [4] * 10 + [0] * 6, [8] * 16]),   # owners 2 / 2,0 / 4
             1: torch.tensor([[5] * 16, [0] * 16, [9] * 8 + [5] * 8])}   # owners 2 / 0 / 4,2
    for i, block in enumerate(model.blocks):
        layer = block.mixer

        def route(h, mask=None, rows=table[i]):
            B, T, _ = h.shape
            return h.new_ones(B, T, 1), rows[:B, :, None], h.new_zeros(())
        monkeypatch.setattr(layer, "route", route)
    stats = model.router_task_inference(x, task=2)
    # Routes in task 2's block: layer 0: 16 + 10 + 0, layer 1: 16 + 0 + 8, of 48 each.
    assert stats["token_per_layer"] == pytest.approx([26 / 48, 24 / 48])
    assert stats["token"] == pytest.approx(50 / 96)
    # Majority owners: sample 0 -> 2; sample 1 -> 0 (10 of 32 in 2, 22 in 0); sample 2 -> 4
    # (16 + 8 = 24 in 4, 8 in 2).
    assert stats["predicted"] == [1, 0, 1, 0, 1]
    assert stats["sample"] == pytest.approx(1 / 3)
    # Routes per memory over both layers: 0: 6 + 16, 4: 16 + 10, 5: 16 + 8, 8: 16, 9: 8.
    share = [0.0] * 10
    for memory, n in ((0, 22), (4, 26), (5, 24), (8, 16), (9, 8)):
        share[memory] = n / 96
    assert stats["memory_share"] == pytest.approx(share)


def two_task_data(n=64):
    stream = digits("class-il")
    return [(stream[k].train.x[:n], torch.full((n,), k)) for k in (0, 1)]


def train_router(model, batches, steps=150):
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(steps):
        x, t = batches[step % len(batches)]
        opt.zero_grad()
        model(x, t)
        model.aux_loss.backward()
        opt.step()


def test_the_routing_loss_teaches_task_inference_and_a_shared_router_forgets_it():
    data = two_task_data()
    torch.manual_seed(0)
    joint = backbone(num_tasks=2, aux_loss_weight=0.0)
    train_router(joint, data)  # both tasks, interleaved (what replay gives the router)
    for k, (x, _) in enumerate(data):
        assert joint.router_task_inference(x, k)["sample"] >= 0.9
    torch.manual_seed(0)
    seq = backbone(num_tasks=2, aux_loss_weight=0.0)
    train_router(seq, data[:1])
    assert seq.router_task_inference(data[0][0], 0)["sample"] >= 0.9
    train_router(seq, data[1:])  # task 1 only: the router forgets task 0
    assert seq.router_task_inference(data[1][0], 1)["sample"] >= 0.9
    assert seq.router_task_inference(data[0][0], 0)["sample"] <= 0.1


@pytest.mark.parametrize("overrides,match", [
    (["model.task_free=true"], "model.task_free=true needs model.task_routing=true"),
    (["model.routing_loss_weight=1.0"],
     "model.routing_loss_weight=1.0 needs the task id in training"),
    (["model.task_routing=true", "model.task_free=true"],
     "model.task_free=true with model.routing_loss_weight=0"),
])
def test_task_free_config_errors_name_the_fix(overrides, match):
    cfg = compose_cfg("model=mom", "benchmark.scenario=class-il", *overrides)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_a_valid_task_free_config_passes_and_needs_no_test_task_id():
    cfg = compose_cfg("model=mom", "benchmark.scenario=class-il", "model.task_routing=true",
                      "model.task_free=true", "model.routing_loss_weight=1.0",
                      "model.memories_per_task=2", "model.topk=1")
    check_config(cfg)
    model = build_model(cfg, digits("class-il"))  # not refused: no task id at test time
    assert not model.uses_task_id and model.backbone.trains_with_task_id


def test_task_free_models_get_task_ids_in_training_only():
    stream = digits("class-il")
    model = build_model({"model": {"name": "mom", **TINY, "task_routing": True,
                                   "task_free": True, "routing_loss_weight": 1.0,
                                   "memories_per_task": 2, "topk": 1}}, stream)
    x, y, t = next(stream[1].train.batches(8))
    s = Naive(epochs=1, batch_size=8, lr=1e-3, optimizer="adamw")
    s.setup(stream, model, RunContext())
    assert torch.equal(s.train_task_ids(t), t)
    s.train_step(x, y, t, stream[1])
    assert s._task_ids(x, stream[1]) is None  # no task id at test time


def test_a_task_free_run_records_router_inference_and_the_oracle_bound(tmp_path):
    """`cltk run` puts both figures in results.json as per-task matrices (one row per task
    learned): task inference is a share of samples, so it lies in [0, 1] and sums to at most 1
    over the blocks; the oracle bound is an accuracy."""
    from cl_toolkit.runner import run

    cfg = compose_cfg("benchmark=split_digits", "benchmark.scenario=class-il", "model=mom",
                      "model.task_routing=true", "model.memories_per_task=2", "model.topk=1",
                      "model.task_free=true", "model.routing_loss_weight=1.0", "smoke=true",
                      "quiet=true", "strategy.epochs=1")
    results = run(cfg, tmp_path)
    extras = results["extras"]
    T = len(extras["router_task_inference"]["before"])
    assert len(results["matrix"]) == T
    for key in ("router_task_inference", "oracle_routing"):
        assert len(extras[key]["matrix"]) == T
        assert all(0.0 <= v <= 1.0 for row in extras[key]["matrix"] for v in row)


def test_evidence_rows_have_equal_parameters():
    from perf import mom_evidence as ev

    stream = digits()
    counts = {}
    for row in ("transformer naive", "MoM shared naive", "MoM routed (task ids at test)",
                "MoM routed + shared memory", "MoM task-free"):
        cfg = compose_cfg(*ev.STREAMS["digits_til"], *ev.ROWS[row])
        model = build_model(cfg, stream)
        counts[row] = sum(p.numel() for p in model.parameters())
        if "routed" in row or "free" in row:
            mixer = model.backbone.blocks[0].mixer
            assert mixer.topk == 1 and model.backbone.memories_per_task == 2  # a real choice
    assert max(counts.values()) / min(counts.values()) < 1.001, counts


def test_mean_ci_uses_the_t_interval():
    from perf.mom_evidence import mean_ci

    # mean 2, sd 1, n 3: half-width 4.303 / sqrt(3) = 2.484
    assert mean_ci([1.0, 2.0, 3.0]) == "2.000 ± 2.484"


def test_transient_forgetting_columns_on_the_reviewers_example():
    from perf.mom_evidence import matrix_metrics

    # Task 0: 1.000 after task 0, 0.495 after task 3, back to 0.890 (the reviewer's seed 2).
    R = [[1.0, 0.0, 0.0, 0.0, 0.0],
         [0.98, 1.0, 0.0, 0.0, 0.0],
         [0.90, 1.0, 1.0, 0.0, 0.0],
         [0.495, 0.9, 1.0, 1.0, 0.0],
         [0.89, 1.0, 1.0, 1.0, 1.0]]
    m = matrix_metrics(R)
    assert m["forgetting"] == pytest.approx((0.11 + 0 + 0 + 0) / 4)
    assert m["largest_drop"] == pytest.approx(0.505)  # final forgetting hides it
    assert m["transient"] == pytest.approx((0.505 + 0.1 + 0 + 0) / 4)
    assert m["worst_after"] == pytest.approx((0.495 + 0.9 + 1 + 1) / 4)


def test_per_sample_routing_takes_the_mean_of_the_tokens_logits():
    torch.manual_seed(0)
    model = backbone(route_per="sample").eval()
    x = digits()[1].test.x[:12]
    logits = router_logits_of(model, x, None)  # the router's own per-token logits
    routes = chosen(model, x, None)
    # the oracle: the argmax of each sample's mean logits, for every one of its tokens
    expected = logits.mean(1).argmax(-1)
    assert torch.equal(routes[..., 0], expected[:, None].expand(-1, routes.shape[1]))
    token = backbone(route_per="token").eval()
    token.load_state_dict(model.state_dict())
    assert not torch.equal(chosen(token, x, None)[..., 0], routes[..., 0])  # it differs
    layer = model.blocks[0].mixer
    with pytest.raises(ValueError, match="route_per='token'"):
        layer(torch.zeros(2, 1, 16), use_cache=True)
    with pytest.raises(ConfigError, match="model.route_per"):
        check_config(compose_cfg("model=mom", "model.route_per=image"))


def test_router_trained_task_free_routes_by_itself_in_training_too():
    torch.manual_seed(0)
    model = backbone(task_free_training="router").train()
    x = digits()[0].test.x[:16]
    t = torch.full((16,), 3)
    logits = router_logits_of(model, x, t)
    routes = chosen(model, x, t)
    assert torch.equal(routes[..., 0], logits.argmax(-1))  # no mask in training
    assert not bool(((routes // 2) == 3).all())
    target = torch.zeros(16, 10, dtype=torch.bool)
    target[:, 6:8] = True  # ... but the routing loss still aims at task 3's block
    lb = backbone(task_free_training="router", routing_loss_weight=0.0).train()
    lb.load_state_dict(model.state_dict())
    lb(x, t)
    assert model.aux_loss.item() - lb.aux_loss.item() == pytest.approx(
        naive_routing_loss(logits.double(), target), rel=1e-5)


def test_task_free_training_mode_is_checked_by_name():
    with pytest.raises(ConfigError, match="model.task_free_training"):
        check_config(compose_cfg("model=mom", "model.task_free_training=teacher"))


def test_a_model_s_own_figures_never_replace_the_score_matrix(tmp_path, monkeypatch):
    """A figure the model reports (`task_scores`) lands in extras; the matrix keeps the
    scores. Sentinel values (0.125, never an accuracy of these 3-sample smoke tests) must
    appear in the extra and nowhere in the matrix."""
    from cl_toolkit.models.sequence import SequenceModel
    from cl_toolkit.runner import run

    monkeypatch.setattr(SequenceModel, "task_scores",
                        lambda self, clf, stream, score: {"sentinel": [0.125] * len(stream)})
    cfg = compose_cfg("benchmark=split_digits", "model=mom", "smoke=true", "quiet=true",
                      "strategy.epochs=1")
    results = run(cfg, tmp_path)
    assert all(row == [0.125] * len(row) for row in results["extras"]["sentinel"]["matrix"])
    assert all(v != 0.125 for row in results["matrix"] for v in row)
