"""The PPO token math of the policy loss: the clipped (dual-clipped, log-ratio-clamped, importance-weighted) per-token
loss with verl's k3 KL, its derivative in ``logp`` written out for the fused gradients, and the per-token weights of
the four aggregations. One definition: the loss value and the fused gradients both come from here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _PPO:
    """The clipped policy-gradient objective's constants (``PolicyLoss``'s per-token settings). ``lr_low`` /
    ``lr_high``: the log-ratio clamp (None: none); ``kl_lr_clamp`` / ``kl_clamp``: verl's k3 clamps (None: none)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    beta: float
    entropy_coef: float
    lr_low: float | None = None
    lr_high: float | None = None
    kl_lr_clamp: float | None = None
    kl_clamp: float | None = None

    def as_op_list(self) -> list[float]:
        """The constants as a custom op's ``float[]`` argument; a missing bound (None) as an infinite one."""
        inf = math.inf
        return [self.clip_low, self.clip_high, inf if self.dual_clip is None else self.dual_clip, self.beta,
                self.entropy_coef, -inf if self.lr_low is None else self.lr_low,
                inf if self.lr_high is None else self.lr_high, inf if self.kl_lr_clamp is None else self.kl_lr_clamp,
                inf if self.kl_clamp is None else self.kl_clamp]  # fmt: skip

    @classmethod
    def from_op_list(cls, values) -> _PPO:
        """Inverse of :meth:`as_op_list`: an infinite bound is no bound (None)."""
        return cls(*(None if math.isinf(v) else float(v) for v in values))


def _inside(x, low, high):
    """``torch.clamp(x, low, high)``'s gradient mask: 1 on the closed interval, 0 outside (either bound None)."""
    keep = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        keep = keep & (x >= low)
    if high is not None:
        keep = keep & (x <= high)
    return keep.float()


def _k3(logp, ref, ppo: _PPO):
    """``(k3, d k3 / d logp)`` with verl's optional clamps: ``d = clamp(ref - logp, +-kl_lr_clamp)``, ``k3 =
    clamp(exp(d) - d - 1, +-kl_clamp)``; the derivative as autograd gives it through the clamps."""
    d = ref - logp
    grad_mask = None
    if ppo.kl_lr_clamp is not None:
        grad_mask = _inside(d, -ppo.kl_lr_clamp, ppo.kl_lr_clamp)
        d = d.clamp(-ppo.kl_lr_clamp, ppo.kl_lr_clamp)
    e = torch.exp(d)
    kl = e - d - 1
    if ppo.kl_clamp is not None:
        inside = _inside(kl, -ppo.kl_clamp, ppo.kl_clamp)
        grad_mask = inside if grad_mask is None else grad_mask * inside
        kl = kl.clamp(-ppo.kl_clamp, ppo.kl_clamp)
    grad = 1 - e  # d k3 / d logp = -(exp(d) - 1)
    return kl, (grad if grad_mask is None else grad * grad_mask)


def _ppo_token_loss(log_ratio, logp, adv, ref, ppo: _PPO, is_weights=None):
    """Per-token ``(loss_tok, ratio, dual_active, kl)``: ``is_weights * max(-A r, -A clip(r))`` (dual-clipped where
    A < 0; ``r = exp(clamp(log_ratio))``) + ``beta * k3``; ``kl`` / ``dual_active`` None when not computed. The entropy
    bonus is added by the caller (its own aggregation). The one definition of the loss: the value and the fused
    gradients (``_ppo_token_grad``) both come from it."""
    if ppo.lr_low is not None or ppo.lr_high is not None:
        log_ratio = log_ratio.clamp(ppo.lr_low, ppo.lr_high)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - ppo.clip_low, 1 + ppo.clip_high))
    dual_active = None
    if ppo.dual_clip is not None:
        pg3 = -adv * ppo.dual_clip
        dual_active = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if is_weights is not None:  # rollout importance weights (verl's TIS): the policy-gradient term only
        pg = pg * is_weights
    loss_tok, kl = pg, None
    if ref is not None:
        kl = _k3(logp, ref, ppo)[0]
        if ppo.beta != 0:
            loss_tok = loss_tok + ppo.beta * kl
    return loss_tok, ratio, dual_active, kl


def _ppo_token_grad(log_ratio, logp, adv, ref, ppo: _PPO, is_weights=None):
    """``d loss_tok / d logp`` of :func:`_ppo_token_loss` for a token-level ratio ``exp(logp - old)``, with autograd's
    conventions (a custom op's body runs below autograd, so the derivative is written out): ``maximum`` / ``minimum``
    split the gradient evenly at ties, ``clamp`` passes it on the closed interval."""
    through = None
    if ppo.lr_low is not None or ppo.lr_high is not None:
        through = _inside(log_ratio, ppo.lr_low, ppo.lr_high)
        log_ratio = log_ratio.clamp(ppo.lr_low, ppo.lr_high)
    ratio = torch.exp(log_ratio)
    lo, hi = 1 - ppo.clip_low, 1 + ppo.clip_high
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(lo, hi)
    tie = (pg1 == pg2).float() * 0.5
    share = (pg1 > pg2).float() + tie + ((pg2 > pg1).float() + tie) * ((ratio >= lo) & (ratio <= hi)).float()
    grad = -adv * ratio * share
    if ppo.dual_clip is not None:
        pg, pg3 = torch.maximum(pg1, pg2), -adv * ppo.dual_clip
        kept = (pg < pg3).float() + (pg == pg3).float() * 0.5
        grad = torch.where(adv < 0, grad * kept, grad)
    if through is not None:
        grad = grad * through
    if is_weights is not None:
        grad = grad * is_weights
    if ref is not None and ppo.beta != 0:
        grad = grad + ppo.beta * _k3(logp, ref, ppo)[1]
    return grad


def _token_weights(mask_f, aggregation, normaliser, max_length):
    """``w [B, L]`` with ``loss = sum(w * loss_tok)``: verl's agg_loss modes (all linear in the per-token loss) with a
    trainer-given normaliser (global token count or sequence count) replacing the denominator."""
    if aggregation == "token-mean":
        per_token = mask_f
        denom = mask_f.sum().clamp_min(1) if normaliser is None else normaliser
    else:
        n_tok = mask_f.sum(-1, keepdim=True)
        if aggregation == "seq-mean-token-mean":
            per_token = mask_f / n_tok.clamp_min(1)
        elif aggregation == "seq-mean-token-sum":
            per_token = mask_f
        else:  # seq-mean-token-sum-norm (Dr.GRPO): divide by a constant length
            per_token = mask_f / max_length
        denom = (n_tok > 0).sum().clamp_min(1) if normaliser is None else normaliser
    return per_token / denom


def _masked_mean(x, mask_f):
    return (x * mask_f).sum() / mask_f.sum().clamp_min(1)


def _log_ratio_bounds(log_ratio_clamp) -> tuple[float | None, float | None]:
    """``log_ratio_clamp`` (None, ``c`` or ``(low, high)``) as ``(low, high)``; an infinite bound becomes None."""
    if log_ratio_clamp is None:
        return None, None
    pair = isinstance(log_ratio_clamp, (tuple, list))
    values = tuple(log_ratio_clamp) if pair else (log_ratio_clamp,)
    if len(values) != (2 if pair else 1) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values
    ):
        raise ValueError(f"log_ratio_clamp: expected a float or a (low, high) pair of floats, got {log_ratio_clamp!r}")
    if not pair:
        if not values[0] > 0:
            raise ValueError(f"log_ratio_clamp: expected a float > 0 (verl: 20.0), got {log_ratio_clamp!r}")
        values = (-values[0], values[0])
    low, high = values
    if not low <= 0 <= high or low == high:
        raise ValueError(f"log_ratio_clamp: expected (low, high) with low <= 0 <= high and low < high (the on-policy "
                         f"log-ratio 0 must stay inside), got {log_ratio_clamp!r}")
    return (None if math.isinf(low) else float(low)), (None if math.isinf(high) else float(high))
