"""The plain-Python host helpers agree with Triton's own cdiv / next_power_of_2."""
import triton

from cl_toolkit.kernels.utils import cdiv, next_power_of_2


def test_match_triton():
    for n in range(1, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 16, 32, 64):
            assert cdiv(n, b) == triton.cdiv(n, b)


def test_scan_v_block_narrows_until_the_programs_fill_the_sms():
    # sm_count is 132 off-GPU; programs = sequences * heads * ceil(V / BV).
    from cl_toolkit.kernels.chunk_triton import _bv_scan
    from cl_toolkit.kernels.utils import make_layout

    def bv(batch, H, V=128, BV=64):
        return _bv_scan(make_layout(batch, 256, None, 64, "cpu"), H, V, BV)
    assert bv(8, 16) == 64     # 8 * 16 * 2 = 256 programs >= 132
    assert bv(4, 16) == 32     # 128 at 64 -> 256 at 32
    assert bv(1, 16) == 16     # 32 -> 64 -> 128: stops at the narrowest block
    assert bv(1, 1, V=16, BV=16) == 16
