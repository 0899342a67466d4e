"""Checks of the perf scripts (their plumbing on CPU, at toy sizes): `make perf-test`, apart
from the library's suite, since the scripts are not part of the installed package."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CLTK_KERNELS_POISON", "1")
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_root():
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_ROOT
