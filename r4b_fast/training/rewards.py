"""Rule-based rewards for BPO (R-4B uses a rule-based accuracy reward), and a guard for user reward functions.

A reward function takes ``(completion: str, answer: str)`` and returns a float. The completion of a thinking
rollout looks like ``"<think>\\nsteps\\n</think>\\n\\nanswer"``; the answer is what follows the last ``</think>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from r4b_fast.training.task import THINK_CLOSE, THINK_OPEN

# A number as the task writes it (``str(int)``, e.g. "29"), or in the usual written forms: a decimal point, an exponent,
# and commas only as thousands separators in well-formed groups ("1,500"). Elsewhere a comma separates, as between
# the task's written steps ("15, 14"): "1,2" is two numbers, never 12.
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")

RewardFn = Callable[[str, str], float]


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the text after the last ``</think>``, stripped.

    Returns None for a thinking rollout that never closed its think block (it gave no answer), an empty answer, or a
    completion with more than one think block: a non-thinking rollout (whose empty block is forced) must not earn its
    reward by opening a second block and thinking after all.
    A completion without any think markup is taken whole.
    """
    if completion.count(THINK_OPEN) > 1 or completion.count(THINK_CLOSE) > 1:
        return None
    if THINK_CLOSE in completion:
        answer = completion.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in completion:
        return None  # opened a think block and never closed it: no answer
    else:
        answer = completion
    answer = answer.strip()
    return answer or None


def thought(completion: str) -> bool:
    """The completion wrote something inside its think block."""
    if THINK_OPEN not in completion:
        return False
    inside = completion.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0]
    return bool(inside.strip())


def _as_number(text: str) -> tuple[Decimal, bool] | None:
    """``(value, is_integer)`` of the one number in ``text`` (exact: a Decimal), or None for none or several."""
    found = _NUMBER.findall(text)
    if len(found) != 1:  # "12" -> 12; "3+5=8", "1,2" or "" -> not a single number
        return None
    literal = found[0].replace(",", "")
    value = Decimal(literal)
    return (value, bool(_INTEGER.fullmatch(literal))) if value.is_finite() else None


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the reference answer, else 0.0.

    Numbers compare by value: an integer reference exactly (``"15"`` == ``"15.0"`` == ``" 15 "`` == ``"+15"``, but
    ``"1234568"`` != ``"1234567"``), a non-integer reference within a relative tolerance of 1e-6. A comma is a
    thousands separator only in well-formed groups (``"1,500"`` == ``"1500"``; ``"1,2"`` is two numbers: 0).
    Anything else compares exactly after stripping whitespace and case-folding.
    """
    got = extract_answer(completion)
    if got is None:
        return 0.0
    want_num, got_num = _as_number(answer), _as_number(got)
    if want_num is not None:
        if got_num is None:
            return 0.0
        (want, want_int), (value, _) = want_num, got_num
        if want_int:  # counts and sums are exact: no tolerance may turn an off-by-one into a match
            return float(value == want)
        return float(math.isclose(float(value), float(want), rel_tol=1e-6, abs_tol=1e-9))
    return float(got.casefold() == answer.strip().casefold())


def format_reward(completion: str, answer: str) -> float:
    """1.0 if the completion is well-formed: a closed think block (possibly empty) followed by a non-empty answer."""
    del answer
    head, sep, tail = completion.partition(THINK_CLOSE)
    return float(bool(sep) and head.lstrip().startswith(THINK_OPEN) and bool(tail.strip()))


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


@dataclass
class RewardReport:
    """Rewards of a batch with the rows whose reward function failed (their reward is NaN)."""

    rewards: list[float]
    failures: list[tuple[int, str]] = field(default_factory=list)  # (row, error)


def compute_rewards(
    completions: Sequence[str],
    answers: Sequence[str],
    reward_fns: Sequence[RewardFn] | RewardFn = accuracy_reward,
    weights: Sequence[float] | None = None,
    *,
    on_error: str = "raise",
) -> RewardReport:
    """Weighted sum of reward functions per row.

    ``on_error="raise"`` re-raises a failing (or non-finite) reward with the row it failed on; ``"skip"`` records
    the failure and gives the row a NaN reward, which ``group_advantages(..., nonfinite="zero")`` then excludes, so
    the row is never trained on.
    """
    if len(completions) != len(answers):
        raise ValueError(f"answers: {len(answers)} answers for {len(completions)} completions")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    if not fns:
        raise ValueError("reward_fns: at least one reward function is needed")
    weights = [1.0] * len(fns) if weights is None else list(weights)
    if len(weights) != len(fns):
        raise ValueError(f"weights: {len(weights)} weights for {len(fns)} reward functions")
    report = RewardReport(rewards=[])
    for row, (completion, answer) in enumerate(zip(completions, answers)):
        total = 0.0
        try:
            for fn, w in zip(fns, weights):
                value = float(fn(completion, answer))
                if not math.isfinite(value):
                    raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {value}")
                total += w * value
        except Exception as err:  # a user's reward function may raise anything: report it with its row
            if on_error == "raise":
                raise RuntimeError(f"reward for row {row} failed: {err!r} (completion {completion[:80]!r})") from err
            report.failures.append((row, repr(err)))
            total = float("nan")
        report.rewards.append(total)
    return report
