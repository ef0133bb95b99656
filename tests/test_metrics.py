"""Every metric against hand-computed values, including the off-by-one cases."""

import math

import pytest
import torch

from cl.analysis import metrics as M

nan = float("nan")

# 3 experiences; rows = after experience i, columns = test task j; None = not evaluated.
R = [
    [0.9, None, None],
    [0.6, 0.8, None],
    [0.5, 0.7, 0.9],
]
N = [100, 50, 50]


def test_final_accuracies():
    assert M.final_avg_acc(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # sample-weighted: (100*0.5 + 50*0.7 + 50*0.9) / 200
    assert M.final_acc(R, N) == pytest.approx(130 / 200)


def test_incremental_accuracy():
    # A_0 = 0.9; A_1 = (100*0.6 + 50*0.8)/150 = 100/150; A_2 = 0.65
    assert M.incremental_accs(R, N) == pytest.approx([0.9, 100 / 150, 0.65])
    assert M.avg_incremental_acc(R, N) == pytest.approx((0.9 + 100 / 150 + 0.65) / 3)


def test_forgetting_uses_max_over_rows_before_last():
    # task 0: max(R00, R10) = 0.9 -> 0.9 - 0.5 = 0.4; task 1: max(R11) = 0.8 -> 0.1
    assert M.forgetting_per_task(R) == pytest.approx([0.4, 0.1])
    assert M.forgetting(R) == pytest.approx(0.25)


def test_forgetting_does_not_look_at_rows_before_the_task_was_learned():
    # An (invalid) nonzero entry above the diagonal must not count as "best accuracy".
    R2 = [[0.5, 0.99], [0.4, 0.6], [0.3, 0.5]]
    R2 = [row + [0.0] for row in R2]
    R2[2][2] = 0.7
    assert M.forgetting_per_task(R2) == pytest.approx([0.5 - 0.3, 0.6 - 0.5])


def test_forgetting_excludes_last_row_from_the_max():
    # If the last row were included in the max, a task that improves at the end would show 0, not negative.
    R3 = [[0.5, None], [0.8, 0.9]]
    assert M.forgetting(R3) == pytest.approx(0.5 - 0.8)


def test_bwt_is_against_the_diagonal():
    # (0.5 - 0.9) and (0.7 - 0.8)
    assert M.bwt(R) == pytest.approx((-0.4 - 0.1) / 2)


def test_bwt_differs_from_forgetting_when_accuracy_peaks_later():
    R4 = [[0.5, None, None], [0.9, 0.6, None], [0.7, 0.6, 0.8]]
    assert M.bwt(R4) == pytest.approx(((0.7 - 0.5) + (0.6 - 0.6)) / 2)
    assert M.forgetting(R4) == pytest.approx(((0.9 - 0.7) + 0.0) / 2)


def test_fwt_against_initial_accuracy():
    Rt = [[0.9, 0.55, 0.4], [0.8, 0.85, 0.6], [0.7, 0.8, 0.9]]
    b = [0.5, 0.5, 0.5]
    # (R01 - b1) + (R12 - b2) = 0.05 + 0.1
    assert M.fwt(Rt, b) == pytest.approx(0.075)
    assert M.fwt(R, b) is None  # R01 not evaluated
    assert M.fwt(Rt, None) is None


def test_single_experience_has_no_forgetting():
    assert M.forgetting([[0.7]]) is None
    assert M.bwt([[0.7]]) is None
    assert M.fwt([[0.7]], [0.1]) is None
    assert M.final_avg_acc([[0.7]]) == pytest.approx(0.7)


def test_anytime():
    assert M.avg_anytime_acc([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    assert M.avg_anytime_acc([]) is None


def test_summarize_and_json():
    s = M.summarize(R, N)
    assert set(s) >= {"final_avg_acc", "final_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt"}
    assert M.to_json_matrix([[nan, 0.5]]) == [[None, 0.5]]


def test_matrix_must_be_square():
    with pytest.raises(ValueError, match="square"):
        M.as_matrix([[0.1, 0.2]])
    with pytest.raises(ValueError, match="test-set sizes"):
        M.final_acc(R, [1, 2])
    assert math.isnan(M.as_matrix(R)[0, 1])


def test_a_row_the_strategy_cannot_score_is_a_miss_not_class_0():
    from cl.engine.evaluate import accuracy_on_classes, count_hits

    inf = float("inf")
    scores = torch.tensor([[-inf, -inf, -inf], [0.1, 0.5, -inf], [float("nan")] * 3, [inf, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    assert count_hits(scores, y) == 2  # rows 0 and 2 would have been "class 0" hits under a bare argmax

    class Blind:
        def predict(self, x, task_id):
            return torch.full((len(x), 3), -inf)

    x = torch.zeros(4, 2)
    assert accuracy_on_classes(Blind(), x, torch.tensor([0, 0, 1, 2]), torch.tensor([True, True, True]), 2) == 0.0


def test_old_and_new_accuracy_after_the_last_task_by_hand():
    R = [[0.9, None, None], [0.7, 0.8, None], [0.5, 0.6, 0.2]]
    old, new = M.final_old_new_acc(R, [10, 30, 20])
    assert old == pytest.approx((0.5 * 10 + 0.6 * 30) / 40) and new == pytest.approx(0.2)  # forgetting low, plasticity too
    assert M.final_old_new_acc([[0.4]], [5]) == (None, pytest.approx(0.4))
    s = M.summarize(R, [10, 30, 20])
    assert s["final_old_acc"] == pytest.approx(0.575) and s["final_new_acc"] == pytest.approx(0.2)
