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


def test_trim_threshold_matches_a_sort_oracle():
    """The threshold is the k-th largest magnitude, k = round(density * n), over all tensors
    of the vector, ranked in their own precision (float64 stays float64); entries tied with it
    are all kept."""
    from cl_toolkit.merging.ties import keep_above, trim_threshold

    g = torch.Generator().manual_seed(0)
    # float64 magnitudes that float32 cannot tell apart: 1 + 1e-12 must outrank 1.
    a = torch.cat([torch.randn(33, generator=g, dtype=torch.float64),
                   T([1.0 + 1e-12, -1.0], dtype=torch.float64)]).reshape(5, 7)
    b = torch.randn(13, generator=g)
    for density in (0.1, 0.3, 0.5, 1 / 48):
        th = trim_threshold([a, b], density)
        values = sorted((abs(float(v)) for t in (a, b) for v in t.flatten()), reverse=True)
        k = max(1, round(density * len(values)))
        assert float(th) == values[k - 1]
        kept = [keep_above(t, th) for t in (a, b)]
        assert sum(int((t != 0).sum()) for t in kept) == k
        assert all(torch.equal(kt, torch.where(t.abs() >= values[k - 1], t, 0))
                   for kt, t in zip(kept, (a, b)))
    # One of the two near-1 entries is the 10th largest here: only it survives.
    top = sorted(range(48), key=lambda i: -abs(float(torch.cat([a.flatten(), b])[i])))
    assert float(trim_threshold([a, b], 1 / 48)) == abs(float(torch.cat([a.flatten(), b])[top[0]]))
    # Ties at the threshold: k = 3 of six magnitudes (3, 3, 3, 3, 2, 1) keeps all four 3s.
    tied = T([3.0, -3.0, 1.0, 3.0, -2.0, -3.0])
    assert float(trim_threshold([tied], 0.5)) == 3.0
    assert torch.equal(trim(tied, 0.5), T([3.0, -3.0, 0.0, 3.0, 0.0, -3.0]))


# Two task vectors whose trimmed entries cancel exactly at [0, 0] (8 - 8) and [2, 1] (-6 + 6).
# Density 0.5 keeps |A| >= 5 and |B| >= 4 (eight entries each).
CANCEL_A = T([[8., -1, 6, 2], [-7, 3, 5, -2], [4, -6, 1, 7], [-3, 2, -8, 5]])
CANCEL_B = T([[-8., 5, -1, 2], [2, -7, 3, 6], [-1, 6, 4, -3], [7, 1, -2, 5]])
# Elected signs by hand before resolution; the zeros at [0, 3], [2, 0], [3, 1] have no entry left.
RAW_SIGN = T([[0., 1, 1, 0], [-1, -1, 1, 1], [0, 0, 1, 1], [1, 0, -1, 1]])
# The signs sum to 5 > 0: every 0 becomes +1, so [0, 0] takes A's 8 and [2, 1] B's 6.
CANCEL_MEAN = T([[8., 5, 6, 0], [-7, -7, 5, 6], [0, 6, 4, 7], [7, 0, -8, 5]])


def test_exact_cancellation_takes_the_majority_sign():
    from cl_toolkit.merging.ties import majority_sign, trim_threshold

    trimmed = torch.stack([trim(CANCEL_A, 0.5), trim(CANCEL_B, 0.5)])
    assert torch.equal(elect_sign(trimmed), RAW_SIGN)
    vectors = [{"w": CANCEL_A}, {"w": CANCEL_B}]
    thresholds = [trim_threshold([t], 0.5) for t in (CANCEL_A, CANCEL_B)]
    assert majority_sign(vectors, thresholds) == 1.0
    assert torch.equal(elect_sign(trimmed, 1.0), torch.where(RAW_SIGN == 0, 1.0, RAW_SIGN))
    merged = ties(vectors, density=0.5, reduce="mean")
    assert torch.equal(merged["w"], CANCEL_MEAN)
    # Negated inputs: the majority is -1 and [0, 0] / [2, 1] take the negative entries.
    merged = ties([{"w": -CANCEL_A}, {"w": -CANCEL_B}], density=0.5, reduce="sum")
    assert torch.equal(merged["w"], -T([[8., 5, 6, 0], [-7, -7, 5, 6], [0, 6, 4, 7],
                                         [7, 0, -8, 10]]))
    # The majority is counted over the whole vector, not per tensor. Untrimmed, the 4x4's
    # signs sum to 8 (row by row 3, 0, 3, 2); nine negative signs in a second tensor turn the
    # majority to -1.
    merged = ties([{"w": CANCEL_A}, {"w": CANCEL_B}], density=1.0, reduce="mean")
    assert float(merged["w"][0, 0]) == 8.0 and float(merged["w"][2, 1]) == 6.0
    vectors = [{"w": CANCEL_A, "v": -torch.ones(9)}, {"w": CANCEL_B, "v": -torch.ones(9)}]
    merged = ties(vectors, density=1.0, reduce="mean")
    assert float(merged["w"][0, 0]) == -8.0 and float(merged["w"][2, 1]) == -6.0
