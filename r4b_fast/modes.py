"""Rollout modes, shared by the advantage, sampling and training code.

R-4B picks the mode by what follows the assistant turn: thinking ``<think>\\n``, non-thinking
``<think>\\n\\n</think>\\n\\n``, auto ``<think>`` (the model decides).
"""

from enum import IntEnum


class Mode(IntEnum):
    NO_THINK = 0
    THINK = 1
    AUTO = 2


NUM_MODES = len(Mode)
