import os
from pathlib import Path

# Tests never reach a model hub: a missing weight must fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
# The models under test are tiny: one thread per process avoids OpenMP spin-waiting, which
# makes small ops many times slower on a shared 2-core machine. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in the interpreter; set before anything imports triton.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_root():
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_ROOT
