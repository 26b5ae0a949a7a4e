"""verl's policy loss ``"r4b_bpo"``: the project's clipped loss on verl's log-probs, and the fused LM-head path.

Part of :mod:`r4b_fast.integrations.verl`, which registers :func:`compute_policy_loss_r4b` with verl's
``register_policy_loss``; this module imports no verl.
"""

from __future__ import annotations

from typing import Any

import torch

from r4b_fast.integrations.verl_common import _cfg_get
from r4b_fast.ops.lm_head import PolicyLoss, fused_linear_policy_loss
from r4b_fast.ops.lm_head.token_loss import _PPO, _log_ratio_bounds, _ppo_token_loss, _token_weights

# verl's vanilla loss clamps the log-ratio to +-20 before exp (and its dual clip defaults to clip_ratio_c = 3.0)
VERL_LOG_RATIO_CLAMP = 20.0
VERL_CLIP_RATIO_C = 3.0


def verl_policy_loss(config: Any, loss_agg_mode: str = "token-mean") -> PolicyLoss:
    """The ``PolicyLoss`` of verl's ``vanilla`` loss for a verl actor config: ``PolicyLoss.verl`` with the config's
    ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_c`` (default 3.0) and
    ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``, set by
    verl's actor for each micro-batch), which give the normaliser / ``max_length`` exactly as verl's ``agg_loss``
    divides (``"token-sum"`` is a token mean over a normaliser of ``1 / dp_size``).

    Args:
        config: verl's ``ActorConfig`` (or a DictConfig / dict with the same keys).
        loss_agg_mode: verl's ``loss_agg_mode``.

    Example:
        >>> verl_policy_loss({"clip_ratio": 0.2, "clip_ratio_high": 0.28}).clip_high
        0.28
    """
    if config is None:
        raise ValueError("config: verl's actor config is needed (clip_ratio, clip_ratio_low/high, clip_ratio_c)")
    return PolicyLoss.verl(
        "vanilla", loss_agg_mode, clip_ratio=_cfg_get(config, "clip_ratio", 0.2),
        clip_ratio_low=_cfg_get(config, "clip_ratio_low"), clip_ratio_high=_cfg_get(config, "clip_ratio_high"),
        clip_ratio_c=_cfg_get(config, "clip_ratio_c", VERL_CLIP_RATIO_C),
        global_batch_info=_cfg_get(config, "global_batch_info") or {},
    )  # fmt: skip


def verl_policy_loss_kwargs(config: Any, loss_agg_mode: str = "token-mean") -> dict[str, Any]:
    """``fused_linear_policy_loss`` keyword arguments that give verl's ``vanilla`` loss for a verl actor config: the
    fields of :func:`verl_policy_loss` that it sets.

    Args:
        config: verl's ``ActorConfig`` (or a DictConfig / dict with the same keys).
        loss_agg_mode: verl's ``loss_agg_mode``.

    Returns:
        a dict with ``clip_low``, ``clip_high``, ``dual_clip``, ``log_ratio_clamp``, ``aggregation``, ``normaliser``,
        ``max_length``.

    Example:
        >>> verl_policy_loss_kwargs({"clip_ratio": 0.2, "clip_ratio_high": 0.28})["clip_high"]
        0.28
    """
    loss = verl_policy_loss(config, loss_agg_mode)
    names = ("clip_low", "clip_high", "dual_clip", "log_ratio_clamp", "aggregation", "normaliser", "max_length")
    return {name: getattr(loss, name) for name in names}


def policy_loss_from_logprobs(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | tuple[float, float] | None = None,
    aggregation: str = "token-mean",
    normaliser: float | torch.Tensor | None = None,
    max_length: int | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss of ``fused_linear_policy_loss`` (same per-token function, same aggregation) on given
    log-probs, differentiable in ``log_prob`` by autograd: for trainers whose forward already made the log-probs.

    Args:
        log_prob: ``[B, L]`` float, current policy's log-probs (requires grad).
        old_log_prob: ``[B, L]`` behaviour-policy log-probs (detached).
        advantages: ``[B, L]`` per token or ``[B]`` per sequence (detached).
        response_mask: ``[B, L]`` bool or 0/1.
        clip_low, clip_high, dual_clip, log_ratio_clamp, aggregation, normaliser, max_length, rollout_is_weights:
            as in ``r4b_fast.fused_linear_policy_loss``.

    Returns:
        ``(loss, metrics)``: 0-dim float32 loss; detached 0-dim metrics ``clip_frac_low``, ``clip_frac_high``,
        ``dual_clip_frac``, ``ratio_mean``, ``ppo_kl`` (masked mean of ``old - logp``, after the clamp, as verl's).

    Example:
        >>> lp = torch.randn(2, 4, requires_grad=True)
        >>> loss, m = policy_loss_from_logprobs(lp, lp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 4))
        >>> float(m["ratio_mean"])
        1.0
    """
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected a [B, L] tensor, got {getattr(log_prob, 'shape', type(log_prob))}")
    B, L = log_prob.shape
    for name, t in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, L):
            raise ValueError(f"{name}: expected shape {(B, L)}, got {getattr(t, 'shape', type(t))}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages: expected shape ({B},) or {(B, L)}, got {getattr(advantages, 'shape', None)}")
    if aggregation not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"aggregation: unknown {aggregation!r}")
    lr_low, lr_high = _log_ratio_bounds(log_ratio_clamp)
    mask_b = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    mask_f = mask_b.float()
    adv = advantages.detach().float()
    adv = torch.where(mask_b, (adv[:, None] if adv.dim() == 1 else adv).expand(B, L), 0.0)
    logp = log_prob.float()
    # padding may hold anything (verl pads log-probs with 0, other trainers with -inf): keep it out of exp
    log_ratio = torch.where(mask_b, logp - old_log_prob.detach().float(), 0.0)
    is_w = None
    if rollout_is_weights is not None:
        is_w = rollout_is_weights.detach().float()
        is_w = torch.where(mask_b, (is_w[:, None] if is_w.dim() == 1 else is_w).expand(B, L), 0.0)
    ppo = _PPO(float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip), 0.0, 0.0,
               lr_low, lr_high)
    loss_tok, ratio, dual_active, _ = _ppo_token_loss(log_ratio, logp, adv, None, ppo, is_w)
    w_tok = _token_weights(mask_f, aggregation, normaliser, L if max_length is None else max_length)
    loss = (loss_tok * w_tok).sum()
    with torch.no_grad():
        n = mask_f.sum().clamp_min(1)
        r = ratio.detach()
        clamped = log_ratio.detach().clamp(lr_low, lr_high) if (lr_low, lr_high) != (None, None) else log_ratio
        metrics = {
            "clip_frac_low": (((adv < 0) & (r < 1 - clip_low)).float() * mask_f).sum() / n,
            "clip_frac_high": (((adv > 0) & (r > 1 + clip_high)).float() * mask_f).sum() / n,
            "dual_clip_frac": (dual_active.float() * mask_f).sum() / n if dual_active is not None else n.new_zeros(()),
            "ratio_mean": (r * mask_f).sum() / n,
            "ppo_kl": (-clamped.detach() * mask_f).sum() / n,
        }
    return loss, metrics


def _verl_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Our metrics under the names verl's vanilla loss logs (plus ours under ``actor/r4b_*``)."""
    return {
        "actor/pg_clipfrac": float(metrics["clip_frac_low"] + metrics["clip_frac_high"]),
        "actor/ppo_kl": float(metrics["ppo_kl"]),
        "actor/pg_clipfrac_lower": float(metrics["dual_clip_frac"]),
        "actor/r4b_ratio_mean": float(metrics["ratio_mean"]),
    }


def compute_policy_loss_r4b(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"r4b_bpo"``: the project's clipped loss on verl's log-probs (verl's loss signature).

    With the arguments :func:`verl_policy_loss_kwargs` derives from ``config`` it equals verl's ``vanilla`` loss
    (value and gradient) and logs the same metric names (``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower``). Select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=r4b_bpo``.

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``[B, L]`` (verl's padded micro-batch).
        loss_agg_mode: verl's ``loss_agg_mode``.
        config: verl's ``ActorConfig`` (``clip_ratio*``, ``clip_ratio_c``, ``global_batch_info``).
        rollout_is_weights: ``[B, L]`` verl's rollout-correction (TIS) weights, or None.

    Returns:
        ``(loss, metrics)``: 0-dim loss, metrics as python floats.

    Example:
        >>> from verl.trainer.ppo.core_algos import get_policy_loss_fn
        >>> loss_fn = get_policy_loss_fn("r4b_bpo")   # what verl's actor does for loss_mode=r4b_bpo
    """
    kwargs = verl_policy_loss_kwargs(config, loss_agg_mode)
    loss, metrics = policy_loss_from_logprobs(log_prob, old_log_prob, advantages, response_mask,
                                              rollout_is_weights=rollout_is_weights, **kwargs)
    return loss, _verl_metrics(metrics)


def fused_policy_loss_for_verl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_log_prob: torch.Tensor,
    config: Any,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The fused LM-head path for a custom verl actor: ``fused_linear_policy_loss`` with verl's actor config.

    For an actor whose forward returns the last hidden states of the response positions instead of log-probs: no
    ``[T, V]`` logits, gradients of ``hidden`` / ``weight`` formed in the forward. Same loss and gradients as the
    registered ``"r4b_bpo"`` loss on ``fused_linear_logprobs(hidden, weight, targets)``.

    Args:
        hidden: ``[B, L, H]`` last hidden states predicting ``targets``; ``weight``: ``[V, H]`` LM head.
        targets: ``[B, L]`` response token ids; advantages, response_mask, old_log_prob: ``[B, L]`` as verl's.
        config, loss_agg_mode, rollout_is_weights: as in :func:`compute_policy_loss_r4b`.
        **kwargs: more ``fused_linear_policy_loss`` arguments (``temperature``, ``bias``, ``ref_logprobs`` +
            ``beta``, ``backend``, ...).

    Returns:
        ``(loss, metrics)`` with verl's metric names.

    Example:
        >>> loss, metrics = fused_policy_loss_for_verl(  # doctest: +SKIP
        ...     h, lm_head.weight, responses, adv, mask, old_lp, actor_cfg)
    """
    loss, metrics = fused_linear_policy_loss(
        hidden, weight, targets, advantages, response_mask, old_logprobs=old_log_prob,
        rollout_is_weights=rollout_is_weights, **verl_policy_loss_kwargs(config, loss_agg_mode), **kwargs,
    )  # fmt: skip
    out = {
        "actor/pg_clipfrac": float(metrics["clip_frac_low"] + metrics["clip_frac_high"]),
        "actor/pg_clipfrac_lower": float(metrics["dual_clip_frac"]),
        "actor/r4b_ratio_mean": float(metrics["ratio_mean"]),
    }
    return loss, out
