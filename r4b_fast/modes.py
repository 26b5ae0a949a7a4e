"""Rollout modes, shared by the advantage, sampling and training code.

R-4B picks the mode by what follows the assistant turn: thinking ``<think>\\n``, non-thinking
``<think>\\n\\n</think>\\n\\n``, auto ``<think>`` (the model decides).
"""

from collections.abc import Sequence
from enum import IntEnum


class Mode(IntEnum):
    NO_THINK = 0
    THINK = 1
    AUTO = 2


NUM_MODES = len(Mode)


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share: where the thinking and non-thinking prefixes part is auto
    mode's think / no-think decision. Example: ``shared_prefix_length([5, 9], [5, 11, 6])`` -> 1."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k
