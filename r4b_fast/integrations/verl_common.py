"""What the verl modules share: the names BPO registers with verl, the ``bpo_mode`` column, reading verl's configs.

Part of :mod:`r4b_fast.integrations.verl` (import that module: it registers the names); needs no verl itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from r4b_fast.modes import Mode

ADV_ESTIMATOR = "bpo"
POLICY_LOSS = "r4b_bpo"
AGENT_LOOP = "r4b_bpo_agent"
MODE_FIELD = "bpo_mode"  # non-tensor column: the rollout's forced mode ("think" / "no_think"), or a row's request
MODE_NAMES = {Mode.THINK: "think", Mode.NO_THINK: "no_think", Mode.AUTO: "auto"}
_MODE_OF_NAME = {name: mode for mode, name in MODE_NAMES.items()}


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's dataclass configs, DictConfigs and plain dicts alike (None when absent)."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # a dataclass whose .get is not a mapping's
            pass
    return getattr(config, key, default)


def modes_from_field(values: Any) -> torch.Tensor:
    """A ``bpo_mode`` column (``"think"`` / ``"no_think"`` / ``"auto"``, or ``r4b_fast.Mode`` ints) as ``[N]`` int64.

    Example:
        >>> modes_from_field(np.array(["think", "no_think"], dtype=object)).tolist()
        [1, 0]
    """
    out = []
    for i, v in enumerate(np.asarray(values, dtype=object).reshape(-1).tolist()):
        if isinstance(v, str) and v in _MODE_OF_NAME:
            out.append(int(_MODE_OF_NAME[v]))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) in set(Mode):
            out.append(int(v))
        else:
            raise ValueError(f"{MODE_FIELD}: row {i} holds {v!r}; expected one of {sorted(_MODE_OF_NAME)} or a "
                             "r4b_fast.Mode value")
    return torch.tensor(out, dtype=torch.int64)
