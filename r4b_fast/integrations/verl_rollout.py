"""Mode forcing on verl's rollout side: the agent loop ``"r4b_bpo_agent"`` and the dataset column that selects it.

Part of :mod:`r4b_fast.integrations.verl`, which registers :class:`BPOModeAgentLoop` with verl's agent-loop
registry (under that module's name) and explains why the mode is forced at rollout time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from r4b_fast.integrations.verl_common import AGENT_LOOP, MODE_FIELD, MODE_NAMES, modes_from_field
from r4b_fast.models.r4b import THINKING_MODE_OF, THINKING_MODE_PREFIX
from r4b_fast.modes import Mode


def bpo_mode_for_sample(priority: int, n: int) -> Mode:
    """The forced mode of one rollout: thinking for the first ``n / 2`` samples of its prompt, non-thinking after.

    verl (0.9.1) repeats each prompt ``n`` times interleaved (``repeat(n, interleave=True)``) and its agent-loop
    manager numbers the repeated batch ``priority = 0 .. len - 1`` before splitting it across workers, so sample
    ``priority`` is replica ``priority % n`` of its prompt, wherever it runs.

    Example:
        >>> [bpo_mode_for_sample(p, 4).name for p in range(4)]
        ['THINK', 'THINK', 'NO_THINK', 'NO_THINK']
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
        raise ValueError(f"actor_rollout_ref.rollout.n: BPO needs an even number of samples per prompt (g thinking "
                         f"+ g non-thinking), got {n!r}")
    return Mode.THINK if int(priority) % int(n) < int(n) // 2 else Mode.NO_THINK


class BPOModeAgentLoop(SingleTurnAgentLoop):
    """verl agent loop ``"r4b_bpo_agent"``: single-turn generation forced into thinking or non-thinking mode.

    The mode prefix (``MODE_PREFIX``: R-4B's ``<think>\\n`` / ``<think>\\n\\n</think>\\n\\n``) is appended to the prompt
    tokens after the chat template's generation prompt, so it is prompt, not response: the policy is trained on what
    it writes after the forced decision. Half of each prompt's ``rollout.n`` samples think
    (:func:`bpo_mode_for_sample`); a row may instead request a mode in its own ``bpo_mode`` column. Each output
    carries its mode in ``extra_fields["bpo_mode"]`` (the batch's ``bpo_mode`` column, for :func:`bpo_mode_metrics`).

    Use it for the training data only (the column ``agent_name = "r4b_bpo_agent"``, e.g. :func:`add_bpo_agent_column`),
    and leave validation on verl's ``single_turn_agent`` so that evaluation measures auto mode. Subclass and change
    ``MODE_PREFIX`` for another template (e.g. Qwen3's ``enable_thinking`` strings).

    Example:
        >>> # data.train_files=bpo_train.parquet (agent_name column) with
        >>> # VERL_USE_EXTERNAL_MODULES=r4b_fast.integrations.verl and actor_rollout_ref.rollout.n=8
    """

    MODE_PREFIX = {Mode.THINK: THINKING_MODE_PREFIX[THINKING_MODE_OF[Mode.THINK]],
                   Mode.NO_THINK: THINKING_MODE_PREFIX[THINKING_MODE_OF[Mode.NO_THINK]]}

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any):
        requested = kwargs.pop(MODE_FIELD, None)
        if requested is not None:
            mode = Mode(int(modes_from_field([requested])[0]))
            if mode not in self.MODE_PREFIX:
                raise ValueError(f"{MODE_FIELD}: {requested!r} is not a forced mode (think / no_think)")
        else:
            mode = bpo_mode_for_sample(priority, self.rollout_config.n)
        self._bpo_prefix_ids = list(self.tokenizer.encode(self.MODE_PREFIX[mode], add_special_tokens=False))
        output = await super().run(sampling_params, priority=priority, **kwargs)
        output.extra_fields[MODE_FIELD] = MODE_NAMES[mode]
        return output

    async def ct_build_initial_tokens(self, *args: Any, **kwargs: Any) -> list[int]:
        prompt_ids = list(await super().ct_build_initial_tokens(*args, **kwargs)) + self._bpo_prefix_ids
        if len(prompt_ids) > self.rollout_config.prompt_length:
            raise ValueError(
                f"actor_rollout_ref.rollout.prompt_length: the prompt with its {len(self._bpo_prefix_ids)}-token mode "
                f"prefix has {len(prompt_ids)} tokens, over prompt_length={self.rollout_config.prompt_length}; raise "
                "it by the prefix length (data.max_prompt_length stays as it is)"
            )
        return prompt_ids


def add_bpo_agent_column(frame: Any) -> Any:
    """A copy of a verl RL dataset frame (pandas, one row per prompt) whose rows run :class:`BPOModeAgentLoop`.

    Sets the ``agent_name`` column that verl's agent-loop manager reads per row to ``"r4b_bpo_agent"``; rows are
    not duplicated (see the module docstring).

    Example:
        >>> import pandas as pd
        >>> add_bpo_agent_column(pd.DataFrame({"prompt": ["a"]}))["agent_name"].tolist()
        ['r4b_bpo_agent']
    """
    if not hasattr(frame, "assign") or not hasattr(frame, "columns"):
        raise TypeError(f"frame: expected a pandas DataFrame, got {type(frame).__name__}")
    return frame.assign(agent_name=AGENT_LOOP)
