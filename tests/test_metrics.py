"""Metrics against matrices worked out by hand."""
import math

import numpy as np
import pytest

from cl_toolkit import metrics

# R[i, j]: accuracy on task j after task i. b: before training.
R3 = [[0.9, 0.1, 0.2],
      [0.6, 0.8, 0.3],
      [0.7, 0.5, 0.9]]
B3 = [0.1, 0.2, 0.25]


def test_three_tasks_by_hand():
    s = metrics.summary(R3, B3)
    assert s["acc"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    # BWT: ((0.7-0.9) + (0.5-0.8)) / 2
    assert s["bwt"] == pytest.approx(-0.25)
    # FWT: ((R[0,1]-b1) + (R[1,2]-b2)) / 2 = ((0.1-0.2) + (0.3-0.25)) / 2
    assert s["fwt"] == pytest.approx(-0.025)
    # Forgetting: task0 max(0.9, 0.6) - 0.7 = 0.2; task1 max(0.1, 0.8) - 0.5 = 0.3
    assert s["forgetting_per_task"] == pytest.approx([0.2, 0.3])
    assert s["forgetting"] == pytest.approx(0.25)
    assert s["learning_acc"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)
    assert s["running_acc"] == pytest.approx([0.9, 0.7, 0.7])


def test_max_based_forgetting_differs_from_avalanche_style():
    # Accuracy on task 0 rises after task 1, then drops: the max is 0.95, not R[0,0] = 0.5.
    R = [[0.5, 0.0, 0.0], [0.95, 0.9, 0.0], [0.6, 0.9, 0.8]]
    assert metrics.forgetting_per_task(R)[0] == pytest.approx(0.35)
    assert -metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.6) + 0.0) / 2)


def test_single_task_edge_case():
    s = metrics.summary([[0.8]], [0.1])
    assert s["acc"] == 0.8 and s["learning_acc"] == 0.8
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] is None
    assert s["forgetting_per_task"] == [] and s["running_acc"] == [0.8]


def test_two_tasks_edge_case():
    s = metrics.summary([[0.9, 0.3], [0.4, 0.8]], [0.5, 0.2])
    assert s["acc"] == pytest.approx(0.6)
    assert s["bwt"] == pytest.approx(-0.5)
    assert s["fwt"] == pytest.approx(0.1)
    assert s["forgetting"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], np.zeros((2, 3))])
def test_non_square_matrix_is_refused(bad):
    with pytest.raises(ValueError, match="square"):
        metrics.accuracy(bad)


def test_before_row_length_checked():
    with pytest.raises(ValueError, match="3 entries"):
        metrics.forward_transfer(R3, [0.1, 0.2])
    assert not math.isnan(metrics.accuracy(R3))


def test_forgetting_ignores_the_rows_before_a_task_was_learned():
    """Chaudhry et al. 2018 (as in most code): max over l in [j, T-1). Domain-il with positive
    forward transfer: task 1 scores 0.85 after task 0 only, 0.7 once learned, 0.6 at the end;
    its forgetting is 0.7 - 0.6, not 0.85 - 0.6."""
    R = [[0.9, 0.85, 0.5],
         [0.8, 0.7, 0.6],
         [0.75, 0.6, 0.9]]
    assert metrics.forgetting_per_task(R) == pytest.approx([0.9 - 0.75, 0.7 - 0.6])
    assert metrics.forgetting(R) == pytest.approx((0.15 + 0.1) / 2)


def test_metrics_that_do_not_apply_are_none_not_a_number():
    s = metrics.summary(R3, B3, not_applicable={"fwt": "structurally zero"})
    assert s["fwt"] is None
    assert s["acc"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    with pytest.raises(ValueError, match="fwt"):
        metrics.summary(R3, B3, not_applicable={"fwd": "typo"})


def test_class_il_fwt_is_not_applicable_task_and_domain_il_fwt_is():
    assert "fwt" in metrics.not_applicable("class-il")
    assert metrics.not_applicable("task-il") == {} == metrics.not_applicable("domain-il")
    declared = {"fwt": "a kernel machine exists only for learned tasks"}
    assert metrics.not_applicable("task-il", declared) == declared
    assert metrics.not_applicable("class-il", declared)["fwt"] == declared["fwt"]


def test_transient_forgetting_sees_a_fall_that_the_final_row_hides():
    # Task 0 falls from 1.0 to chance (0.5) after task 2, then comes back to 0.9.
    R = [[1.0, 0.1, 0.1, 0.1],
         [0.95, 0.9, 0.1, 0.1],
         [0.5, 0.8, 0.9, 0.1],
         [0.9, 0.85, 0.6, 0.8]]
    s = metrics.summary(R)
    assert s["worst_after_learning"] == [0.5, 0.8, 0.6, 0.8]
    # largest fall from an earlier peak: task 0 1.0 -> 0.5; task 1 0.9 -> 0.8; task 2 0.9 -> 0.6
    assert s["largest_drop_per_task"] == pytest.approx([0.5, 0.1, 0.3, 0.0])
    assert s["transient_forgetting"] == pytest.approx((0.5 + 0.1 + 0.3) / 3)
    assert s["forgetting"] == pytest.approx((0.1 + 0.05 + 0.3) / 3)  # the final row's view
    assert metrics.summary([[0.7]])["transient_forgetting"] is None


def test_transient_forgetting_of_a_lower_is_better_score():
    E = [[0.0, 0.9], [0.4, 0.1]]  # an error rate: task 0 rose from 0.0 to 0.4
    s = metrics.summary(E, higher_is_better=False)
    assert s["transient_forgetting"] == pytest.approx(0.4)
    assert s["worst_after_learning"] == [0.4, 0.1]


def test_next_task_score_is_each_task_just_before_it_is_learned():
    R = [[0.9, 0.2, 0.1], [0.8, 0.9, 0.4], [0.7, 0.8, 0.9]]
    assert metrics.next_task(R) == pytest.approx((0.2 + 0.4) / 2)
    assert metrics.next_task([[0.5]]) is None
    lower = metrics.summary(R, higher_is_better=False)  # stays in the score's own units
    assert lower["next_task"] == pytest.approx(0.3)
