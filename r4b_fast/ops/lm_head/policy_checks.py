"""Argument checks of :func:`fused_linear_policy_loss`: the settings (``loss=`` or the keyword form), the tensors'
types / shapes / devices (no sync), and their values (one host sync, skipped under torch.compile)."""

from __future__ import annotations

import torch

from r4b_fast.ops.lm_head.checks import LOGPROB_TOLERANCE, _check_float, _check_mask, _check_targets
from r4b_fast.ops.lm_head.settings import SETTINGS, PolicyLoss


def _resolve_settings(loss: PolicyLoss | None, settings: dict) -> PolicyLoss:
    """The call's ``PolicyLoss``: ``loss=`` as given, or one built from the older keyword form (never both)."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"fused_linear_policy_loss() got unexpected keyword argument(s) {unknown}; the loss settings "
                        f"are {SETTINGS}")
    if loss is None:
        return PolicyLoss(**settings)
    if not isinstance(loss, PolicyLoss):
        raise TypeError(f"loss: expected a PolicyLoss, got {type(loss).__name__}")
    if settings:
        name = sorted(settings)[0]
        raise TypeError(f"{name}: given together with loss=; set it in the PolicyLoss instead "
                        f"(loss.replace({name}=...))")
    return loss


def _check_policy_inputs(hidden, targets, advantages, mask, old_logprobs, ref_logprobs, rollout_is_weights,
                         temperature, cfg: PolicyLoss) -> tuple[int, int]:
    """Types, shapes and devices of the call's tensors (``hidden`` / ``weight`` checked before); returns ``(B, L)``."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected [B, L], got {shape}")
    B, L = targets.shape
    H = hidden.shape[-1]
    if tuple(hidden.shape) not in ((B, L, H), (B * L, H)):
        raise ValueError(f"hidden: expected [B={B}, L={L}, H] or [B*L, H] to match targets, got {tuple(hidden.shape)}")
    dev = hidden.device
    _check_targets(targets, (B, L), dev, shape_of="[B, L]")
    _check_mask(mask, (B, L), dev)
    _check_float("advantages", advantages, device=dev)
    if tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages: expected shape ({B},) or {(B, L)}, got {tuple(advantages.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            _check_float(name, t, shape=(B, L), device=dev)
    if rollout_is_weights is not None:
        _check_float("rollout_is_weights", rollout_is_weights, device=dev)
        if tuple(rollout_is_weights.shape) not in ((B,), (B, L)):
            raise ValueError(f"rollout_is_weights: expected shape ({B},) or {(B, L)}, got "
                             f"{tuple(rollout_is_weights.shape)}")
    elif cfg.rollout_is_level is not None:
        raise ValueError(f"rollout_is_weights: needed, the loss settings ask for rollout importance sampling "
                         f"(rollout_is_level={cfg.rollout_is_level!r}): pass loss.rollout_is_weights(old_logprobs, "
                         "rollout_logprobs, mask)")
    if cfg.beta != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: needed for the KL penalty when beta != 0")
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=(B, L), device=dev)
    return B, L


def _value_counts(targets, mask, mask_b, advantages, old_logprobs, ref_logprobs, rollout_is_weights, normaliser, V):
    """The counts of bad values, fetched in one host sync: ``{name: count}``."""
    zero = torch.zeros((), dtype=torch.int64, device=mask.device)

    def nonfinite(t):
        return (~torch.isfinite(t)).sum() if t is not None else zero

    def above_zero(t):  # log-probabilities are <= 0; rounding may lift one a little
        return (mask_b & (t > LOGPROB_TOLERANCE)).sum() if t is not None else zero

    is_w = rollout_is_weights
    checks = {
        "advantages": nonfinite(advantages),
        "old_logprobs": nonfinite(old_logprobs),
        "ref_logprobs": nonfinite(ref_logprobs),
        "old_logprobs above 0": above_zero(old_logprobs),
        "ref_logprobs above 0": above_zero(ref_logprobs),
        "rollout_is_weights": (~(torch.isfinite(is_w) & (is_w >= 0))).sum() if is_w is not None else zero,
        # NaN != 0 and 0.5 != 0: a loose mask would count such positions as whole tokens
        "mask": ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else zero,
        "targets": (mask_b & ((targets < 0) | (targets >= V))).sum(),
        "normaliser": ((~torch.isfinite(normaliser)) | (normaliser <= 0)).sum().to(mask.device)
        if isinstance(normaliser, torch.Tensor) else zero,
    }  # fmt: skip
    return dict(zip(checks, torch.stack(list(checks.values())).tolist()))


def _first(where: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(where)[0])


def _check_policy_values(targets, mask, mask_b, advantages, old_logprobs, ref_logprobs, rollout_is_weights,
                         normaliser, V) -> None:
    """Raise ValueError naming the first bad argument: one host sync."""
    counts = _value_counts(targets, mask, mask_b, advantages, old_logprobs, ref_logprobs, rollout_is_weights,
                           normaliser, V)  # fmt: skip
    for name in ("advantages", "old_logprobs", "ref_logprobs"):
        if counts[name]:
            raise ValueError(f"{name}: {counts[name]} non-finite value(s)")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if counts[f"{name} above 0"]:
            first = _first(mask_b & (t > LOGPROB_TOLERANCE))
            raise ValueError(f"{name}: {counts[f'{name} above 0']} value(s) above 0 where mask is 1 (log-probabilities "
                             f"are <= 0, up to {LOGPROB_TOLERANCE} of rounding); first at {first} ({t[first].item()})")
    if counts["rollout_is_weights"]:
        raise ValueError(f"rollout_is_weights: {counts['rollout_is_weights']} value(s) not finite or negative "
                         "(importance weights are exp(log-ratio), truncated: finite and >= 0)")
    if counts["mask"]:
        first = _first((mask != 0) & (mask != 1))
        raise ValueError(f"mask: {counts['mask']} value(s) neither 0 nor 1 (a weight is not a mask); first at "
                         f"{first} ({mask[first].item()})")
    if counts["targets"]:
        first = _first(mask_b & ((targets < 0) | (targets >= V)))
        raise ValueError(f"targets: {counts['targets']} value(s) outside [0, V={V}) where mask is 1 (ignore-index "
                         f"labels such as -100 belong where mask is 0); first at {first} ({int(targets[first])})")
    if counts["normaliser"]:
        raise ValueError(f"normaliser: expected a finite number > 0, got {normaliser.item()!r}")
