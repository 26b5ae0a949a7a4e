"""Rule-based rewards: answer extraction, numeric/exact comparison, math-verify, failing reward functions."""

import logging
import math
import subprocess
import sys
import threading

import pytest
import torch

from r4b_fast import group_advantages
from r4b_fast.modes import Mode
from r4b_fast.training import rewards
from r4b_fast.training.rewards import accuracy_reward, answer_matches, compute_rewards, extract_answer, format_reward
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
        # a non-integer reference compares exactly too (issue #22: no tolerance nobody asked for)
        ("<think>\n\n</think>\n\n0.3333333", "0.333333", 0.0),
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


# (gold, prediction, verdict with math-verify, verdict without it: the normalised rules alone)
CASES = [
    # issue #22"s five: the old rules judged each of them wrong
    ("Paris", "Paris.", 1, 1), ("1234", "1 234", 1, 1), ("1e309", "1e310", 0, 0), ("2.0", "2.0000001", 0, 0),
    ("2.5", "2\u066b5", 1, 1),
    # numbers in every form
    ("1234", "1,234", 1, 1), ("1234", "1\xa0234", 1, 1), ("1234", "1\u202f234", 1, 1), ("1234", "1\u2009234", 1, 1),
    ("1234567", "1 234 567", 1, 1), ("1234567", "1,234 567", 0, 0), ("1234", "12 34", 0, 0),
    ("1234", "1\\,234", 1, 1),
    ("1,234", "1234", 1, 1), ("1 234", "1234", 1, 1),
    ("15", "\u0661\u0665", 1, 1), ("15", "\u06f1\u06f5", 1, 1),
    ("0.5", "\u0660\u066b\u0665", 1, 1), ("1234", "\u0661\u066c\u0662\u0663\u0664", 1, 1),
    ("-3", "-3", 1, 1), ("-3", "3", 0, 0), ("-3", "\u22123", 1, 1), ("3", "-3", 0, 0), ("-0.5", "-\\frac{1}{2}", 1, 0),
    ("1e309", "1e309", 1, 1), ("1e309", "1E+309", 1, 1), ("2", "2.0000001", 0, 0), ("2", "2.0", 1, 1),
    ("15", "1.5e1", 1, 1),
    ("0.1", "0.10", 1, 1), ("0.1", "0.1000001", 0, 0),
    # LaTeX, fractions, boxed
    ("\\frac{1}{2}", "0.5", 1, 0), ("\\frac{1}{2}", "1/2", 1, 0), ("0.5", "\\frac{1}{2}", 1, 0),
    ("0.5", "1/2", 1, 0),
    ("\\frac{1}{2}", "\\frac{1}{3}", 0, 0), ("12", "1/2", 0, 0), ("1/2", "12", 0, 0), ("5", "\\boxed{5}", 1, 1),
    ("\\boxed{5}", "5", 1, 1), ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", 1, 0), ("5", "$5$", 1, 1),
    ("2", "\\sqrt{4}", 1, 0),
    ("25", "5^2", 1, 0), ("5", "\\frac{10}{2}", 1, 0), ("1", "\\frac{1000001}{1000000}", 0, 0),
    ("\\sqrt{2}", "\\sqrt{2}", 1, 1), ("\\sqrt{2}", "1.41421356", 1, 0), ("\\sqrt{2}", "2", 0, 0),
    ("2\\pi", "6.283185", 1, 0),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", 1, 0), ("x^2+2x+1", "(x+1)^2", 1, 0), ("x=5", "5", 1, 0),
    ("10^{6}", "1000000", 1, 0),
    # units and percentages
    ("5 cm", "5", 1, 1), ("5", "5 cm", 1, 1), ("5 cm", "6 cm", 0, 0), ("30\u00b0", "30", 1, 1),
    ("30", "30^\\circ", 1, 1),
    ("50%", "50", 1, 1), ("50%", "50\\%", 1, 1), ("50", "50%", 1, 1), ("12 m^2", "12", 1, 1),
    # intervals and sets
    ("[1,2]", "[1, 2]", 1, 0), ("(1,2)", "(1,2]", 0, 0), ("\\{1,2\\}", "\\{2,1\\}", 1, 0),
    ("\\{1,2\\}", "\\{1,3\\}", 0, 0),
    # multiple choice
    ("B", "B", 1, 1), ("B", "(B)", 1, 1), ("B", "B.", 1, 1), ("B", "Answer: B", 1, 1), ("B", "b", 1, 1),
    ("B", "(B) 5 cm", 1, 1),
    ("B", "\\boxed{B}", 1, 1), ("(B)", "B", 1, 1), ("B", "C", 0, 0), ("B", "(C)", 0, 0), ("B", "A or B", 0, 0),
    ("A", "a cat", 0, 0),
    ("B", "The answer is B.", 1, 1),
    # plain strings
    ("Paris", "Parish", 0, 0), ("Paris", "  paris ", 1, 1), ("Paris", "PARIS!", 1, 1),
    ("New York", "new   york", 1, 1),
    ("Paris", "Pairs", 0, 0), ("yes", "Yes.", 1, 1), ("yes", "no", 0, 0), ("red", "redd", 0, 0),
    ("\\text{Paris}", "Paris", 1, 1),
    # the embedded task"s rules, unchanged: one number, exact; the working or a moved digit earns nothing
    ("8", "3+5=8", 0, 0), ("15", "15, 14", 0, 0), ("12", "1,2", 0, 0), ("1234", "12,34", 0, 0),
    ("1234567", "1234568", 0, 0),
    ("15", "16", 0, 0), ("29", "29", 1, 1), ("29", "2,9", 0, 0),
]


@pytest.mark.parametrize("gold,prediction,verdict,_", CASES)
def test_answer_table(gold, prediction, verdict, _):
    assert accuracy_reward(f"<think>\n\n</think>\n\n{prediction}", gold) == verdict
    assert accuracy_reward(prediction, gold) == verdict


@pytest.mark.parametrize("gold,prediction,_,verdict", CASES)
def test_answer_table_without_math_verify(gold, prediction, _, verdict):
    assert answer_matches(prediction, gold, use_math_verify=False) == bool(verdict)


def test_the_table_is_large_and_mixed():
    assert len(CASES) >= 50
    assert sum(c[2] for c in CASES) > 20 and sum(1 - c[2] for c in CASES) > 20
    assert sum(c[2] != c[3] for c in CASES) >= 10  # cases only math-verify judges right


def test_tolerance_is_an_explicit_argument_for_non_integer_references_only():
    assert accuracy_reward("2.0000001", "2.0") == 0.0
    assert accuracy_reward("2.0000001", "2.0", rel_tol=1e-6) == 1.0
    assert accuracy_reward("2.1", "2.0", rel_tol=1e-6) == 0.0
    assert accuracy_reward("1234568", "1234567", rel_tol=1e-3) == 0.0  # integers stay exact
    assert accuracy_reward("1e999999999999999999", "2.5", rel_tol=0.5) == 0.0  # beyond float and Decimal ranges
    with pytest.raises(ValueError, match="rel_tol"):
        accuracy_reward("2", "2", rel_tol=-1.0)
    with pytest.raises(ValueError, match="rel_tol"):
        accuracy_reward("2", "2", rel_tol=float("nan"))


def test_overflowing_numbers_are_compared_exactly_never_as_inf():
    assert accuracy_reward("1e310", "1e309") == 0.0
    assert accuracy_reward("-1e309", "1e309") == 0.0
    assert accuracy_reward("1e999999999999999998", "1e999999999999999999") == 0.0
    assert accuracy_reward("10e308", "1e309") == 1.0  # the same number, written two ways
    assert accuracy_reward("\\frac{1}{2}", "1e999999999") == 0.0  # no sympy integer of a billion digits


def test_without_math_verify_one_warning_and_the_normalised_rules(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    monkeypatch.setattr(rewards, "_MISSING_WARNED", False)
    with pytest.warns(RuntimeWarning, match="math-verify is not installed.*falls back"):
        assert accuracy_reward("1/2", "\\frac{1}{2}") == 0.0
        assert accuracy_reward("(B)", "B") == 1.0 and accuracy_reward("1 234", "1234") == 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert accuracy_reward("Paris.", "Paris") == 1.0
    with pytest.raises(ImportError, match="use_math_verify=True"):
        accuracy_reward("1/2", "\\frac{1}{2}", use_math_verify=True)


def test_math_verify_is_not_imported_by_the_package():
    code = ("import sys, r4b_fast, r4b_fast.training.rewards as r; assert 'math_verify' not in sys.modules; "
            "assert r.accuracy_reward('15', '15') == 1.0; assert 'math_verify' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_math_verify_outside_the_main_thread():
    """math-verify's timeouts use SIGALRM (main thread only): elsewhere it runs without them instead of failing."""
    out = []
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    worker = threading.Thread(target=lambda: out.append(accuracy_reward("1/2", "\\frac{1}{2}")))
    worker.start()
    worker.join(timeout=120)
    assert out == [1.0]


def test_math_verify_timeout_bounds_a_pathological_answer():
    import time

    start = time.monotonic()
    assert accuracy_reward("\\frac{" * 300 + "1", "5") == 0.0
    assert accuracy_reward("x" * 5000 + "^2", "x^2") == 0.0  # too long to be an answer: not parsed
    assert time.monotonic() - start < 30


def test_a_comparison_past_the_timeout_is_a_wrong_answer_not_an_escape(monkeypatch):
    """math-verify's TimeoutException is a BaseException: it must never escape compute_rewards' ``except
    Exception`` and stop training."""
    import time

    import sympy

    monkeypatch.setattr(rewards, "_MV_TIMEOUT_S", 1)
    monkeypatch.setattr(sympy, "simplify", lambda *a, **k: time.sleep(60))
    start = time.monotonic()
    assert compute_rewards(["\\sqrt{4}"], ["2"]).rewards == [0.0]
    assert time.monotonic() - start < 30


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
        for mode in (Mode.THINK, Mode.NO_THINK):  # the judgement never needs math-verify: the same without it
            completion = target_text(item, mode)
            for answer in (item.answer, str(int(item.answer) + 1)):
                assert accuracy_reward(completion, answer) == accuracy_reward(completion, answer, use_math_verify=False)


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
