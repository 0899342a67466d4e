import pytest
import torch

from cl_toolkit.merging.task_vectors import (
    CheckpointNotFoundError, NonFiniteTaskVectorError, StateDictMismatchError, add_,
    check_finite, combine_into_, floating_keys, load_checkpoint, norm, subtract_, task_vector)


def sd(**kw):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in kw.items()}


def test_task_vector_and_norm_hand_values():
    base = sd(w=[[1.0, 2.0], [3.0, 4.0]], b=[0.5, 0.5])
    ft = sd(w=[[2.0, 2.0], [3.0, 1.0]], b=[0.5, 4.5])
    tv = task_vector(ft, base)
    assert torch.equal(tv["w"], torch.tensor([[1.0, 0.0], [0.0, -3.0]]))
    assert torch.equal(tv["b"], torch.tensor([0.0, 4.0]))
    assert norm(tv) == pytest.approx((1 + 9 + 16) ** 0.5)
    out = {k: torch.empty_like(v) for k, v in base.items()}
    combine_into_(out, base, tv, 0.5)
    assert torch.equal(out["w"], torch.tensor([[1.5, 2.0], [3.0, 2.5]]))


def test_in_place_ops_keep_storage():
    base = sd(w=[1.0, 2.0])
    target = sd(w=[4.0, 4.0])
    ptr = target["w"].data_ptr()
    subtract_(target, base)
    add_(target, sd(w=[1.0, 1.0]), scale=2.0)
    assert target["w"].data_ptr() == ptr
    assert torch.equal(target["w"], torch.tensor([5.0, 4.0]))


def test_integer_entries_are_not_task_vector_entries():
    state = {"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}
    assert floating_keys(state) == ["w"]
    assert floating_keys({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, ["b."]) == ["b.w"]


def test_shape_mismatch_names_first_key_and_both_shapes():
    base = {"layer0.weight": torch.zeros(4, 3), "layer1.weight": torch.zeros(2, 4)}
    other = {"layer0.weight": torch.zeros(4, 3), "layer1.weight": torch.zeros(2, 5)}
    with pytest.raises(StateDictMismatchError, match=r"'layer1.weight'.*\(2, 5\).*\(2, 4\)"):
        task_vector(other, base)


def test_missing_key_and_dtype_mismatch():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(StateDictMismatchError, match=r"first 'b'.*\(3,\)"):
        task_vector({"a": torch.zeros(2)}, base)
    with pytest.raises(StateDictMismatchError, match=r"'a' is torch.float64.*torch.float32"):
        task_vector({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}, base)


def test_nan_task_vector_is_refused_with_its_key():
    tv = {"ok": torch.zeros(3), "bad": torch.tensor([0.0, float("nan"), float("inf")])}
    with pytest.raises(NonFiniteTaskVectorError, match=r"2 NaN/Inf values in 'bad'"):
        check_finite(tv)


def test_load_checkpoint(tmp_path):
    state = sd(w=[1.0, 2.0])
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pt")
    assert torch.equal(load_checkpoint(tmp_path / "nested.pt")["w"], state["w"])
    with pytest.raises(CheckpointNotFoundError, match=r"nestd.pt.*nested.pt"):
        load_checkpoint(tmp_path / "nestd.pt")
    with pytest.raises(CheckpointNotFoundError, match="does not exist either"):
        load_checkpoint(tmp_path / "nowhere" / "x.pt")
