"""The ``r4b_fast::group_advantages`` ``torch.library`` op: the value checks (inside the op, so they also run under
``torch.compile``: one host sync for all of them) and the dispatch to a backend; registered fake."""

from __future__ import annotations

import torch

from r4b_fast.modes import NUM_MODES, Mode
from r4b_fast.ops.group_advantages.common import COMPUTE_DTYPE, NUM_STATS, _output_dtype
from r4b_fast.ops.group_advantages.kernel_backends import _group_advantages_kernel_backend
from r4b_fast.ops.group_advantages.torch_backend import _group_advantages_torch


def _check_values(rewards, group_index, modes, num_groups, group_size, estimator, nonfinite) -> int:
    """Raise ValueError for bad values; return the largest group size (needed by the kernels)."""
    checks = {}  # name -> 0-dim integer tensor; read back in one host sync
    if nonfinite == "raise":
        checks["nonfinite"] = (~torch.isfinite(rewards)).sum()
    if group_index is not None:
        checks["gmin"], checks["gmax"] = group_index.min(), group_index.max()
        checks["max_len"] = torch.bincount(group_index.clamp(0, num_groups - 1), minlength=num_groups).max()
    if modes is not None:
        checks["bad_modes"] = ((modes < 0) | (modes >= NUM_MODES)).sum()
    if estimator == "bpo":
        if group_index is None:
            m = modes.view(num_groups, group_size)
            lacking = ~((m == Mode.THINK).any(1) & (m == Mode.NO_THINK).any(1))
        else:
            slot = group_index.clamp(0, num_groups - 1) * NUM_MODES + modes.clamp(0, NUM_MODES - 1)
            per_mode = torch.bincount(slot, minlength=num_groups * NUM_MODES).view(num_groups, NUM_MODES)
            lacking = (per_mode.sum(1) > 0) & ((per_mode[:, Mode.THINK] == 0) | (per_mode[:, Mode.NO_THINK] == 0))
        checks["lacking"] = lacking.sum()
        checks["first_lacking"] = lacking.to(torch.int8).argmax()  # argmax returns the first maximum
    values = dict(zip(checks, torch.stack(list(checks.values())).tolist())) if checks else {}  # the one sync
    n_nonfinite = values.get("nonfinite", 0)
    gmin, gmax = values.get("gmin", 0), values.get("gmax", 0)
    n_bad_modes = values.get("bad_modes", 0)
    max_len = values.get("max_len", group_size)
    if n_nonfinite:
        first = int(torch.nonzero(~torch.isfinite(rewards))[0, 0])
        raise ValueError(
            f"rewards: {n_nonfinite} non-finite value(s), first at index {first} ({rewards[first].item()}); "
            "fix the reward function or pass nonfinite='zero' to exclude them (their advantage is then 0)"
        )
    if group_index is not None and (gmin < 0 or gmax >= num_groups):
        raise ValueError(f"group_index: values must lie in [0, num_groups={num_groups}), got min {gmin}, max {gmax}")
    if n_bad_modes:
        raise ValueError(
            f"modes: {n_bad_modes} value(s) outside the known modes "
            f"{ {m.name: int(m) for m in Mode} }; classify rollouts as one of these"
        )
    if values.get("lacking"):
        raise ValueError(
            f"modes: estimator='bpo' normalises over a mixed group of thinking and non-thinking rollouts, but "
            f"{values['lacking']} group(s) lack one of the two modes (first: group {values['first_lacking']}); "
            "use estimator='grpo' for single-mode groups"
        )
    return max_len



@torch.library.custom_op("r4b_fast::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: torch.Tensor,
    group_index: torch.Tensor | None,
    modes: torch.Tensor | None,
    num_groups: int,
    group_size: int,
    estimator: str,
    scale: str,
    unbiased: bool,
    eps: float,
    nonfinite: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    max_len = _check_values(rewards, group_index, modes, num_groups, group_size, estimator, nonfinite)
    if backend == "torch":
        return _group_advantages_torch(
            rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps
        )
    return _group_advantages_kernel_backend(
        backend, rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps, max_len
    )


@_group_advantages_op.register_fake
def _(rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps, nonfinite, backend):
    out = rewards.new_empty(rewards.shape, dtype=_output_dtype(rewards.dtype))
    return out, rewards.new_empty((num_groups, NUM_STATS), dtype=COMPUTE_DTYPE)
