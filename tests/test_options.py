"""Options that change training without changing any shape: each one is checked against an
oracle computed outside the code under test (issue 21, item 6).

- joint ``reset``: the weights at the start of every task's training are the initial ones;
- replay ``replay_batch_size``: the number of buffer rows in each training step;
- ``lr_decay``: the learning rate measured from the parameter updates themselves;
- ``reset_optimizer``: every update compared with a hand-written momentum SGD that keeps (or
  drops) its momentum buffer at task boundaries;
- ``benchmark.shuffle_tasks``: a seeded permutation of the same tasks, recorded in results;
- the image sequence backbone's ``centre``: subtracting each image's mean token embedding
  makes the features blind to anything added equally to every patch (derived by hand below).

Training is watched from outside only (forward pre-hooks on the model, gradient hooks on its
parameters, the run's ``after_batch`` hook), so the tests do not depend on how a strategy or
the trainer is organised inside.
"""
import functools
import json

import pytest
import torch

from cl_toolkit import registry
from cl_toolkit.runner import build_model, build_stream, run
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.strategy import Hooks, RunContext

DIM = 4


def toy_stream(num_tasks=3, n_train=36, n_test=8):
    """``num_tasks`` tasks of two classes each. Task k's inputs all lie in [k+1, k+2)
    (task 0 in [1, 2), task 1 in [2, 3), ...), so the task a row came from can be read off
    its values."""
    g = torch.Generator().manual_seed(123)
    tasks = []
    for k in range(num_tasks):
        def data(n):
            x = k + 1 + torch.rand(n, DIM, generator=g)
            y = 2 * k + torch.arange(n) % 2
            return TensorData(x, y)
        tasks.append(Task(index=k, name=f"toy/{k}", train=data(n_train), test=data(n_test),
                          classes=(2 * k, 2 * k + 1)))
    return TaskStream("toy", tasks, "class-il", num_classes=2 * num_tasks, input_shape=(DIM,))


def task_of(x):
    """The task each row of ``x`` came from (see `toy_stream`)."""
    return (x.reshape(x.shape[0], -1).mean(1).floor() - 1).long()


def mlp(stream):
    torch.manual_seed(0)
    return build_model({"model": {"name": "mlp", "hidden": [8]}}, stream)


class StepRecorder:
    """Records every optimiser step from outside the training code: the rows the model saw
    (all forwards between two ``after_batch`` events), the parameters before the step (at its
    first forward) and after it (at ``after_batch``), and the gradient of the step (summed
    from the parameters' gradient hooks)."""

    def __init__(self, model, ctx):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps, self.task, self._open = [], None, None
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        for i, p in enumerate(self.params):
            p.register_hook(lambda g, i=i: self._grad(i, g))
        ctx.hooks.after_batch.append(self._after_batch)

    def _snapshot(self):
        return [p.detach().clone() for p in self.params]

    def _forward(self, module, args, kwargs):
        if not module.training:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        if self._open is None:
            self._open = {"task": self.task, "x": [], "before": self._snapshot(),
                          "grad": [torch.zeros_like(p) for p in self.params]}
        self._open["x"].append(x.detach().clone())

    def _grad(self, i, g):
        self._open["grad"][i] += g.detach()

    def _after_batch(self, **kwargs):
        step, self._open = self._open, None
        step["x"] = torch.cat(step["x"])
        step["after"] = self._snapshot()
        self.steps.append(step)

    def of_task(self, k):
        return [s for s in self.steps if s["task"] == k]


def train(strategy_name, stream, model=None, **kwargs):
    """``strategy.setup`` + ``learn`` on every task of ``stream``, watched by a StepRecorder."""
    model = mlp(stream) if model is None else model
    strategy = registry.build("strategy", strategy_name, **kwargs)
    ctx = RunContext(generator=torch.Generator().manual_seed(0))
    rec = StepRecorder(model, ctx)
    strategy.setup(stream, model, ctx)
    for task in stream:
        rec.task = task.index
        strategy.learn(task)
    return strategy, rec


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# 1. joint, reset=true -----------------------------------------------------------------------

@pytest.mark.parametrize("reset", [True, False])
def test_joint_reset_starts_every_task_from_the_initial_weights(reset):
    stream = toy_stream()
    model = mlp(stream)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _, rec = train("joint", stream, model, reset=reset, epochs=1, batch_size=8, lr=0.1)
    for k in range(len(stream)):
        steps = rec.of_task(k)
        # joint trains on the union of tasks 0..k: 36 (k + 1) rows in batches of 8
        assert sum(len(s["x"]) for s in steps) == 36 * (k + 1)
        start = steps[0]["before"]
        if k == 0 or reset:
            assert same(start, initial), f"task {k} did not start from the initial weights"
        else:
            assert not same(start, initial)
            # without reset, training goes on from where the previous task ended
            assert same(start, rec.of_task(k - 1)[-1]["after"])


# 2. replay_batch_size -------------------------------------------------------------------------

@pytest.mark.parametrize("replay_batch_size", [3, None])
def test_replay_batch_size_is_the_number_of_buffer_rows_per_step(replay_batch_size):
    stream = toy_stream(num_tasks=2)
    _, rec = train("replay", stream, buffer_size=20, replay_batch_size=replay_batch_size,
                   epochs=1, batch_size=8, lr=0.1)
    # 36 rows in batches of 8: four full batches and one of 4
    current = [8, 8, 8, 8, 4]
    t0, t1 = rec.of_task(0), rec.of_task(1)
    # task 0: the buffer is still empty, nothing is replayed
    assert [len(s["x"]) for s in t0] == current
    assert all((task_of(s["x"]) == 0).all() for s in t0)
    # task 1: each step holds the current batch plus replay_batch_size rows of task 0 (the
    # buffer); without the option, as many buffer rows as the step has current rows
    assert [int((task_of(s["x"]) == 1).sum()) for s in t1] == current
    replayed = [int((task_of(s["x"]) == 0).sum()) for s in t1]
    if replay_batch_size is None:
        assert replayed == current
    else:
        assert replayed == [replay_batch_size] * len(current)


# 3. lr_decay ----------------------------------------------------------------------------------

def measured_lr(step):
    """The learning rate of a plain SGD step, measured from its update: delta = -lr * grad,
    so lr = -<delta, grad> / <grad, grad> (over all parameters)."""
    num = sum(((a - b) * g).sum() for a, b, g in zip(step["after"], step["before"], step["grad"]))
    den = sum((g * g).sum() for g in step["grad"])
    return float(-num / den)


@pytest.mark.parametrize("reset_optimizer", [True, False])
def test_lr_decay_scales_the_learning_rate_of_task_k_by_decay_to_the_k(reset_optimizer):
    stream = toy_stream(num_tasks=3)
    strategy, rec = train("naive", stream, epochs=1, batch_size=8, lr=0.1, lr_decay=0.5,
                          reset_optimizer=reset_optimizer)
    for k, expected in enumerate([0.1, 0.05, 0.025]):  # 0.1 * 0.5 ** k, by hand
        steps = rec.of_task(k)
        assert len(steps) == 5
        for s in steps:
            assert measured_lr(s) == pytest.approx(expected, rel=1e-3), f"task {k}"
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


# 4. reset_optimizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("reset_optimizer", [True, False])
def test_reset_optimizer_decides_whether_momentum_survives_a_task(reset_optimizer):
    lr, mu = 0.1, 0.9
    stream = toy_stream(num_tasks=2)
    _, rec = train("naive", stream, epochs=1, batch_size=8, lr=lr, momentum=mu,
                   reset_optimizer=reset_optimizer)
    assert [s["task"] for s in rec.steps] == [0] * 5 + [1] * 5
    # A hand-written SGD with momentum on the recorded gradients: buf = mu * buf + g (buf = g
    # on a fresh optimiser's first step), update = -lr * buf. A fresh optimiser per task
    # drops the buffer at the task boundary; otherwise it carries over.
    buf, task = None, 0
    for i, s in enumerate(rec.steps):
        if s["task"] != task:
            task = s["task"]
            if reset_optimizer:
                buf = None
        buf = [g.clone() for g in s["grad"]] if buf is None else \
            [mu * b + g for b, g in zip(buf, s["grad"])]
        for a, b, m in zip(s["after"], s["before"], buf):
            torch.testing.assert_close(a - b, -lr * m, atol=1e-6, rtol=1e-4,
                                       msg=lambda e: f"step {i} (task {task}): {e}")
    # the two settings really differ at the first step of task 1
    first = rec.of_task(1)[0]
    plain = max(float((a - b + lr * g).abs().max())
                for a, b, g in zip(first["after"], first["before"], first["grad"]))
    assert (plain < 1e-6) == reset_optimizer


# 5. benchmark.shuffle_tasks ----------------------------------------------------------------------

def build_digits(seed, shuffle):
    return build_stream({"seed": seed, "benchmark": {
        "name": "split_digits", "scenario": "class-il", "shuffle_tasks": shuffle}})


digits = functools.lru_cache(build_digits)


def test_shuffle_tasks_draws_a_seeded_permutation_of_the_same_tasks():
    orders = {}
    for seed in range(3):
        plain, shuffled = digits(seed, False), digits(seed, True)
        names = [t.name for t in shuffled]
        orders[seed] = names
        assert sorted(names) == sorted(t.name for t in plain) and len(set(names)) == 5
        assert shuffled.info["task_order"] == names
        by_name = {t.name: t for t in plain}
        for i, task in enumerate(shuffled):
            old = by_name[task.name]
            # class ids and data unchanged; indices (and per-sample task ids) follow the order
            assert task.classes == old.classes
            assert torch.equal(task.train.x, old.train.x)
            assert torch.equal(task.train.y, old.train.y)
            assert torch.equal(task.test.y, old.test.y)
            assert task.index == i
            assert (task.train.t == i).all() and (task.test.t == i).all()
    assert [t.name for t in build_digits(0, True)] == orders[0]  # same seed, same order
    # the order depends on the seed: 3 seeds do not all give one order, nor the plain one
    assert len({tuple(o) for o in orders.values()}) > 1
    assert any(o != [t.name for t in digits(s, False)] for s, o in orders.items())


def test_shuffled_run_learns_and_records_the_task_order(tmp_path):
    seed = 0
    expected = [t.name for t in digits(seed, True)]
    assert expected != sorted(expected)  # seed 0 does move the tasks (else pick another)
    cfg = {"seed": seed, "threads": 1,
           "benchmark": {"name": "split_digits", "scenario": "class-il", "shuffle_tasks": True},
           "model": {"name": "mlp", "hidden": [16]},
           "strategy": {"name": "naive", "epochs": 1, "batch_size": 64, "lr": 0.1}}
    learned = []
    hooks = Hooks(before_task=[lambda task, **kw: learned.append(task.name)])
    run(cfg, tmp_path, hooks=hooks)
    assert learned == expected
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stream"]["info"]["task_order"] == expected
    assert [t["name"] for t in results["stream"]["tasks"]] == expected
    classes = {t.name: list(t.classes) for t in digits(seed, False)}
    assert [t["classes"] for t in results["stream"]["tasks"]] == [classes[n] for n in expected]


# 6. the image sequence backbone's centre ---------------------------------------------------------

@pytest.mark.parametrize("readout", ["mean", "cls"])
@pytest.mark.parametrize("centre", [True, False])
def test_centre_removes_what_every_patch_has_in_common(centre, readout):
    """By hand: patches P_n (n = 1..N) are embedded as e_n = W P_n + b. Adding the same
    p x p pattern q to every patch (a per-image constant is such a pattern) gives
    e_n + W q for every n, and the centred embeddings e_n - mean_m e_m do not change. So with
    ``centre`` the features of x and of x + tile(q) are equal; without it they are not."""
    torch.manual_seed(0)
    C, H, W, p = 2, 8, 8, 2
    backbone = registry.build("model", "transformer", (C, H, W), patch_size=p, hidden_size=16,
                              num_layers=1, num_heads=2, readout=readout, centre=centre)
    backbone.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, C, H, W, generator=g)
    constant = 3.0 * torch.randn(3, 1, 1, 1, generator=g)  # a brightness shift per image
    pattern = torch.randn(3, C, p, p, generator=g).repeat(1, 1, H // p, W // p)
    with torch.no_grad():
        f = backbone(x)
        for shifted in (x + constant, x + pattern):
            diff = float((backbone(shifted) - f).abs().max())
            if centre:
                assert diff < 1e-4
            else:
                assert diff > 1e-2
        # a pattern that differs between patches is not removed
        assert float((backbone(x + torch.randn(x.shape, generator=g)) - f).abs().max()) > 1e-2
