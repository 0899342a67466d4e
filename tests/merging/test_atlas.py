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
