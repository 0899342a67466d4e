import math

import pytest
import torch
from torch import nn

from cl_toolkit.merging.atlas import compose, fit_coefficients, objective_loss
from cl_toolkit.merging.task_arithmetic import task_arithmetic
from cl_toolkit.stream import TensorData


def test_coefficients_fixed_to_lambda_reproduce_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(4, 3, generator=g, dtype=torch.float64) for k in ("a", "b")}
    tvs = [{k: torch.randn(4, 3, generator=g, dtype=torch.float64) for k in base}
           for _ in range(3)]
    lam = 0.3
    composed = compose(base, tvs, torch.full((3, 2), lam, dtype=torch.float64))
    ta = task_arithmetic(tvs, lam)
    for k in base:
        by_hand = base[k] + lam * tvs[0][k] + lam * tvs[1][k] + lam * tvs[2][k]
        torch.testing.assert_close(composed[k], by_hand, rtol=0, atol=1e-12)
        torch.testing.assert_close(composed[k], base[k] + ta[k], rtol=0, atol=1e-12)


def test_objectives_hand_values():
    uniform = torch.zeros(2, 4)
    assert objective_loss(uniform, None, "entropy").item() == pytest.approx(math.log(4))
    y = torch.tensor([0, 3])
    assert objective_loss(uniform, y, "supervised").item() == pytest.approx(math.log(4))
    confident = torch.tensor([[10.0, 0, 0, 0], [0.0, 0, 0, 0]])
    # Only the first row passes the 0.9 threshold; its pseudo-label is class 0.
    expected = -torch.log_softmax(confident[0], -1)[0].item()
    assert objective_loss(confident, None, "pseudo_label").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="objective"):
        objective_loss(uniform, y, "mse")


def test_learning_recovers_a_known_best_mix():
    # Linear softmax model theta = theta_0 + sum_i c_ij tau_ij; labels are drawn from the
    # softmax of a teacher at known coefficients, so the maximum-likelihood mix is the teacher's.
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    base = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()}
    tvs = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    keys = list(base)  # ["weight", "bias"]
    truth = torch.tensor([[0.8, -0.5], [0.3, 0.6]])  # [task vector, tensor]
    teacher = compose(base, tvs, truth)
    x = torch.randn(8000, 5, generator=g) * 2
    probs = torch.softmax(x @ teacher["weight"].T + teacher["bias"], -1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    coefs = fit_coefficients(model, base, tvs, TensorData(x, y), "supervised", steps=400,
                             lr=0.05, batch_size=2000, generator=g)
    assert keys == ["weight", "bias"]
    torch.testing.assert_close(coefs, truth, atol=0.1, rtol=0)
    # The model's own parameters were never touched.
    assert not torch.equal(model.weight.detach(), teacher["weight"])


def test_unsupervised_objectives_ignore_masked_classes():
    """Task-il heads put -inf on other tasks' classes; the entropy must be that of the task's
    own classes (here a uniform pair: log 2) with finite gradients, not NaN."""
    from cl_toolkit.merging.atlas import objective_loss

    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")],
                           [float("-inf"), float("-inf"), 1.0, 1.0]], requires_grad=True)
    loss = objective_loss(logits, None, "entropy")
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    empty = objective_loss(logits, None, "pseudo_label", threshold=0.99)
    assert empty.item() == 0.0


def threshold_problem():
    """Logits [x + c, -x - c] with c the coefficient of a bias-only task vector: class 0 is
    predicted iff x > -c. Training labels are all class 0, so the fit pushes c up without end;
    on the validation points x = -0.25 (class 0), -0.75 and -1.25 (class 1) every point is
    right only for 0.25 < c < 0.75, and only one is right for c > 1.25."""
    model = nn.Linear(1, 2)
    base = {"weight": torch.tensor([[1.0], [-1.0]]), "bias": torch.zeros(2)}
    tvs = [{"weight": torch.zeros(2, 1), "bias": torch.tensor([1.0, -1.0])}]
    train = TensorData(torch.zeros(64, 1), torch.zeros(64, dtype=torch.long))
    val = TensorData(torch.tensor([[-0.25], [-0.75], [-1.25]]), torch.tensor([0, 1, 1]))
    return model, base, tvs, train, val


def test_validation_keeps_the_best_step_not_the_last():
    model, base, tvs, train, val = threshold_problem()
    fit = dict(steps=80, lr=0.1, batch_size=64, generator=torch.Generator().manual_seed(0))
    last = fit_coefficients(model, base, tvs, train, "supervised", **fit)
    assert float(last[0, 1]) > 1.25  # the end of the fit is bad on validation (1 of 3 right)
    best = fit_coefficients(model, base, tvs, train, "supervised", val_data=val,
                            eval_every=1, **fit)
    assert 0.25 < float(best[0, 1]) < 0.75  # every validation point right
    # Checked only every 40 steps, the kept coefficients are one of the checked ones: the
    # start (c = 0, 2 of 3 right) beats step 40 and step 80 (c > 1.25, 1 of 3 right).
    sparse = fit_coefficients(model, base, tvs, train, "supervised", val_data=val,
                              eval_every=40, **fit)
    assert torch.equal(sparse, torch.zeros(1, 2))


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records its hyperparameters and the gradient norm each step sees."""
    seen: list = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        RecordingAdamW.seen.append({"kwargs": kwargs, "norms": []})

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([v.norm() for v in grads])))
        RecordingAdamW.seen[-1]["norms"].append(norm)
        return super().step(closure)


def test_weight_decay_and_clipping_reach_the_optimizer(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.seen = []
    model, base, tvs, train, _ = threshold_problem()
    big = [{k: v * 1000 for k, v in tvs[0].items()}]  # gradients far above norm 1
    g = torch.Generator().manual_seed(0)
    fit_coefficients(model, base, big, train, "supervised", steps=5, generator=g)
    fit_coefficients(model, base, big, train, "supervised", steps=5, generator=g, grad_clip=None)
    clipped, raw = RecordingAdamW.seen
    assert clipped["kwargs"] == {"lr": 1e-3, "weight_decay": 0.1}  # the paper's recipe
    assert max(raw["norms"]) > 100
    assert max(clipped["norms"]) <= 1.0 + 1e-5
    # Decoupled weight decay: with zero task vectors the gradient is 0, so AdamW only shrinks
    # the coefficients, c_n = c_0 (1 - lr * wd)^n.
    zero = [{k: torch.zeros_like(v) for k, v in tvs[0].items()}]
    coefs = fit_coefficients(model, base, zero, train, "supervised", torch.ones(1, 2), steps=10,
                             lr=0.1, weight_decay=0.5, generator=g)
    torch.testing.assert_close(coefs, torch.full((1, 2), 0.95 ** 10), rtol=1e-6, atol=0)

