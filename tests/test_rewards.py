"""Rule-based rewards: answer extraction, numeric/exact comparison, failing reward functions."""

import math

import pytest
import torch

from r4b_fast import group_advantages
from r4b_fast.modes import Mode
from r4b_fast.training.rewards import accuracy_reward, compute_rewards, extract_answer, format_reward
from r4b_fast.training.task import sample_items, target_text


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("<think>\n3+5=8, 8+7=15\n</think>\n\n15", "15"),
        ("<think>\n\n</think>\n\n15", "15"),
        ("15", "15"),
        ("<think>\n</think> x </think>\n\n 7 ", None),  # two closes: malformed
        ("<think>\n\n</think>\n\n<think>\n3+4=7\n</think>\n\n7", None),  # a second block after the forced one
        ("<think>\nsteps\n</think>\n\n", None),  # closed but no answer
        ("<think>\n3+5=8, 8+7=", None),  # never closed: no answer
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    "completion,answer,reward",
    [
        ("<think>\n\n</think>\n\n15", "15", 1.0),
        ("<think>\n\n</think>\n\n15.0", "15", 1.0),
        ("<think>\n\n</think>\n\n1,500", "1500", 1.0),
        ("<think>\n\n</think>\n\n16", "15", 0.0),
        ("<think>\n\n</think>\n\n3+5=8", "8", 0.0),  # not a single number: no credit for the working
        ("<think>\n15", "15", 0.0),  # unclosed think block: no answer
        ("<think>\n\n</think>\n\n Red ", "red", 1.0),
        ("<think>\n\n</think>\n\nredd", "red", 0.0),
        # integers compare exactly: no relative tolerance turns an off-by-one into a match (issue #12)
        ("<think>\n\n</think>\n\n1234568", "1234567", 0.0),
        ("<think>\n\n</think>\n\n1234567.0", "1234567", 1.0),
        ("<think>\n\n</think>\n\n1234567.000001", "1234567", 0.0),
        ("<think>\n\n</think>\n\n12345678901234567891", "12345678901234567890", 0.0),
        ("<think>\n\n</think>\n\n+15", "15", 1.0),
        ("<think>\n\n</think>\n\n1.5e1", "15", 1.0),
        # a non-integer reference keeps a relative tolerance of 1e-6
        ("<think>\n\n</think>\n\n0.3333333", "0.333333", 1.0),
        ("<think>\n\n</think>\n\n0.3334", "0.333333", 0.0),
        # a comma is a thousands separator only in well-formed groups; elsewhere it separates numbers (issue #12)
        ("<think>\n\n</think>\n\n1,2", "12", 0.0),
        ("<think>\n\n</think>\n\n12", "1,2", 0.0),
        ("<think>\n\n</think>\n\n12,34", "1234", 0.0),
        ("<think>\n\n</think>\n\n1234,567", "1234567", 0.0),
        ("<think>\n\n</think>\n\n1,234,567", "1234567", 1.0),
        ("<think>\n\n</think>\n\n15, 14", "15", 0.0),
    ],
)
def test_accuracy_reward(completion, answer, reward):
    assert accuracy_reward(completion, answer) == reward


def test_accuracy_reward_in_the_tasks_own_format():
    """The task's targets (its steps separate numbers with ", ") earn 1 against the item's answer in both modes; the
    same completion scored against an answer off by one, or by a digit moved (``"2,9"`` for 29), earns 0."""
    items = sample_items(40, seed=3)
    assert any(it.hard for it in items) and not all(it.hard for it in items)
    for item in items:
        for mode in (Mode.THINK, Mode.NO_THINK):
            completion = target_text(item, mode)
            assert accuracy_reward(completion, item.answer) == 1.0, completion
            assert accuracy_reward(completion, str(int(item.answer) + 1)) == 0.0, completion
        if len(item.answer) == 2:
            split = f"{item.answer[0]},{item.answer[1]}"
            assert accuracy_reward(target_text(item, Mode.NO_THINK).replace(item.answer, split), item.answer) == 0.0


def test_format_reward():
    assert format_reward("<think>\nx\n</think>\n\n4", "4") == 1.0
    assert format_reward("<think>\n\n</think>\n\n4", "4") == 1.0
    assert format_reward("4", "4") == 0.0
    assert format_reward("<think>\nx\n</think>\n\n", "4") == 0.0


def test_weighted_sum_of_reward_functions():
    report = compute_rewards(["<think>\n\n</think>\n\n4", "4"], ["4", "4"], [accuracy_reward, format_reward],
                             weights=[1.0, 0.5])
    assert report.rewards == [1.5, 1.0] and report.failures == []


def test_failing_reward_function_is_reported_with_its_row():
    def flaky(completion, answer):
        if completion == "boom":
            raise KeyError("no parser")
        return 1.0

    with pytest.raises(RuntimeError, match="reward for row 1 failed: KeyError"):
        compute_rewards(["ok", "boom"], ["1", "1"], flaky)
    report = compute_rewards(["ok", "boom", "ok", "ok"], ["1"] * 4, flaky, on_error="skip")
    assert report.failures[0][0] == 1 and math.isnan(report.rewards[1])
    # the skipped row is never trained on: its advantage is exactly 0 and it leaves the group statistics
    out = group_advantages(torch.tensor([1.0, report.rewards[1], 0.0, 1.0]), 4, nonfinite="zero")
    assert out.advantages[1] == 0 and int(out.group_count[0]) == 3


def test_non_finite_reward_counts_as_failure():
    with pytest.raises(RuntimeError, match="returned nan"):
        compute_rewards(["a"], ["a"], lambda c, a: float("nan"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="answers: 1 answers for 2 completions"):
        compute_rewards(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="weights: 1 weights for 2 reward functions"):
        compute_rewards(["a"], ["a"], [accuracy_reward, format_reward], weights=[1.0])
    with pytest.raises(ValueError, match="on_error"):
        compute_rewards(["a"], ["a"], on_error="ignore")
