"""Sequence backbones as continual learners: wiring through the runner, the auxiliary loss in
the shared training loop, the task partition's exact gradient isolation, the model recipe and
the bad-input errors."""
import copy
import dataclasses
import functools

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cl_toolkit.errors import ConfigError
from cl_toolkit.runner import build_model, build_stream
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2}


@functools.lru_cache(maxsize=None)
def digits(scenario="task-il"):
    return build_stream({"benchmark": {"name": "split_digits", "scenario": scenario}})


def small_task(stream, index, n=8):
    task = stream[index]
    return dataclasses.replace(task, train=task.train.subset(torch.arange(n)))


def routed(stream, **kw):
    return build_model({"model": {"name": "mom", **TINY, "task_routing": True,
                                  "memories_per_task": 2, "topk": 2, **kw}}, stream)


def test_runner_passes_the_task_count_and_refuses_routing_without_test_task_ids():
    model = routed(digits())
    assert model.backbone.num_tasks == 5 and model.uses_task_id
    assert model.backbone.blocks[0].mixer.num_memories == 10
    assert not model.backbone.blocks[0].mixer.shared_memory  # off by default under routing
    with pytest.raises(ConfigError, match="benchmark.scenario=task-il"):
        routed(digits("class-il"))
    with pytest.raises(ConfigError, match="model.num_tasks=3 is below the stream's 5 tasks"):
        routed(digits(), num_tasks=3)


def test_training_and_test_task_ids_agree():
    for scenario, given in (("task-il", True), ("domain-il", False), ("class-il", False)):
        stream = digits(scenario)
        s = Naive()
        s.setup(stream, build_model({"model": {"name": "mom", **TINY}}, stream), RunContext())
        s.model.uses_task_id = True  # as a task-routed model would
        x, _, t = next(stream[2].train.batches(4))
        assert (s.train_task_ids(t) is not None) == given
        assert (s._task_ids(x, stream[2]) is not None) == given


def router_rows_after_one_step(model, task, lr):
    s = Naive(epochs=1, batch_size=len(task.train), lr=lr, optimizer="sgd")
    s.setup(digits(), model, RunContext())
    s.learn(task)
    return torch.stack([b.mixer.router.weight.detach().clone() for b in model.backbone.blocks])


def test_aux_loss_enters_the_training_loss_and_moves_the_router():
    torch.manual_seed(0)
    stream, lr = digits("class-il"), 0.5
    task = small_task(stream, 0)
    model = build_model({"model": {"name": "mom", **TINY, "aux_loss_weight": 1.0}}, stream)
    without = copy.deepcopy(model)
    for block in without.backbone.blocks:
        block.mixer.aux_loss_weight = 0.0
    probe = copy.deepcopy(model)  # the oracle: the gradient of the aux loss alone, at init
    probe.train()
    probe(task.train.x)
    probe.aux_loss.backward()
    aux_grad = torch.stack([b.mixer.router.weight.grad for b in probe.backbone.blocks])
    assert aux_grad.abs().max() > 1e-4
    w_with = router_rows_after_one_step(model, task, lr)
    w_without = router_rows_after_one_step(without, task, lr)
    # One full-batch SGD step: the difference is exactly -lr * d(aux)/d(router).
    torch.testing.assert_close(w_with - w_without, -lr * aux_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shared_memory", [False, True])
def test_a_task_gives_exactly_zero_gradient_to_what_other_tasks_own(shared_memory):
    stream = digits()
    model = routed(stream, shared_memory=shared_memory).double()
    task = stream[3]
    x, y, t = next(task.train.batches(16))
    torch.nn.functional.cross_entropy(model(x.double(), t), y).backward()
    owned = model.backbone.task_owned()
    params = dict(model.backbone.named_parameters())
    parts = {"router.weight", "k_proj", "v_proj", "a_proj", "b_proj", "A_log", "dt_bias",
             "k_conv", "v_conv"}
    assert {p for p in parts if any(n.endswith(p) for n in owned)} == parts
    assert any(bool((rows == -1).any()) for rows in owned.values()) == shared_memory
    for name, rows in owned.items():
        grad = params[name].grad
        assert grad[(rows != 3) & (rows != -1)].abs().max() == 0, name  # other tasks' rows
        assert grad[rows == 3].abs().max() > 0, name                      # the task's own rows
        if (rows == -1).any():
            assert grad[rows == -1].abs().max() > 0, name                 # the shared memory
    head = model.head.weight.grad  # task-il mask: only the task's classes move
    others = [c for c in range(10) if c not in task.classes]
    assert head[others].abs().max() == 0 and head[list(task.classes)].abs().max() > 0


def test_freeze_shared_stops_every_unowned_parameter_after_the_first_task():
    stream = digits()
    model = routed(stream, freeze_shared=True)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    s = Naive(epochs=1, batch_size=8, lr=1e-2, optimizer="adamw", weight_decay=0.1)
    s.setup(stream, model, RunContext())
    s.learn(small_task(stream, 0))
    after0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    shared = [n for n in before if n not in model.backbone.task_owned()]
    assert all(not torch.equal(before[n], after0[n]) for n in shared)  # task 0 trains them
    s.learn(small_task(stream, 1))
    for n, p in model.backbone.named_parameters():
        if n in shared:
            assert torch.equal(p, after0[n]), n  # weight decay included
    assert bool(model.backbone.shared_frozen)
    state = model.state_dict()
    fresh = routed(stream, freeze_shared=True)
    fresh.load_state_dict(state)
    assert bool(fresh.backbone.shared_frozen)


def test_memory_bytes_counts_the_task_owned_rows():
    stream = digits()
    model = routed(stream, shared_memory=True)
    mixer = model.backbone.blocks[0].mixer
    D, H, K = 16, 2, 8
    per_memory = (H * K + H * K + H + H) * D + (H * K + H * K) * 4 + H + H + D  # + router row
    assert model.memory_bytes() == 10 * per_memory * 4  # 10 memories, 1 layer, fp32
    assert mixer.num_slots == 11  # the shared memory is not counted
    assert build_model({"model": {"name": "mom", **TINY}}, stream).memory_bytes() == 0


@pytest.mark.parametrize("kw,match", [
    ({"task_routing": True, "memories_per_task": 1, "topk": 2},
     "model.memories_per_task=1 must be >= model.topk=2"),
    ({"patch_size": 3}, "model.patch_size=3 must divide the image size 8x8"),
    ({"readout": "max"}, "model.readout='max' is not one of"),
    ({"task_routing": True, "freeze_shared": True, "shared_memory": True},
     "set model.shared_memory=false"),
    ({"freeze_shared": True}, "freeze_shared=true needs task_routing=true"),
])
def test_bad_model_keys_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_model({"model": {"name": "mom", **TINY, **kw}}, digits())


def test_mixer_specific_keys_are_refused_for_other_mixers():
    with pytest.raises(ConfigError, match="Unknown config key model.topk"):
        build_model({"model": {"name": "gdn", **TINY, "topk": 2}}, digits())


def test_task_id_outside_the_routed_range():
    model = routed(digits())
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 5\) \(model.num_tasks\)"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]))


def compose_cfg(*overrides):
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        return OmegaConf.to_container(compose("config", list(overrides)), resolve=True)


@pytest.mark.parametrize("name", ["mom", "gdn", "gla", "transformer"])
def test_model_recipe_reaches_the_strategy_and_the_command_line_wins(name):
    cfg = compose_cfg(f"model={name}")
    assert (cfg["strategy"]["optimizer"], cfg["strategy"]["lr"]) == ("adamw", 0.001)
    cfg = compose_cfg(f"model={name}", "strategy=replay", "strategy.lr=0.01")
    assert (cfg["strategy"]["optimizer"], cfg["strategy"]["lr"]) == ("adamw", 0.01)
    assert compose_cfg()["strategy"]["optimizer"] == "sgd"  # mlp: the strategy's own keys


def test_equal_parameter_presets():
    stream = digits()
    counts = {}
    for name in ("mom", "gdn", "gla", "transformer"):
        model_cfg = compose_cfg(f"model={name}")["model"]
        counts[name] = sum(p.numel() for p in build_model({"model": model_cfg},
                                                          stream).backbone.parameters())
    assert max(counts.values()) / min(counts.values()) < 1.002, counts
