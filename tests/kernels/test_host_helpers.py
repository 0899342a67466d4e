"""The plain-Python host helpers agree with Triton's own cdiv / next_power_of_2."""
import triton

from cl_toolkit.kernels.utils import cdiv, next_power_of_2


def test_match_triton():
    for n in range(1, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 16, 32, 64):
            assert cdiv(n, b) == triton.cdiv(n, b)
