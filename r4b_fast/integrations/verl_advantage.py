"""verl's advantage estimator ``"bpo"`` (R-4B's mixed-group advantage) and per-mode metrics of a verl batch.

Part of :mod:`r4b_fast.integrations.verl`, which registers :func:`compute_bpo_outcome_advantage` with verl's
``register_adv_est``; this module imports no verl.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from r4b_fast.integrations.verl_common import AGENT_LOOP, MODE_FIELD, MODE_NAMES, _cfg_get, modes_from_field
from r4b_fast.ops.group_advantages import group_advantages


def _group_ids(index: Any, n: int) -> tuple[torch.Tensor, int]:
    """verl's uid array (any hashable ids) as dense group ids ``0..G-1`` in order of first appearance."""
    ids = list(np.asarray(index, dtype=object).reshape(-1).tolist())
    if len(ids) != n:
        raise ValueError(f"index: {len(ids)} uids for {n} rollouts (token_level_rewards rows)")
    first: dict[Any, int] = {}
    dense = [first.setdefault(u, len(first)) for u in ids]
    return torch.tensor(dense, dtype=torch.int64), len(first)


def compute_bpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    modes: Any = None,
    singleton: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"bpo"``: R-4B's mixed-group advantage, one scalar per rollout on its response.

    Every rollout with the same ``index`` (verl's prompt ``uid``; all ``n`` samples of a prompt, both modes) forms one
    group; ``A = (r - mean) / (std + epsilon)`` with ``r`` the row sum of ``token_level_rewards`` (Bessel-corrected
    std, as verl's ``grpo``), or ``r - mean`` when ``norm_adv_by_std_in_grpo`` is False (taken from
    ``config.norm_adv_by_std_in_grpo`` when not given: verl passes only ``config`` to registered estimators). Groups
    whose rewards are all equal get exactly 0; a single-rollout group gets 0 too, or verl's ``grpo`` convention
    ``r / (1 + epsilon)`` (mean 0, std 1) with ``singleton="verl"`` (BPO groups hold ``2g >= 2`` rollouts).

    Args:
        token_level_rewards: ``[B, L]`` float, the reward on each response token (verl puts it on the last).
        response_mask: ``[B, L]`` 0/1, the response tokens.
        index: ``[B]`` group ids (verl: ``data.non_tensor_batch["uid"]``), any hashable values.
        epsilon: added to the std (verl's default 1e-6).
        norm_adv_by_std_in_grpo: divide by the group's std (GRPO) or not (Dr.GRPO).
        config: verl's ``AlgoConfig`` / ``algorithm`` DictConfig, or None.
        modes: optional ``[B]`` ``bpo_mode`` values (``"think"`` / ``"no_think"`` or ``Mode`` ints): then every group
            must hold both modes (``group_advantages(estimator="bpo")`` checks it); not passed by verl's
            ``compute_advantage`` (see the module docstring).
        singleton: ``"zero"`` or ``"verl"``, as ``group_advantages(singleton=)``; default ``config.bpo_singleton``
            (``+algorithm.bpo_singleton=verl`` on verl's command line), else ``"zero"``.

    Returns:
        ``(advantages, returns)``, both ``[B, L]`` in the rewards' dtype, the rollout's advantage on its response
        tokens and 0 elsewhere (verl's convention for outcome estimators: returns = advantages).

    Example:
        >>> r = torch.zeros(4, 3); r[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
        >>> adv, _ = compute_bpo_outcome_advantage(r, torch.ones(4, 3), np.array(["a"] * 4, dtype=object))
        >>> adv[:, 0]
        tensor([ 0.5000, -1.5000,  0.5000,  0.5000])
    """
    if not isinstance(token_level_rewards, torch.Tensor) or token_level_rewards.dim() != 2:
        seen = getattr(token_level_rewards, "shape", type(token_level_rewards))
        raise ValueError(f"token_level_rewards: expected a [B, L] tensor, got {seen}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask: expected shape {tuple(token_level_rewards.shape)}, got "
                         f"{getattr(response_mask, 'shape', type(response_mask))}")
    if index is None:
        raise ValueError("index: the bpo estimator groups rollouts by prompt uid; the batch has no 'uid' column")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    if singleton is None:
        singleton = _cfg_get(config, "bpo_singleton", None) or "zero"
    scores = token_level_rewards.sum(dim=-1)
    group_index, num_groups = _group_ids(index, scores.shape[0])
    mode_t = modes_from_field(modes) if modes is not None else None
    if mode_t is not None and mode_t.numel() != scores.shape[0]:
        raise ValueError(f"modes: {mode_t.numel()} values for {scores.shape[0]} rollouts")
    with torch.no_grad():
        out = group_advantages(
            scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32),
            group_index=group_index.to(scores.device), num_groups=num_groups,
            modes=mode_t.to(scores.device) if mode_t is not None else None,
            # without modes the mixed group's statistics are GRPO's over the uid group; "bpo" adds the mode check
            estimator="bpo" if mode_t is not None else "grpo",
            scale="group" if norm_adv_by_std_in_grpo else "none", eps=float(epsilon), singleton=singleton,
        )  # fmt: skip
        adv = out.advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask.to(token_level_rewards.dtype)
    return adv, adv


def bpo_mode_metrics(data: Any, prefix: str = "bpo") -> dict[str, float]:
    """Per-mode means of a verl batch after ``compute_advantage``: reward, response length, advantage, count.

    Args:
        data: a ``verl.DataProto`` with ``batch["token_level_rewards"]``, ``batch["response_mask"]``, optionally
            ``batch["advantages"]``, and ``non_tensor_batch["bpo_mode"]`` (written by :class:`BPOModeAgentLoop`).
        prefix: metric-name prefix.

    Returns:
        ``{"bpo/think/reward_mean": ..., "bpo/think/response_length": ..., "bpo/think/advantage_mean": ...,
        "bpo/think/count": ..., "bpo/no_think/...": ...}`` for the modes present.

    Example:
        >>> metrics = bpo_mode_metrics(batch)  # doctest: +SKIP
    """
    if MODE_FIELD not in data.non_tensor_batch:
        raise ValueError(f"data: no non-tensor column {MODE_FIELD!r} (rollouts from the {AGENT_LOOP!r} agent loop "
                         "carry it)")
    modes = modes_from_field(data.non_tensor_batch[MODE_FIELD])
    rewards = data.batch["token_level_rewards"].sum(-1).double().cpu()
    mask = data.batch["response_mask"].double().cpu()
    length = mask.sum(-1)
    adv = data.batch["advantages"].double().cpu() if "advantages" in data.batch.keys() else None
    metrics: dict[str, float] = {}
    for mode, name in MODE_NAMES.items():
        sel = modes == int(mode)
        k = int(sel.sum())
        if k == 0:
            continue
        key = f"{prefix}/{name}"
        metrics[f"{key}/count"] = float(k)
        metrics[f"{key}/reward_mean"] = float(rewards[sel].mean())
        metrics[f"{key}/response_length"] = float(length[sel].mean())
        if adv is not None:  # the rollout's scalar advantage (the same on each of its response tokens)
            per_rollout = (adv[sel] * mask[sel]).sum(-1) / length[sel].clamp_min(1)
            metrics[f"{key}/advantage_mean"] = float(per_rollout.mean())
    return metrics
