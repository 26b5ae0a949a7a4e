"""The public :func:`group_advantages`: argument validation, backend choice, the op call, then verl's singleton
convention and the unpacking of the per-group stats into :class:`GroupAdvantages`."""

from __future__ import annotations

import math

import torch

from r4b_fast.backends import resolve_backend
from r4b_fast.modes import NUM_MODES
from r4b_fast.ops.group_advantages.common import (
    COMPUTE_DTYPE,
    ESTIMATORS,
    NONFINITE,
    OP_BACKENDS,
    PREFERRED,
    SCALES,
    SINGLETONS,
    GroupAdvantages,
    _effective_scale,
    batch_std,
)
from r4b_fast.ops.group_advantages.op import _group_advantages_op


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_index: torch.Tensor | None = None,
    num_groups: int | None = None,
    modes: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str | None = None,
    unbiased: bool = True,
    eps: float = 1e-6,
    nonfinite: str = "raise",
    singleton: str = "zero",
    backend: str | None = None,
) -> GroupAdvantages:
    """Per-rollout advantages from scalar rewards, normalised within groups of rollouts of the same prompt.

    Args:
        rewards: ``[N]`` float32/float64/bfloat16/float16, one scalar reward per rollout (not differentiated).
        group_size: rollouts per group when groups are contiguous runs of equal size (``N % group_size == 0``).
        group_index: ``[N]`` integer group id per rollout in ``[0, num_groups)``, for ragged or interleaved groups
            (instead of group_size). Ids are row indices of the per-group outputs: sparse ids (e.g. dataset prompt
            ids) must be relabelled to ``0..G-1`` first (``torch.unique(group_index, return_inverse=True)[1]``).
        num_groups: number of groups with ``group_index``, at most ``N`` (default ``group_index.max() + 1``, one
            host sync; pass it under ``torch.compile``).
        modes: ``[N]`` integer ``r4b_fast.Mode`` per rollout (0 no-think, 1 think, 2 auto); enables per-mode stats.
        estimator: ``"grpo"`` ``(r - mean_g) / (std_g + eps)``; ``"bpo"`` the same over R-4B's mixed group of
            thinking and non-thinking rollouts (every group must hold both); ``"drgrpo"`` ``r - mean_g`` (no std);
            ``"rloo"`` ``r - mean of the other rollouts of the group``.
        scale: ``"group"`` (divide by the group's std), ``"batch"`` (by the std of all rewards, TRL's
            ``scale_rewards="batch"``), ``"none"``. Default: ``"group"`` for grpo/bpo, ``"none"`` for drgrpo/rloo.
        unbiased: std with Bessel's correction (``N-1``, as ``torch.std`` in TRL and verl) or without.
        eps: added to the std before dividing. ``1e-6`` (the default) is verl's (``compute_grpo_outcome_advantage``'s
            ``epsilon``); TRL 1.16's ``GRPOTrainer`` divides by ``std + 1e-4``: pass ``eps=1e-4`` to get its numbers.
        nonfinite: ``"raise"`` on NaN/inf rewards, or ``"zero"``: exclude them from the statistics, advantage 0.
        singleton: a group holding one (finite) reward: ``"zero"`` gives it advantage 0 (it has no baseline);
            ``"verl"`` takes verl's convention, mean 0 and std 1: advantage ``r / (1 + eps)`` with ``scale="group"``,
            ``r / (batch std + eps)`` with ``"batch"``, ``r`` with ``"none"`` (verl's Dr.GRPO and RLOO). Such groups
            then no longer count in ``zero_signal_groups``; ``group_mean`` / ``group_std`` still describe the data
            (``r``, 0). TRL never forms one (``num_generations >= 2``).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$R4B_FAST_BACKEND`` or the best for the device.

    Returns:
        :class:`GroupAdvantages`. A group whose rewards are all equal, or that has fewer than two finite rewards,
        gives advantage exactly 0 (never NaN) and counts in ``zero_signal_groups`` (except singletons under
        ``singleton="verl"``). Variance is two-pass. verl and TRL compute ``r - mean`` in float32: for an all-equal
        group of non-representable rewards (three 0.1s) they give ``rounding / eps``, up to ~1e-2, where this
        gives 0.

    Example:
        >>> import torch, r4b_fast
        >>> rewards = torch.tensor([1.0, 0.0, 1.0, 1.0,   0.0, 0.0, 0.0, 0.0])
        >>> modes = torch.tensor([1, 1, 0, 0,   1, 1, 0, 0])  # per prompt: 2 thinking + 2 non-thinking
        >>> out = r4b_fast.group_advantages(rewards, group_size=4, modes=modes, estimator="bpo")
        >>> out.advantages
        tensor([ 0.5000, -1.5000,  0.5000,  0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
        >>> int(out.zero_signal_groups)
        1
    """
    _check_rewards(rewards)
    n = rewards.numel()
    _check_options(estimator, scale, nonfinite, singleton, eps)
    group_index, num_groups = _resolve_groups(group_size, group_index, num_groups, n, rewards.device)
    if modes is not None:
        modes = _check_index_tensor("modes", modes, n, rewards.device)
    elif estimator == "bpo":
        raise ValueError("modes: estimator='bpo' needs the mode (0 no-think / 1 think) of every rollout")
    scale = _effective_scale(estimator, scale)
    chosen = resolve_backend(backend, rewards.device, OP_BACKENDS, PREFERRED, "group_advantages")
    adv, stats = _group_advantages_op(
        rewards.detach(), group_index, modes, num_groups, group_size or 0, estimator, scale, unbiased, float(eps),
        nonfinite, chosen,
    )  # fmt: skip
    if singleton == "verl":
        adv, stats = _verl_singletons(rewards, adv, stats, group_index, group_size, scale, unbiased, float(eps))
    return _unpack_stats(adv, stats, modes is not None)


# ----------------------------------------------------------------------------------------------------------------
# Validation of the arguments (no host sync, except num_groups' default with group_index)
# ----------------------------------------------------------------------------------------------------------------
def _check_rewards(rewards) -> None:
    """``rewards``: a non-empty 1-D floating-point tensor."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards: expected a floating-point tensor, got dtype {rewards.dtype}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError("rewards: empty (N = 0); there is nothing to normalise")


def _check_options(estimator, scale, nonfinite, singleton, eps) -> None:
    """The string options and ``eps``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES} or None, got {scale!r}")
    if estimator == "drgrpo" and scale not in (None, "none"):
        raise ValueError(f"scale: estimator='drgrpo' means no std scaling, got scale={scale!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {NONFINITE}, got {nonfinite!r}")
    if singleton not in SINGLETONS:
        raise ValueError(f"singleton: expected one of {SINGLETONS} (verl: mean 0, std 1), got {singleton!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


def _resolve_groups(group_size, group_index, num_groups, n: int, device) -> tuple[torch.Tensor | None, int]:
    """Exactly one of ``group_size`` / ``group_index``: ``(group_index as int64 or None, num_groups)``."""
    if (group_size is None) == (group_index is None):
        raise ValueError(
            "group_size / group_index: give exactly one (fixed-size contiguous groups, or a group id per rollout)"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size: N = {n} rollouts do not divide into groups of {group_size}")
        if num_groups is not None and num_groups != n // group_size:
            raise ValueError(f"num_groups: {num_groups} contradicts N / group_size = {n // group_size}")
        return None, n // group_size
    group_index = _check_index_tensor("group_index", group_index, n, device)
    # Ids index the per-group buffers and outputs: sparse ids (prompt ids up to 1e8, say) would size them by the
    # largest id (20 GB for 8 rollouts), so the number of groups is bounded by the number of rollouts.
    relabel = "relabel the ids to 0..G-1 first, e.g. torch.unique(group_index, return_inverse=True)[1]"
    if num_groups is None:
        gmax = int(group_index.max())
        if gmax >= n:
            raise ValueError(
                f"group_index: largest id {gmax} for N = {n} rollouts; the per-group outputs have one row per id "
                f"up to the largest (num_groups = max + 1), so at most N groups are accepted: {relabel}"
            )
        num_groups = gmax + 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    if num_groups > n:
        raise ValueError(
            f"num_groups: {num_groups} groups for N = {n} rollouts (at least {num_groups - n} empty); every "
            f"per-group buffer has num_groups rows, so at most N groups are accepted: {relabel}"
        )
    return group_index, num_groups


def _check_index_tensor(name: str, t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match rewards, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but rewards are on {device}")
    return t.to(torch.int64)


def _verl_singletons(rewards, adv, stats, group_index, group_size, scale, unbiased, eps):
    """verl's singleton convention after any backend: rows alone in their group get ``(r - 0) / (1 + eps)`` (or the
    batch std, or no scale); their groups leave the zero-signal count. Vectorised, no host sync."""
    r = rewards.detach().to(COMPUTE_DTYPE)
    valid = torch.isfinite(r)
    gid = group_index if group_index is not None else torch.arange(r.numel(), device=r.device) // group_size
    single_group = stats[:, 0] == 1
    single_row = single_group[gid] & valid
    if scale == "group":
        scaled = r / (1 + eps)
    elif scale == "batch":
        scaled = r / (batch_std(r, valid, unbiased) + eps)
    else:
        scaled = r
    adv = torch.where(single_row, scaled.to(adv.dtype), adv)
    stats = stats.clone()
    stats[:, 3] = torch.where(single_group, 0.0, stats[:, 3])
    return adv, stats


def _unpack_stats(adv: torch.Tensor, stats: torch.Tensor, with_modes: bool) -> GroupAdvantages:
    count = stats[:, 0].round().to(torch.int64)
    zero_signal = stats[:, 3].sum().round().to(torch.int64)
    mode_count = mode_mean = mode_overall = None
    if with_modes:
        counts = stats[:, 4 : 4 + NUM_MODES]
        sums = stats[:, 4 + NUM_MODES :]
        nan = torch.full_like(sums, float("nan"))
        mode_count = counts.round().to(torch.int64)
        mode_mean = torch.where(counts > 0, sums / counts.clamp_min(1), nan).to(adv.dtype)
        total = counts.sum(0)
        mode_overall = torch.where(total > 0, sums.sum(0) / total.clamp_min(1), nan[0]).to(adv.dtype)
    mean, std = stats[:, 1].to(adv.dtype), stats[:, 2].to(adv.dtype)
    return GroupAdvantages(adv, mean, std, count, zero_signal, mode_count, mode_mean, mode_overall)
