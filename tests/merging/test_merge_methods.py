"""Average, task arithmetic and TIES against tensors computed by hand."""
import pytest
import torch

from cl_toolkit.merging.average import average, average_step_
from cl_toolkit.merging.task_arithmetic import task_arithmetic, task_arithmetic_step_
from cl_toolkit.merging.ties import disjoint_merge, elect_sign, ties, trim

T = torch.tensor


def test_average_and_running_average():
    tvs = [{"w": T([1.0, 2.0])}, {"w": T([3.0, 6.0])}, {"w": T([-1.0, 1.0])}]
    assert torch.allclose(average(tvs)["w"], T([1.0, 3.0]))
    mean = {"w": T([1.0, 2.0])}
    average_step_(mean, tvs[1], count=1)
    assert torch.allclose(mean["w"], T([2.0, 4.0]))
    average_step_(mean, tvs[2], count=2)
    assert torch.allclose(mean["w"], T([1.0, 3.0]))


def test_task_arithmetic_hand_values():
    tvs = [{"w": T([1.0, -2.0]), "b": T([0.5])}, {"w": T([3.0, 4.0]), "b": T([-1.5])}]
    out = task_arithmetic(tvs, 0.5)
    assert torch.allclose(out["w"], T([2.0, 1.0])) and torch.allclose(out["b"], T([-0.5]))
    total = {"w": T([1.0, -2.0]), "b": T([0.5])}
    task_arithmetic_step_(total, tvs[1])
    assert torch.allclose(total["w"], T([4.0, 2.0]))


# Three 4x4 task vectors whose magnitudes are each a permutation of 1..16, so trimming to
# density 0.5 keeps exactly the entries with |x| >= 9 (no ties at the threshold).
TAU1 = T([[16., -1, 9, -4], [-12, 3, -14, 6], [2, -10, 5, 15], [-8, 11, -7, 13]])
TAU2 = T([[-3., 14, -16, 2], [10, -5, 1, -13], [-9, 7, -12, 4], [15, -6, 11, -8]])
TAU3 = T([[5., -9, 12, -16], [14, 1, -3, 10], [-13, 8, 2, -11], [6, -15, 4, 7]])
# Signs of the summed trimmed mass, worked out by hand (0: the trimmed entries sum to zero).
SIGN = T([[1., 1, 1, -1], [1, 0, -1, -1], [-1, -1, -1, 1], [1, -1, 1, 1]])
# Disjoint mean / sum of the trimmed entries that agree with SIGN, by hand.
MEAN = T([[16., 14, 10.5, -16], [12, 0, -14, -13], [-11, -10, -12, 15], [15, -15, 11, 13]])
SUM = T([[16., 14, 21, -16], [24, 0, -14, -13], [-22, -10, -12, 15], [15, -15, 11, 13]])


def test_trim_keeps_top_half_by_magnitude():
    expected = T([[16., 0, 9, 0], [-12, 0, -14, 0], [0, -10, 0, 15], [0, 11, 0, 13]])
    assert torch.equal(trim(TAU1, 0.5), expected)
    assert torch.equal(trim(TAU1, 1.0), TAU1)
    with pytest.raises(ValueError, match="density"):
        trim(TAU1, 0.0)


def test_ties_4x4_against_hand_made_sign_mask():
    trimmed = torch.stack([trim(t, 0.5) for t in (TAU1, TAU2, TAU3)])
    assert torch.equal(elect_sign(trimmed), SIGN)
    assert torch.equal(disjoint_merge(trimmed, SIGN, "mean"), MEAN)
    merged = ties([{"w": TAU1}, {"w": TAU2}, {"w": TAU3}], density=0.5, reduce="mean")
    assert torch.equal(merged["w"], MEAN)
    merged = ties([{"w": TAU1}, {"w": TAU2}, {"w": TAU3}], density=0.5, reduce="sum")
    assert torch.equal(merged["w"], SUM)


def test_trimming_ranks_the_whole_task_vector():
    """The TIES paper trims over all of a task vector's entries: with density 0.25 of 8 entries
    the two largest (10 and 9, both in "a") survive and "b" is zeroed entirely (per-tensor
    trimming would keep one entry of each)."""
    tv = {"a": torch.tensor([10.0, -9.0, 1.0, 0.5]), "b": torch.tensor([0.1, -0.2, 0.3, 0.4])}
    merged = ties([tv], density=0.25, reduce="sum")
    assert torch.equal(merged["a"], torch.tensor([10.0, -9.0, 0.0, 0.0]))
    assert torch.equal(merged["b"], torch.zeros(4))


def test_whole_vector_threshold_matches_a_sort():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(13, generator=g)]
    from cl_toolkit.merging.ties import keep_above, trim_threshold

    th = trim_threshold(tensors, 0.3)
    flat = torch.cat([t.abs().float().flatten() for t in tensors])
    k = round(0.3 * flat.numel())
    kth = flat.sort(descending=True).values[k - 1]
    kept = sum(int((keep_above(t, th) != 0).sum()) for t in tensors)
    assert kept == k
    assert torch.tensor(th, dtype=torch.int32).view(torch.float32) == kth
