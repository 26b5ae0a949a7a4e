"""What every implementation of :func:`~r4b_fast.ops.group_advantages.group_advantages` shares: the option values,
the layout of the per-group ``stats`` (``STATS_COLUMNS``), the compute dtype, the result type and the batch std."""

from __future__ import annotations

from typing import NamedTuple

import torch

from r4b_fast.modes import Mode

ESTIMATORS = ("grpo", "bpo", "drgrpo", "rloo")
SCALES = ("group", "batch", "none")
NONFINITE = ("raise", "zero")
SINGLETONS = ("zero", "verl")
STATS_COLUMNS = ("count", "mean", "std", "zero_signal") + tuple(f"count_{m.name.lower()}" for m in Mode) + tuple(
    f"sum_{m.name.lower()}" for m in Mode
)
NUM_STATS = len(STATS_COLUMNS)
OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}


class GroupAdvantages(NamedTuple):
    """Result of :func:`group_advantages`. ``G`` is the number of groups, ``M = 3`` the modes (``r4b_fast.Mode``).

    advantages:        [N] float32 (float64 for float64 rewards); 0 for zero-signal groups and excluded rewards.
    group_mean:        [G] mean reward of each group's (finite) rewards.
    group_std:         [G] standard deviation (biased or unbiased as asked); 0 for groups of fewer than 2.
    group_count:       [G] int64, rewards that entered each group's statistics.
    zero_signal_groups: 0-dim int64, groups whose rewards are all equal (or that hold fewer than 2): no signal.
    mode_count:        [G, M] int64 rollouts per group per mode, or None when ``modes`` was not given.
    mode_mean:         [G, M] mean reward per group per mode, NaN where the group has no rollout of that mode.
    mode_mean_overall: [M] mean reward per mode over the batch, NaN where no rollout has that mode.
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    group_count: torch.Tensor
    zero_signal_groups: torch.Tensor
    mode_count: torch.Tensor | None
    mode_mean: torch.Tensor | None
    mode_mean_overall: torch.Tensor | None


# All backends accumulate in float64: the op is memory-bound and tiny next to a training step, and float64 keeps
# rewards like 1e6 + noise (or 1e6 identical rewards summed) from cancelling. Results come back in float32.
COMPUTE_DTYPE = torch.float64


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_scale(estimator: str, scale: str | None) -> str:
    if scale is None:
        return "none" if estimator in ("drgrpo", "rloo") else "group"
    return scale


def batch_std(rewards: torch.Tensor, valid: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Two-pass std over the valid entries of ``rewards`` as a 1-element tensor (no host sync)."""
    w = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, 0)
    n = w.sum()
    mean = r.sum() / n.clamp_min(1)
    m2 = (torch.where(valid, r - mean, 0) ** 2).sum()
    denom = (n - 1) if unbiased else n
    return torch.where(n > 1, (m2 / denom.clamp_min(1)).sqrt(), 0).reshape(1)

