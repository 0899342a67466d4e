"""MTMD's memory and the market models (cl_toolkit/models/market.py), each part checked against
a hand-computed value or an independent recomputation, never the function against itself."""
from __future__ import annotations

import math

import pytest
import torch

from cl_toolkit.benchmarks.market import synthetic_market
from cl_toolkit.errors import ConfigError
from cl_toolkit.models.market import MemoryBank, gru, hist, mtmd, window_mlp


@pytest.fixture(scope="module")
def stream():
    return synthetic_market(num_stocks=12, num_concepts=3, num_features=2, window=4,
                            num_tasks=2, days_per_task=6, seed=1)


def unit_bank(*rows) -> MemoryBank:
    bank = MemoryBank(len(rows[0]), len(rows))
    bank.keys[0] = torch.tensor(rows, dtype=torch.float32)
    return bank


def test_memory_read_by_hand():
    """Prototypes e0, e1; h = (3, 4): q = (0.6, 0.8), attention softmax(0.6, 0.8),
    mixture (a, 1 - a), read h * mixture."""
    bank = unit_bank([1.0, 0.0], [0.0, 1.0])
    a = math.exp(0.6) / (math.exp(0.6) + math.exp(0.8))
    out = bank.read(torch.tensor([[3.0, 4.0]]))
    assert out.tolist()[0] == pytest.approx([3 * a, 4 * (1 - a)], abs=1e-6)


def test_memory_read_temperature_by_hand():
    bank = unit_bank([1.0, 0.0], [0.0, 1.0])
    bank.temperature = 0.1
    a = math.exp(6) / (math.exp(6) + math.exp(8))
    out = bank.read(torch.tensor([[3.0, 4.0]]))
    assert out.tolist()[0] == pytest.approx([3 * a, 4 * (1 - a)], abs=1e-6)


def test_memory_update_by_hand():
    """Queries (normalised) q1 = e0, q2 = (0.6, 0.8), q3 = e1: q1 goes to prototype 0, q2 and
    q3 to prototype 1. Weights: softmax over queries per prototype, divided by the largest
    among that prototype's queries: q1 1; q3 1, q2 exp(0.8) / exp(1) = exp(-0.2).
    k0' = normalise(e0 + e0) = e0; k1' = normalise(e1 + exp(-0.2) q2 + e1)."""
    bank = unit_bank([1.0, 0.0], [0.0, 1.0])
    bank.update(torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 5.0]]))
    w = math.exp(-0.2)
    k1 = torch.tensor([0.6 * w, 2 + 0.8 * w])
    k1 = (k1 / k1.norm()).tolist()
    assert bank.keys[0, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert bank.keys[0, 1].tolist() == pytest.approx(k1, abs=1e-6)


def test_memory_update_touches_only_the_named_bank_and_never_gets_a_gradient():
    bank = MemoryBank(4, 3, banks=2, generator=torch.Generator().manual_seed(0))
    before = bank.keys.clone()
    h = torch.randn(5, 4, requires_grad=True)
    bank.update(h, bank=1)
    assert torch.equal(bank.keys[0], before[0]) and not torch.equal(bank.keys[1], before[1])
    assert not bank.keys.requires_grad and list(bank.parameters()) == []
    assert bank.keys.norm(dim=-1).flatten().tolist() == pytest.approx([1.0] * 6, abs=1e-5)


def _fit(model, data, epochs=1, lr=1e-2):
    """What the trainer does around a task: train mode, steps, the epoch signal, eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for e in range(epochs):
        for d in range(len(data.x)):
            loss = model(data.x[d:d + 1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.end_epoch(e, epochs)
    model.eval()


def _keys(model):
    return [b.keys.clone() for b in model.banks]


def test_training_updates_the_banks_and_evaluation_does_not(stream):
    """Fails if the update is removed from the forward pass."""
    model = mtmd(stream, hidden=8, bank_size=4, average_last=1)
    init = _keys(model)
    model.eval()
    with torch.no_grad():
        model(stream[0].test.x)
    assert all(torch.equal(a, b) for a, b in zip(init, _keys(model)))
    _fit(model, stream[0].train)
    assert all(not torch.equal(a, b) for a, b in zip(init, _keys(model)))


def test_prediction_reads_the_banks(stream):
    """Fails if the read is removed: other prototypes, other predictions."""
    model = mtmd(stream, hidden=8, bank_size=4).eval()
    x = stream[0].test.x
    with torch.no_grad():
        before = model(x)
        for b in model.banks:
            b.keys.copy_(torch.nn.functional.normalize(torch.randn_like(b.keys), dim=-1))
        after = model(x)
    assert not torch.allclose(before, after)


def test_memory_options(stream):
    off = mtmd(stream, hidden=8, bank_size=4, memory_update=False, average_last=1)
    init = _keys(off)
    _fit(off, stream[0].train)
    assert all(torch.equal(a, b) for a, b in zip(init, _keys(off)))

    frozen = mtmd(stream, hidden=8, bank_size=4, memory_tasks="frozen", average_last=1)
    _fit(frozen, stream[0].train)
    after_first = _keys(frozen)
    _fit(frozen, stream[1].train)
    assert all(torch.equal(a, b) for a, b in zip(after_first, _keys(frozen)))

    per_task = mtmd(stream, hidden=8, bank_size=4, memory_tasks="per_task", average_last=1)
    init = _keys(per_task)
    _fit(per_task, stream[0].train)
    first = _keys(per_task)
    assert all(not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(init, first))
    _fit(per_task, stream[1].train)
    assert all(torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
               for a, b in zip(first, _keys(per_task)))

    # memory_bytes: two banks of 4 x 8 float32, one per task for per_task; none for hist
    shared = mtmd(stream, hidden=8, bank_size=4)
    assert shared.memory_bytes() == 2 * 4 * 8 * 4
    assert per_task.memory_bytes() == 2 * shared.memory_bytes()
    assert hist(stream, hidden=8).memory_bytes() == 0
    assert mtmd(stream, hidden=8, memory=False).memory_bytes() == 0


def test_parameters_are_averaged_over_the_last_epochs(stream):
    """Independent record: the test saves the parameters at the end of each epoch itself."""
    torch.manual_seed(0)
    model = mtmd(stream, hidden=8, bank_size=4, average_last=2)
    data = stream[0].train
    opt = torch.optim.SGD(model.parameters(), 0.1)
    ends = []
    model.train()
    for e in range(3):
        for d in range(len(data.x)):
            loss = model(data.x[d:d + 1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ends.append({k: v.detach().clone() for k, v in model.named_parameters()})
        model.end_epoch(e, 3)
    model.eval()
    for k, p in model.named_parameters():
        assert torch.allclose(p, (ends[1][k] + ends[2][k]) / 2, atol=1e-6), k
    assert not torch.allclose(dict(model.named_parameters())["fc_out.weight"],
                              ends[2]["fc_out.weight"])


@pytest.mark.parametrize("name", ["naive", "replay", "joint"])
def test_averaging_follows_the_trainers_epochs_under_every_strategy(stream, name):
    """Through the real trainer and strategy: after each task the parameters are the mean of
    the parameters the test itself records at the end of the last 2 of 3 epochs (an after_batch
    hook; an epoch ends at its last step). Replay passes replayed days and joint every task's
    days, so an epoch is not the task's day count. Fails if the trainer stops calling
    ``end_epoch`` (the parameters are then the last epoch's)."""
    from cl_toolkit.strategies.joint import Joint
    from cl_toolkit.strategies.naive import Naive
    from cl_toolkit.strategies.replay import Replay
    from cl_toolkit.strategy import Hooks, RunContext

    ends: dict[int, dict] = {}

    def record(strategy, epoch, **_):
        ends[epoch] = {k: v.detach().clone() for k, v in strategy.model.named_parameters()}

    kw = dict(epochs=3, batch_size=2, optimizer="sgd", lr=0.05)
    strategy = {"naive": lambda: Naive(**kw), "joint": lambda: Joint(**kw),
                "replay": lambda: Replay(buffer_size=3, **kw)}[name]()
    torch.manual_seed(0)
    model = mtmd(stream, hidden=8, bank_size=4, average_last=2)
    strategy.setup(stream, model, RunContext(hooks=Hooks(after_batch=[record])))
    for task in stream:
        ends.clear()
        strategy.learn(task)
        assert sorted(ends) == [0, 1, 2]
        for k, p in model.named_parameters():
            expect = (ends[1][k].double() + ends[2][k].double()) / 2
            assert torch.allclose(p.double(), expect, atol=1e-6), (task.index, k)
        assert not torch.allclose(model.fc_out.weight, ends[2]["fc_out.weight"])
    assert model.fits == 2


@pytest.mark.parametrize("build", [mtmd, hist, gru, window_mlp])
def test_days_in_a_batch_do_not_mix(stream, build):
    """A batch of days gives what each day gives alone (replay and joint mix days in a batch)."""
    model = build(stream, hidden=8).eval()
    x = stream[0].train.x[:3]
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[d:d + 1]) for d in range(3)])
    assert together.shape == (3, 12)
    assert torch.allclose(together, alone, atol=1e-5)


def test_predefined_concepts_reach_the_prediction(stream):
    """Stocks of one concept share a branch input: permuting concept memberships changes the
    predictions of HIST (it uses the matrix), with the network weights fixed."""
    model = hist(stream, hidden=8).eval()
    x = stream[0].test.x
    with torch.no_grad():
        before = model(x)
        model.stock2concept.copy_(model.stock2concept.roll(1, dims=1).roll(1, dims=0))
        after = model(x)
    assert not torch.allclose(before, after)


def test_bad_inputs_are_refused(stream):

    with pytest.raises(ConfigError, match="market stream"):
        mtmd(_fake_classification_stream())
    with pytest.raises(ConfigError, match="memory_tasks"):
        mtmd(stream, memory_tasks="sometimes")
    from dataclasses import replace

    wrong = replace(stream, concepts=torch.ones(5, 3))
    with pytest.raises(ConfigError, match="concept matrix"):
        hist(wrong)


def _fake_classification_stream():
    from cl_toolkit.stream import Task, TaskStream, TensorData

    data = TensorData(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    return TaskStream("toy", [Task(0, "t0", data, data, (0, 1))], "class-il", 2, (3,))
