"""Rule-based rewards: answer extraction, numeric/exact comparison, failing reward functions."""

import math

import pytest
import torch

from r4b_fast import group_advantages
from r4b_fast.training.rewards import accuracy_reward, compute_rewards, extract_answer, format_reward


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
    ],
)
def test_accuracy_reward(completion, answer, reward):
    assert accuracy_reward(completion, answer) == reward


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
