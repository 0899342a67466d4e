"""The short convolution over packed segments (kernels/short_conv) against its naive.py, forward
and gradients, and its input checks."""
import pytest
import torch

from cl_toolkit.kernels.short_conv import naive_segment_conv, segment_conv

from .conftest import rel_err


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12),
                                               ("triton", torch.float32, 1e-5),
                                               ("triton", torch.float16, 1e-2)])
@pytest.mark.parametrize("with_cache", [True, False])
def test_segment_conv_matches_naive(backend, dtype, tol, with_cache):
    # Lengths 5, 0, 1, 40 (more than one 32-row kernel block), 2 with W - 1 = 3; C = 70 is
    # not a multiple of the kernel's 64-channel block.
    torch.manual_seed(0)
    cu = [0, 5, 5, 6, 46, 48]
    C = 70
    x = torch.randn(48, C, dtype=dtype, requires_grad=True)
    w = torch.randn(C, 4, dtype=dtype, requires_grad=True)
    # The cache as the layer returns it: a transposed (non-contiguous) view.
    leaf = torch.randn(5, 3, C, dtype=dtype, requires_grad=True) if with_cache else None
    cache = leaf.transpose(1, 2) if with_cache else None
    dy, dt = torch.randn(48, C, dtype=dtype), torch.randn(5, C, 3, dtype=dtype)
    outs = []
    for fn in (lambda *a: segment_conv(*a, return_tail=True, backend=backend),
               naive_segment_conv):
        y, tail = fn(x, w, cu, cache)
        ((y * dy).sum() + (tail * dt).sum()).backward()
        outs.append((y, tail, x.grad, w.grad) + ((leaf.grad,) if with_cache else ()))
        x.grad = w.grad = None
        if with_cache:
            leaf.grad = None
    for name, ours, ref in zip(("y", "tail", "dx", "dw", "dcache"), *outs):
        assert rel_err(ours, ref) < tol, name


def test_segment_conv_reads_a_row_stride_and_rejects_bad_offsets():
    x = torch.randn(6, 10)[:, :4]  # row stride 10, as a column slice of a projection
    w = torch.randn(4, 3)
    ref = segment_conv(x.contiguous(), w, [0, 2, 6], backend="torch")
    assert rel_err(segment_conv(x, w, [0, 2, 6], backend="triton"), ref) < 1e-6
    with pytest.raises(ValueError, match="rise from 0 to the row count 6"):
        segment_conv(x, w, [0, 4, 3, 6])
    with pytest.raises(ValueError, match="cache must be"):
        segment_conv(x, w, [0, 2, 6], torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"weight must be \[C, W\] = \[4, W >= 2\]"):
        segment_conv(x, torch.randn(5, 3), [0, 2, 6])
    with pytest.raises(ValueError, match="x must be"):
        segment_conv(x[None], w, [0, 2, 6])
