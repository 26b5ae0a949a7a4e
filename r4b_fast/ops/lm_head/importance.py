"""Rollout vs trainer log-probs: truncated importance weights (verl's TIS, TRL's vLLM correction) that correct a
rollout engine whose log-probs differ from the trainer's, and mismatch metrics."""

from __future__ import annotations

import math

import torch

from r4b_fast.ops.lm_head.checks import _check_float

IS_LEVELS = ("token", "sequence")
# verl's SAFETY_BOUND (rollout_corr_helper): log-ratios are clamped to +-20 before exp
IS_LOG_RATIO_BOUND = 20.0


def _check_logprob_pair(names, a, b, mask):
    """Validate two ``[B, L]`` float log-prob tensors and a ``[B, L]`` 0/1 mask (names for the errors); return the
    bool mask. Values at masked-in positions must be finite (one host sync, skipped under compile)."""
    _check_float(names[0], a)
    if a.dim() != 2:
        raise ValueError(f"{names[0]}: expected [B, L], got shape {tuple(a.shape)}")
    _check_float(names[1], b, shape=a.shape, device=a.device, ref=names[0])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(a.shape):
        raise ValueError(f"mask: expected shape {tuple(a.shape)}, got {tuple(mask.shape)}")
    if mask.device != a.device:
        raise ValueError(f"mask: on device {mask.device}, but {names[0]} is on {a.device}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    mask_b = mask if mask.dtype == torch.bool else mask != 0
    if not torch.compiler.is_compiling():
        zero = torch.zeros((), dtype=torch.int64, device=a.device)
        counts = torch.stack([
            (mask_b & ~torch.isfinite(a)).sum(), (mask_b & ~torch.isfinite(b)).sum(),
            ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else zero,
        ]).tolist()  # fmt: skip
        for name, n in zip(names, counts):
            if n:
                raise ValueError(f"{name}: {n} non-finite value(s) where mask is 1")
        if counts[2]:
            raise ValueError(f"mask: {counts[2]} value(s) neither 0 nor 1")
    return mask_b


def rollout_importance_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float | None = 2.0,
    level: str = "token",
) -> torch.Tensor:
    """Truncated importance weights ``pi_train / pi_rollout`` that correct a rollout engine whose log-probs differ from
    the trainer's (the rollout's kernels, precision or a stale copy of the weights): pass them to
    :func:`fused_linear_policy_loss` as ``rollout_is_weights``, with ``old_logprobs`` (the trainer's) as its
    ``old_logprobs``.

    ``level="token"``: ``w_t = min(exp(old_t - rollout_t), cap)``; ``level="sequence"``: one weight per sequence,
    ``min(exp(sum_t m_t (old_t - rollout_t)), cap)``, on every token of it. The log-ratio is clamped to ``+-20``
    before ``exp``. This is verl 0.9.1's ``compute_rollout_correction_weights(log_ratio=old - rollout,
    rollout_is=level, rollout_is_threshold=cap)`` (TIS; ``algorithm.rollout_correction.rollout_is`` /
    ``rollout_is_threshold``, default 2.0) exactly, and TRL 1.16's ``importance_sampling_ratio`` with
    ``vllm_importance_sampling_mode="token_truncate"`` / ``"sequence_truncate"`` and
    ``vllm_importance_sampling_clip_max=cap`` (``clip_min=None``; TRL clamps no log-ratio, which differs only
    where it is below -20, by less than ``exp(-20) = 2e-9``; TRL's weight on padding is 1, ours and verl's 0: the
    loss masks it either way).

    Args:
        old_logprobs: ``[B, L]`` float log-probs of the sampled tokens under the training forward (detached).
        rollout_logprobs: ``[B, L]`` the rollout engine's log-probs of the same tokens (same temperature).
        mask: ``[B, L]`` bool or 0/1: the tokens that count; values elsewhere are ignored (may be anything).
        cap: truncation ``> 0`` (verl's ``rollout_is_threshold``, TRL's ``clip_max``); None: none.
        level: ``"token"`` or ``"sequence"`` (verl's ``rollout_is``).

    Returns:
        ``[B, L]`` float32 weights, detached, 0 where ``mask`` is 0.

    Example:
        >>> import torch, r4b_fast
        >>> old = torch.tensor([[-1.0, -2.0, -0.5]]); rollout = torch.tensor([[-1.5, -2.0, -3.0]])
        >>> r4b_fast.rollout_importance_weights(old, rollout, torch.tensor([[1, 1, 0]]), cap=2.0)
        tensor([[1.6487, 1.0000, 0.0000]])
    """
    mask_b = _check_logprob_pair(("old_logprobs", "rollout_logprobs"), old_logprobs, rollout_logprobs, mask)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or math.isnan(cap)
                            or not cap > 0):
        raise ValueError(f"cap: expected a float > 0 (verl's rollout_is_threshold, default 2.0) or None, got {cap!r}")
    if level not in IS_LEVELS:
        raise ValueError(f"level: expected one of {IS_LEVELS}, got {level!r}")
    with torch.no_grad():
        d = torch.where(mask_b, old_logprobs.float() - rollout_logprobs.float(), 0.0)
        if level == "sequence":
            d = d.sum(-1, keepdim=True)
        w = torch.exp(d.clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND))
        if cap is not None:
            w = w.clamp(max=float(cap))
        return torch.where(mask_b, w.expand(mask_b.shape), 0.0)


def logprob_mismatch(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs are from the training forward's on the same tokens.

    Returns 0-dim float32 tensors (0 when no token counts): ``mismatch/abs_mean`` and ``mismatch/abs_max`` of
    ``|train - rollout|`` over the masked tokens (TRL's ``sampling/sampling_logp_difference/mean`` / ``max``) and
    ``mismatch/k3``, the masked mean of ``exp(d) - d - 1`` with ``d = train - rollout`` (verl's
    ``rollout_corr/k3_kl``, an estimate of KL(pi_rollout || pi_train)); computed in float64 with ``expm1``, so that a
    mismatch of 1e-6 gives k3 ~ 5e-13 rather than float32 rounding noise.

    Args:
        train_logprobs: ``[B, L]`` float log-probs of the sampled tokens under the training forward.
        rollout_logprobs: ``[B, L]`` the rollout's log-probs of the same tokens, at the same temperature.
        mask: ``[B, L]`` bool or 0/1: the tokens to compare (sampled ones; values elsewhere are ignored).

    Example:
        >>> import torch, r4b_fast
        >>> m = r4b_fast.logprob_mismatch(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]]),
        ...                               torch.ones(1, 2, dtype=torch.bool))
        >>> float(m["mismatch/abs_mean"]), float(m["mismatch/abs_max"])
        (0.25, 0.5)
    """
    mask_b = _check_logprob_pair(("train_logprobs", "rollout_logprobs"), train_logprobs, rollout_logprobs, mask)
    with torch.no_grad():
        d = torch.where(mask_b, train_logprobs.double() - rollout_logprobs.double(), 0.0)
        n = mask_b.sum().clamp_min(1)
        a = d.abs()
        out = {
            "mismatch/abs_mean": a.sum() / n,
            "mismatch/abs_max": a.amax() if d.numel() else a.sum(),
            "mismatch/k3": (torch.expm1(d) - d).sum() / n,  # 0 on masked-out positions (d = 0)
        }
        return {k: v.float() for k, v in out.items()}
