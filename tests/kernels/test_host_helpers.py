"""The plain-Python host helpers: cdiv / next_power_of_2 against Triton's, the scan V block and
the varlen chunk layout against hand-computed values."""
import torch
import triton

from cl_toolkit.kernels.common.utils import cdiv, next_power_of_2


def test_match_triton():
    for n in range(1, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 16, 32, 64):
            assert cdiv(n, b) == triton.cdiv(n, b)


def test_scan_v_block_narrows_until_the_programs_fill_the_sms():
    # sm_count is 132 off-GPU; programs = sequences * heads * ceil(V / BV).
    from cl_toolkit.kernels.common.chunk_triton import _bv_scan
    from cl_toolkit.kernels.common.utils import make_layout

    def bv(batch, H, V=128, BV=64):
        return _bv_scan(make_layout(batch, 256, None, 64, "cpu"), H, V, BV)
    assert bv(8, 16) == 64     # 8 * 16 * 2 = 256 programs >= 132
    assert bv(4, 16) == 32     # 128 at 64 -> 256 at 32
    assert bv(1, 16) == 16     # 32 -> 64 -> 128: stops at the narrowest block
    assert bv(1, 1, V=16, BV=16) == 16


def test_varlen_layout_hand_computed():
    # Lengths 5, 0, 65 in chunks of 32: one chunk, none, three.
    from cl_toolkit.kernels.common.utils import make_layout
    layout = make_layout(1, 70, None, 32, "cpu", [0, 5, 5, 70])
    assert layout.cu_seqlens.tolist() == [0, 5, 5, 70]
    assert layout.chunk_offsets.tolist() == [0, 1, 1, 4]
    assert layout.chunk_indices.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2]]
    assert (layout.num_seqs, layout.num_chunks) == (3, 4)
    assert layout.chunk_indices.dtype == torch.int32
    # The three parts share one buffer; each starts 16-byte aligned (Triton specialises on it).
    assert all(t.storage_offset() % 4 == 0
               for t in (layout.cu_seqlens, layout.chunk_offsets, layout.chunk_indices))
