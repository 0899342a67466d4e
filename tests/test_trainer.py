"""The one training loop: its step against a hand-written SGD step, the auxiliary loss, gradient
clipping, the finite check, hooks, and that no other training loop back-propagates."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_toolkit.errors import ConfigError, NonFiniteLossError
from cl_toolkit.strategy import Hooks, RunContext
from cl_toolkit.trainer import check_settings

ROOT = Path(__file__).resolve().parents[1]


class WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.aux_loss = None

    def forward(self, x):
        out = self.lin(x)
        self.aux_loss = 0.5 * (self.lin.weight ** 2).sum()  # as MoM's load balancing: set per forward
        return out


def test_step_is_one_sgd_step_on_loss_plus_aux():
    torch.manual_seed(0)
    model, x = WithAux(), torch.randn(4, 3)
    w0 = model.lin.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    RunContext().trainer.step(lambda: model(x).sum(), opt, model=model, where="test")
    # d/dw [sum(x w^T + b) + 0.5 |w|^2] = sum_rows(x) + w
    assert torch.allclose(model.lin.weight, w0 - 0.1 * (x.sum(0) + w0))


def test_no_aux_loss_without_a_model():
    torch.manual_seed(0)
    model, x = WithAux(), torch.randn(4, 3)
    w0 = model.lin.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    RunContext().trainer.step(lambda: model(x).sum(), opt, model=None, where="test")
    assert torch.allclose(model.lin.weight, w0 - 0.1 * x.sum(0))


def test_grad_clip_bounds_the_global_norm():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    target = torch.tensor([3.0, 4.0, 0.0, 0.0])  # gradient -target: norm 5
    RunContext(grad_clip=1.0).trainer.step(lambda: -(p * target).sum(), opt, model=None,
                                           where="test")
    assert torch.allclose(p.detach(), target / 5)
    p.data.zero_()
    RunContext().trainer.step(lambda: -(p * target).sum(), opt, model=None, where="test")
    assert torch.allclose(p.detach(), target)  # unclipped by default


def test_non_finite_loss_names_where_and_the_lr_key():
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    with pytest.raises(NonFiniteLossError, match=r"in task 3 \('x'\), epoch 1.*strategy\.coef_lr"):
        RunContext().trainer.step(lambda: p.sum() * float("nan"), opt, model=None,
                                  where="task 3 ('x'), epoch 1, step 0", lr_key="strategy.coef_lr")
    assert p.item() == 1.0  # nothing was applied


def test_fit_calls_hooks_in_order_and_sets_modes():
    events = []
    hooks = Hooks(before_epoch=[lambda **k: events.append(("be", k["epoch"]))],
                  after_batch=[lambda **k: events.append(("ab", k["epoch"], k["step"]))],
                  after_epoch=[lambda **k: events.append(("ae", k["epoch"]))])
    model = nn.Linear(2, 1)
    modes = []
    data = [(torch.randn(3, 2),), (torch.randn(3, 2),)]

    def loss(batch):
        modes.append(model.training)
        return model(batch[0]).pow(2).mean()

    RunContext(hooks=hooks).trainer.fit(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2,
        batches=lambda epoch: iter(data), loss=loss, model=model, what="t")
    assert events == [("be", 0), ("ab", 0, 0), ("ab", 0, 1), ("ae", 0),
                      ("be", 1), ("ab", 1, 0), ("ab", 1, 1), ("ae", 1)]
    assert all(modes) and not model.training
    events.clear()
    RunContext(hooks=hooks).trainer.fit(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
        batches=lambda epoch: iter(data), loss=loss, model=model, what="t", hooks=False)
    assert events == []


def test_precision_settings_are_checked():
    with pytest.raises(ConfigError, match="trainer.precision='fp8'"):
        check_settings("fp8", None, torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs a GPU"):
        check_settings("bf16", None, torch.device("cpu"))
    with pytest.raises(ConfigError, match="grad_clip=0"):
        check_settings("fp32", 0, torch.device("cpu"))


def test_one_backward_call_site_for_training():
    """Every method trains through cl_toolkit/trainer.py: no other library file calls
    backward() (kernels' autograd functions, perf scripts and tests aside); besides the
    trainer's step, only its warm-up (a throw-away tensor, before any task) does."""
    sites = []
    for folder in ("cl_toolkit", "strategies", "merging", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.backward\(", line) and not line.lstrip().startswith("#"):
                    sites.append(f"{path.relative_to(ROOT)}:{n}")
    assert {s.split(":")[0] for s in sites} == {"cl_toolkit/trainer.py"} and len(sites) == 2, \
        sites
