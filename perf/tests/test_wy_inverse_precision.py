"""perf/wy_inverse_precision.py: its tf32 model and its copy of the WY product chain,
against hand-computed roundings and the float64 inverse."""
import torch

from perf import wy_inverse_precision as wy


def test_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -12, -3.0 - 2.0 ** -12])
    # 1 + 2^-11 is a tie and rounds up; 1 + 2^-12 rounds down; signs are kept.
    expect = torch.tensor([1.0, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -10, 1.0, -3.0])
    assert torch.equal(wy.tf32(x), expect)


def test_three_pass_chain_is_the_inverse():
    A = wy.chunk(corr=1.0, beta_max=1.0, decay=0.1, gen=torch.Generator().manual_seed(3))
    assert torch.equal(A, torch.tril(A, -1))
    exact = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + A.double())
    assert wy.rel(wy.inverse(A, "tf32x3"), exact) < 1e-5
    assert wy.rel(wy.inverse(A, "tf32"), exact) > 10 * wy.rel(wy.inverse(A, "tf32x3"), exact)
