"""Stream builders: sizes, class splits, transforms, and loaders on files written in the real
on-disk formats."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from cl_toolkit.benchmarks import cifar100, common, digits, fashion_mnist
from cl_toolkit.errors import ConfigError, DatasetNotFoundError


def test_split_digits_covers_every_sample_once():
    s = digits.split_digits()
    assert len(s) == 5 and s.scenario == "task-il" and s.input_shape == (1, 8, 8)
    assert [t.classes for t in s] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.train) + len(t.test) for t in s) == 1797
    for t in s:
        assert set(t.train.y.unique().tolist()) == set(t.classes)
        assert (t.train.t == t.index).all() and (t.test.t == t.index).all()
        assert 0.0 <= float(t.train.x.min()) and float(t.train.x.max()) <= 1.0


def test_class_order_seed_shuffles_but_partitions():
    s = digits.split_digits(class_order_seed=3)
    classes = [c for t in s for c in t.classes]
    assert sorted(classes) == list(range(10)) and classes != list(range(10))


def test_uneven_split_is_refused():
    with pytest.raises(ConfigError, match="divisors of 10"):
        digits.split_digits(n_tasks=3)


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(3, 1, 6, 6)
    # Counter-clockwise by +90 in image coordinates (y down) equals torch.rot90 with k=-1.
    out = common.rotate(x, 90.0)
    assert torch.allclose(out, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5) or \
        torch.allclose(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(common.rotate(x, 0.0), x, atol=1e-6)


def test_permutation_is_a_bijection_of_pixels():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    perm = torch.randperm(16)
    out = common.permute_pixels(x, perm)
    assert torch.equal(out.view(2, 16), x.view(2, 16)[:, perm])


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i",
                                                                       *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_streams_on_generated_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = fashion_mnist.load_fashion_mnist(str(tmp_path))
    assert train.x.shape == (60, 1, 28, 28) and test.y.tolist() == [i % 10 for i in range(20)]
    raw = fashion_mnist.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.allclose(train.x[:, 0], torch.from_numpy(raw.copy()).float() / 255)

    rot = fashion_mnist.rotated_fashion_mnist(n_tasks=3, root=str(tmp_path), seed=1)
    angles = rot.info["angles"]
    assert all((t - 1) * 10 - 10 < a <= (t - 1) * 10 for t, a in enumerate(angles, 1))
    assert len(set(angles)) == 3
    assert torch.allclose(rot[2].train.x, common.rotate(train.x, angles[2]))
    assert rot.scenario == "domain-il" and all(t.classes == tuple(range(10)) for t in rot)

    perm = fashion_mnist.permuted_fashion_mnist(n_tasks=3, root=str(tmp_path), seed=1)
    assert torch.equal(perm[0].train.x, train.x)  # task 0 is the identity
    assert not torch.equal(perm[1].train.x, train.x)
    assert torch.equal(perm[1].train.x.flatten(1).sort(1).values, train.x.flatten(1).sort(1).values)

    full = fashion_mnist.split_fashion_mnist(root=str(tmp_path))
    small = fashion_mnist.split_fashion_mnist(root=str(tmp_path), max_train_per_task=5,
                                              max_test_per_task=3, seed=2)
    for f, s in zip(full, small):
        assert (len(f.train), len(f.test)) == (12, 4) and (len(s.train), len(s.test)) == (5, 3)
        assert set(s.train.y.tolist()) <= set(f.classes) and s.train.t.eq(f.index).all()
        rows = {tuple(x.flatten().tolist()) for x in f.train.x}
        assert all(tuple(x.flatten().tolist()) in rows for x in s.train.x)


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBBi", 0, 0, 8, 1, 10) + b"\x00" * 4)
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(path)


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        fashion_mnist.load_fashion_mnist(str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "download=true" in msg


def test_real_fashion_mnist(fashion_root):
    s = fashion_mnist.split_fashion_mnist(root=str(fashion_root))
    assert len(s) == 5 and sum(len(t.train) for t in s) == 60000
    assert sum(len(t.test) for t in s) == 10000


def _write_cifar100(root, n_train=200, n_test=100):
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": [i % 100 for i in range(n)],
             b"coarse_labels": [i % 20 for i in range(n)], b"filenames": [b"x"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [b"c"] * 20}, f)
    return folder


def test_cifar100_loader_on_file_in_real_format(tmp_path):
    folder = _write_cifar100(tmp_path)
    s = cifar100.split_cifar100(root=str(tmp_path))
    assert len(s) == 20 and s.input_shape == (3, 32, 32)
    assert s[0].classes == (0, 1, 2, 3, 4) and s[19].classes == (95, 96, 97, 98, 99)
    assert s[0].class_names[3] == "class3"
    assert all(len(t.train) == 10 and len(t.test) == 5 for t in s)
    # Pixel layout: the first 1024 bytes are the red plane, row-major.
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    x, _, _ = cifar100.load_cifar100(str(tmp_path), normalize=False)
    red = torch.from_numpy(raw[:1024].reshape(32, 32).astype(np.float32) / 255)
    assert torch.allclose(x.x[0, 0], red)
    ten = cifar100.split_cifar100(n_tasks=10, root=str(tmp_path))
    assert len(ten) == 10 and len(ten[0].classes) == 10


def test_cifar100_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download=true"):
        cifar100.load_cifar100(str(tmp_path))
    folder = _write_cifar100(tmp_path)
    (folder / "train").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetNotFoundError, match="not a readable CIFAR-100 pickle"):
        cifar100.load_cifar100(str(tmp_path))


def test_avalanche_adapter_on_tensor_benchmark():
    pytest.importorskip("avalanche")
    from avalanche.benchmarks import tensors_benchmark

    from cl_toolkit.benchmarks.avalanche_adapter import from_avalanche

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = torch.arange(40) % 4
    bench = tensors_benchmark(
        train_tensors=[(x[:20][y[:20] < 2], y[:20][y[:20] < 2]),
                       (x[:20][y[:20] >= 2], y[:20][y[:20] >= 2])],
        test_tensors=[(x[20:][y[20:] < 2], y[20:][y[20:] < 2]),
                      (x[20:][y[20:] >= 2], y[20:][y[20:] >= 2])],
        task_labels=[0, 1])
    s = from_avalanche(bench)
    assert s.scenario == "task-il" and len(s) == 2 and s.num_classes == 4
    assert s[0].classes == (0, 1) and s[1].classes == (2, 3)
    assert torch.equal(s[1].train.x, x[:20][y[:20] >= 2])
    assert torch.equal(s[1].test.y, y[20:][y[20:] >= 2])


def test_shuffled_stream_reorders_and_reindexes():
    s = digits.split_digits()
    r = s.shuffled(seed=4)
    assert sorted(t.classes for t in r) == sorted(t.classes for t in s)
    assert [t.classes for t in r] != [t.classes for t in s]
    for i, t in enumerate(r):
        assert t.index == i and (t.train.t == i).all() and (t.test.t == i).all()
    assert r.info["task_order"] == [t.name for t in r]
    assert [t.classes for t in s.shuffled(seed=4)] == [t.classes for t in r]
