"""SupCon (https://arxiv.org/abs/2004.11362) against a direct double loop."""
import math

import pytest
import torch

from cl_toolkit.strategies.supcon import SupConLoss


def _loop_supcon(feats, labels, T):
    z = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in feats.tolist()]
    y = labels.tolist()
    dot = lambda a, b: sum(u * v for u, v in zip(a, b))  # noqa: E731
    per_anchor = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(dot(z[i], z[a]) / T) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(dot(z[i], z[p]) / T) / denom)
                               for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("T", [0.1, 0.5, 1.0])
def test_supcon_matches_double_loop(T):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # classes 2 and 3 have no positive
    got = SupConLoss(T)(feats, labels)
    assert got.item() == pytest.approx(_loop_supcon(feats, labels, T), rel=1e-10)


def test_supcon_is_scale_invariant_and_has_gradients():
    feats = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = SupConLoss(0.2)(feats, labels)
    torch.testing.assert_close(loss, SupConLoss(0.2)(3.0 * feats, labels))
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_supcon_without_positives_is_zero():
    feats = torch.randn(3, 4, requires_grad=True)
    assert SupConLoss()(feats, torch.tensor([0, 1, 2])).item() == 0.0
