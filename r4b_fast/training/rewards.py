"""Rule-based rewards for BPO (R-4B uses a rule-based accuracy reward), and a guard for user reward functions.

A reward function takes ``(completion: str, answer: str)`` and returns a float. The completion of a thinking
rollout looks like ``"<think>\\nsteps\\n</think>\\n\\nanswer"``; the answer is what follows the last ``</think>``.

:func:`accuracy_reward` judges the answer in three ways, chosen by the reference answer:

- a plain number (``"29"``, ``"0.5"``, ``"1,234"``, ``"-3"``, ``"5 cm"``, ``"50%"``): our own exact rule, the embedded
  task's rule (its answers are integers): the prediction must hold exactly one number, compared by exact value;
- a multiple-choice letter (``"B"``, ``"(B)"``, ``"B."``): the prediction must name the same letter;
- anything else (LaTeX, fractions, intervals, sets, expressions, words): Hugging Face's ``math_verify`` (``parse`` /
  ``verify``, each under its own timeout) when installed, else (one warning) normalised text equality.

Every text is first normalised: Unicode digits (Arabic-Indic ``"٣"``, fullwidth ...) read as ASCII digits, the Arabic
decimal separator ``"٫"`` as ``"."`` and its thousands separator ``"٬"`` as ``","``, the minus sign ``"−"`` as ``"-"``,
no-break and thin spaces as spaces, and simple wrappers (``\\boxed{}``, ``\\text{}``, ``$...$``) removed.
``math_verify`` is imported on first use only: ``import r4b_fast`` never needs it.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MIN_EMIN, Decimal, localcontext

from r4b_fast.training.task import THINK_CLOSE, THINK_OPEN

# A number as the task writes it (``str(int)``, e.g. "29"), or in the usual written forms: a decimal point, an
# exponent, and thousands separators only in well-formed groups: commas ("1,500") or single spaces ("1 500", the
# leading group not 0). Elsewhere a comma separates, as between the task's written steps ("15, 14"): "1,2" is two
# numbers, never 12. ASCII only: other digits are translated first (``_normalise``).
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|[1-9]\d{0,2}(?: \d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?",
                     re.ASCII)  # fmt: skip
_INTEGER = re.compile(r"[-+]?\d+", re.ASCII)
# A reference that is one number, optionally with a unit ("5 cm", "30°", "50%", "12 m^2").
_UNIT = r"(?:%|°|\^\{?\\circ\}?|[a-zA-Z]{1,12}(?: [a-zA-Z]{1,12})?(?:\^\{?[23]\}?|[²³])?)"
_PLAIN_NUMBER = re.compile(rf"\s*(?P<number>{_NUMBER.pattern})\s*{_UNIT}?\s*\.?\s*", re.ASCII)
# A multiple-choice reference: "B", "(B)", "B.", "B)", "[B]", "Answer: B", "(b)".
_PREFIX = r"(?:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:：]?\s*)?"
_CHOICE_GOLD = re.compile(rf"{_PREFIX}(?:(?P<bare>[A-Z])|\((?P<paren>[A-Za-z])\)|\[(?P<bracket>[A-Za-z])\])"
                          r"\s*[.:)]?", re.IGNORECASE | re.ASCII)  # fmt: skip
# The prediction names a letter alone ("b", "(B)", "Answer: B") or before its option's text ("(B) 5 cm", "B. 5 cm";
# a bare letter needs its "." / ":" / ")" before the text: "a cat" names no option).
_CHOICE_PRED = re.compile(rf"{_PREFIX}(?:\((?P<paren>[A-Za-z])\)|\[(?P<bracket>[A-Za-z])\]|"
                          r"(?P<bare>[A-Za-z])(?=[.:)]|$))(?:[.:)]?(?:\s+.*)?)?",
                          re.IGNORECASE | re.ASCII | re.DOTALL)  # fmt: skip
# Characters of mathematical markup that the embedded task never writes: a prediction holding one of them goes to
# math_verify (``\frac{1}{2}``, ``5^2``, ``1/2``), one without them is read by the task's own number rule.
_MARKUP = re.compile(r"[\\^/{}]")
_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|fbox)\s*\{([^{}]*)\}")
_SPACES = {"\u00a0": " ", "\u2007": " ", "\u2009": " ", "\u202f": " ", "\u2002": " ", "\u2003": " "}
_CHARS = {"\u066b": ".", "\u066c": ",", "\u2212": "-", "\uff0e": ".", "\\%": "%", "\\,": " ", "\\!": "", "\\;": " ",
          "\\ ": " "} | _SPACES  # fmt: skip
_SURROUNDING = " \t\n.,;:!?\"'`*"
_MV_MAX_EXPONENT = 400  # a plain-number reference beyond 10**±400 is compared by our exact rule only
_MV_MAX_CHARS = 2000  # a longer "answer" is not parsed by math_verify (each parse may take its whole timeout)
_MV_TIMEOUT_S = 5  # math_verify's own per-call timeouts (seconds, SIGALRM: the main thread only)

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


def _normalise(text: str) -> str:
    """Unicode digits -> ASCII, Arabic separators, minus sign, odd spaces, simple wrappers: see the module doc."""
    out = []
    for ch in text:
        digit = unicodedata.decimal(ch, None) if not ch.isascii() else None
        out.append(str(digit) if digit is not None else ch)
    text = "".join(out)
    for old, new in _CHARS.items():
        text = text.replace(old, new)
    text = text.strip()
    for _ in range(3):  # nested wrappers: \boxed{\text{B}}
        text = _WRAPPERS.sub(r"\1", text).strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            text = text[len(left):-len(right)].strip()
    return text


def _as_number(text: str) -> tuple[Decimal, bool] | None:
    """``(value, is_integer)`` of the one number in ``text`` (exact: a Decimal), or None for none or several."""
    found = _NUMBER.findall(text)
    if len(found) != 1:  # "12" -> 12; "3+5=8", "1,2" or "" -> not a single number
        return None
    literal = found[0].replace(",", "").replace(" ", "")
    value = Decimal(literal)
    return (value, bool(_INTEGER.fullmatch(literal))) if value.is_finite() else None


def _plain_number(text: str) -> tuple[Decimal, bool] | None:
    """The reference ``text`` is one number (with an optional unit): ``(value, is_integer)``, else None."""
    match = _PLAIN_NUMBER.fullmatch(text)
    return _as_number(match.group("number")) if match else None


def _choice(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.fullmatch(text.strip())
    if match is None:
        return None
    return next(g for g in match.group("bare", "paren", "bracket") if g).upper()


def _plain_text(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation and an "answer:" prefix removed."""
    text = " ".join(text.casefold().split()).strip(_SURROUNDING)
    text = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", text)
    return text.strip(_SURROUNDING)


def _numbers_equal(value: Decimal, want: Decimal, want_int: bool, rel_tol: float) -> bool:
    """Exact (Decimal: ``1e309`` != ``1e310``, never both inf); ``rel_tol`` widens non-integer references only."""
    if value == want:
        return True
    if want_int or rel_tol <= 0:
        return False
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 60, MAX_EMAX, MIN_EMIN
        try:
            return abs(value - want) <= Decimal(repr(rel_tol)) * max(abs(value), abs(want))
        except ArithmeticError:  # beyond even Decimal's range ("1e999999999999999999" - 2.5): not close
            return False


_MISSING_WARNED = False


def _math_verify():
    """``math_verify`` when importable, else None with a one-time warning (the normalised rules judge alone)."""
    global _MISSING_WARNED
    try:
        import math_verify
    except ImportError:
        if not _MISSING_WARNED:
            _MISSING_WARNED = True
            warnings.warn("math-verify is not installed (pip install 'math-verify>=0.9'): accuracy_reward falls back "
                          "to normalised text and number rules; LaTeX, fractions, expressions, intervals and sets are "
                          "compared as text", RuntimeWarning, stacklevel=3)  # fmt: skip
        return None
    return math_verify


def _mv_parse(mv, text: str, timeout) -> list:
    """math_verify's parse of ``text``: a bare answer (``"2\\pi"``, ``"[1, 2]"``) is read as LaTeX inside ``$...$``
    (bare, math_verify finds ``2`` and ``2`` in them), a text with its own math delimiters as it is."""
    if len(text) > _MV_MAX_CHARS:
        return []
    if "$" in text or "\\(" in text or "\\[" in text:
        return mv.parse(text, parsing_timeout=timeout)
    parsed = mv.parse(f"${text}$", parsing_timeout=timeout)
    return parsed if any(not isinstance(p, str) for p in parsed) else mv.parse(text, parsing_timeout=timeout)


def _mv_timeout():
    # math_verify times out with SIGALRM, which only the main thread may set: elsewhere it runs without its timeouts
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _mv_number_equal(mv, got: str, want: Decimal, want_int: bool) -> bool | None:
    """A prediction in markup (``\\frac{1}{2}``, ``\\sqrt{4}``, ``5^2``) against a plain-number reference: an
    integer reference needs an expression that simplifies to exactly that integer, a non-integer one math_verify's
    comparison. None when math_verify finds no expression in it."""
    import sympy

    timeout = _mv_timeout()
    exprs = [p for p in _mv_parse(mv, got, timeout) if isinstance(p, sympy.Basic)]
    if not exprs or abs(want.adjusted()) > _MV_MAX_EXPONENT:
        return None  # no expression, or a reference too large for an exact sympy number ("1e999999999")
    gold = sympy.Rational(str(want))
    if not want_int:
        return mv.verify([gold], exprs, timeout_seconds=timeout)

    def exact(expr) -> bool:
        return bool(expr.is_number) and sympy.simplify(expr - gold) == 0

    from math_verify.errors import TimeoutException  # a BaseException: `except Exception` would let it through
    from math_verify.utils import timeout as with_timeout

    try:
        return any(with_timeout(timeout)(exact)(e) for e in exprs)
    except (Exception, TimeoutException):  # sympy failing or taking longer than the timeout: not a match
        return False


def answer_matches(got: str, answer: str, *, rel_tol: float = 0.0, use_math_verify: bool | None = None) -> bool:
    """Whether the prediction ``got`` (an extracted answer) gives the reference ``answer``: see
    :func:`accuracy_reward`. Example: ``answer_matches("\\\\frac{1}{2}", "0.5")`` is True with math-verify."""
    if not (isinstance(rel_tol, (int, float)) and 0 <= rel_tol < 1):
        raise ValueError(f"rel_tol: expected a number in [0, 1), got {rel_tol!r}")
    got, want_text = _normalise(got), _normalise(answer)
    if not got or not want_text:
        return False
    if use_math_verify and _math_verify() is None:
        raise ImportError("use_math_verify=True: math-verify is not installed (pip install 'math-verify>=0.9')")

    def math_verify():  # imported (or warned about) only when a text needs it: the task's integers never do
        return None if use_math_verify is False else _math_verify()

    want_num = _plain_number(want_text)
    if want_num is not None:
        want, want_int = want_num
        got_num = _plain_number(got)  # "5", "5 cm", "30^\\circ", "50%"
        if got_num is None and _MARKUP.search(got) and (mv := math_verify()) is not None:
            verdict = _mv_number_equal(mv, got, want, want_int)  # "\\sqrt{4}": not its one number 4
            if verdict is not None:
                return verdict
        got_num = got_num or _as_number(got)  # one number in a sentence: "15 apples", "The answer is 15."
        return got_num is not None and _numbers_equal(got_num[0], want, want_int, rel_tol)
    want_choice = _choice(_CHOICE_GOLD, want_text)
    if want_choice is not None:
        return _choice(_CHOICE_PRED, got) == want_choice
    if _plain_text(got) == _plain_text(want_text):
        return True
    if not (_MARKUP.search(want_text) or re.search(r"\d", want_text)):
        return False  # the reference is words: equal text only ("Paris" vs "Pairs" is no product of symbols)
    if (mv := math_verify()) is None:
        return False
    timeout = _mv_timeout()
    gold = _mv_parse(mv, want_text, timeout)
    if not any(not isinstance(g, str) for g in gold):
        return False
    return mv.verify(gold, _mv_parse(mv, got, timeout), timeout_seconds=timeout)


def accuracy_reward(completion: str, answer: str, *, rel_tol: float = 0.0, use_math_verify: bool | None = None
                    ) -> float:  # fmt: skip
    """1.0 if the extracted answer (:func:`extract_answer`) gives the reference answer, else 0.0.

    - A reference that is one number (``"15"``, ``"-3"``, ``"0.5"``, ``"1,234"``, ``"5 cm"``, ``"50%"``): the
      prediction must hold exactly one number (``"15"``, ``"15.0"``, ``"+15"``, ``"1.5e1"``, ``"15 apples"``,
      ``"1 234"``, ``"١٥"``; ``"3+5=8"`` or ``"15, 14"`` hold several: 0), equal by exact value: ``"1234568"`` !=
      ``"1234567"``, ``"1e309"`` != ``"1e310"``. ``rel_tol`` (default 0: exact) widens non-integer references only:
      integers are counts and sums, no tolerance may turn an off-by-one into a match. A comma or a space is a
      thousands separator only in well-formed groups (``"1,500"`` == ``"1 500"`` == ``"1500"``; ``"1,2"`` is two
      numbers). A prediction in markup (``"\\frac{1}{2}"``, ``"\\sqrt{4}"``) is parsed by math-verify.
    - A multiple-choice letter (``"B"``, ``"(B)"``, ``"B."``): ``"B"``, ``"b"``, ``"(B)"``, ``"B."``, ``"Answer: B"``
      or ``"(B) 5 cm"``.
    - Anything else: equal after case-folding, collapsing whitespace and removing surrounding punctuation
      (``"Paris."`` == ``"paris"``), or equal by math-verify (``"\\frac{1}{2}"`` == ``"1/2"``, ``"[1,2]"`` ==
      ``"[1, 2]"``, ``"\\{1,2\\}"`` == ``"\\{2,1\\}"``, ``"x^2+2x+1"`` == ``"(x+1)^2"``), each parse and comparison
      under math-verify's timeout (main thread; other threads run without it).

    ``use_math_verify``: None uses it when installed (else one warning, and the rules above without it), False never,
    True requires it. Example: ``accuracy_reward("<think>\\n\\n</think>\\n\\n1/2", "\\\\frac{1}{2}")`` is 1.0.
    """
    got = extract_answer(completion)
    if got is None:
        return 0.0
    return float(answer_matches(got, answer, rel_tol=rel_tol, use_math_verify=use_math_verify))


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
