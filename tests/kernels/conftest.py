"""Kernel tests run the Triton kernels on CPU through the interpreter.

The environment must be set before triton is first imported, hence at conftest import time.
CLTK_KERNELS_POISON fills fresh kernel buffers with NaN so an unwritten output cannot pass.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLTK_KERNELS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (one number per tensor, robust to tiny entries)."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (an output or gradient was not written?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
