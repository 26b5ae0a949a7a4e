"""The public policy loss: :func:`fused_linear_policy_loss`, the PPO-clipped GRPO / DAPO / Dr.GRPO / GSPO / BPO loss
straight from the LM head's input. Its settings are one ``PolicyLoss``; the per-token math is ``token_loss.py``; the
gradients are formed during the forward by the ``fused_linear_policy_loss_grads`` op (``registration.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b_fast.ops.lm_head.checks import _validate_linear
from r4b_fast.ops.lm_head.logprobs import _autocast_inputs, _prepare_head, fused_linear_logprobs
from r4b_fast.ops.lm_head.policy_checks import _check_policy_inputs, _check_policy_values, _resolve_settings
from r4b_fast.ops.lm_head.registration import _attach_grads_op, _policy_grads_op
from r4b_fast.ops.lm_head.settings import PolicyLoss
from r4b_fast.ops.lm_head.token_loss import _PPO, _masked_mean, _ppo_token_loss, _token_weights

IGNORE = -100  # the internal ignore index of the padding positions (mask 0)


@dataclass
class _PolicyBatch:
    """The call's per-token inputs, ``[B, L]``, zero (or ignored) where ``mask`` is 0: fp32 ``adv`` / ``old`` / ``ref``
    / ``is_w`` (detached; None where not given), int64 ``targets`` (``IGNORE`` on padding), the loss's token weights
    ``w_tok`` and the entropy bonus's ``w_ent`` (None: ``w_tok``)."""

    mask_b: torch.Tensor
    mask_f: torch.Tensor
    targets: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    is_w: torch.Tensor | None
    w_tok: torch.Tensor
    w_ent: torch.Tensor | None

    @classmethod
    def build(cls, targets, advantages, mask_b, old_logprobs, ref_logprobs, rollout_is_weights, cfg: PolicyLoss):
        B, L = targets.shape
        mask_f = mask_b.float()
        # Padding positions may hold anything: their targets are ignored and their loss inputs zeroed, so no inf/NaN
        # there reaches the loss or (as 0 * inf) the gradient. A masked-in target equal to the internal ignore index
        # (checked, but not under compile) becomes -1, so the op's own range check rejects it instead of dropping it.
        safe_targets = torch.where(mask_b, torch.where(targets == IGNORE, -1, targets.long()), IGNORE)

        def per_token(t):  # [B] or [B, L] -> [B, L] fp32, detached (a constant of the loss, as in TRL and verl)
            t = t.detach().float()
            return torch.where(mask_b, (t[:, None] if t.dim() == 1 else t).expand(B, L), 0.0)

        normaliser = cfg.normaliser
        if isinstance(normaliser, torch.Tensor):
            normaliser = normaliser.detach().reshape(())
        max_length = L if cfg.max_length is None else cfg.max_length
        w_ent = None
        if cfg.entropy_aggregation is not None:  # the entropy bonus's own weights (TRL: a token mean)
            w_ent = _token_weights(mask_f, cfg.entropy_aggregation, None, max_length)
        return cls(mask_b, mask_f, safe_targets, per_token(advantages),
                   per_token(old_logprobs) if old_logprobs is not None else None,
                   per_token(ref_logprobs) if ref_logprobs is not None else None,
                   per_token(rollout_is_weights) if rollout_is_weights is not None else None,
                   _token_weights(mask_f, cfg.aggregation, normaliser, max_length), w_ent)  # fmt: skip


def _fused_forward(hidden, weight, bias, temp, batch: _PolicyBatch, ppo: _PPO, backend):
    """``(logp [B, L], entropy [B, L], (dh, dw, db))``: the loss's gradients formed during the forward (3 GEMMs)."""
    B, L = batch.targets.shape
    args, _ = _prepare_head(hidden.reshape(B * L, -1), weight, bias, batch.targets.reshape(-1), temp, IGNORE, backend)
    h2, w2, b2, y2, t2, chosen = args

    def flat(t):
        return t.reshape(-1).contiguous() if t is not None else None

    logp, entropy, dh, dw, db = _policy_grads_op(
        h2.detach(), w2.detach(), b2.detach() if b2 is not None else None, y2, t2, IGNORE, flat(batch.adv),
        flat(batch.old), flat(batch.ref), flat(batch.w_tok.detach().float()), flat(batch.w_ent), flat(batch.is_w),
        ppo.as_op_list(), hidden.requires_grad, weight.requires_grad, chosen,
    )  # fmt: skip
    return logp.view(B, L), entropy.view(B, L), (dh.view(hidden.shape) if dh.numel() else dh, dw, db)


def _loss_value(logp, entropy, batch: _PolicyBatch, cfg: PolicyLoss, ppo: _PPO):
    """``(loss, ratio, dual_active, kl)`` from the per-token log-probs and entropies (differentiable through them)."""
    old_or_current = logp.detach() if batch.old is None else batch.old
    if cfg.importance_level == "token":
        log_ratio = logp - old_or_current
    else:  # GSPO
        mask_f = batch.mask_f
        seq_log_ratio = ((logp - old_or_current) * mask_f).sum(-1) / mask_f.sum(-1).clamp_min(1)
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    loss_tok, ratio, dual_active, kl = _ppo_token_loss(log_ratio, logp, batch.adv, batch.ref, ppo, batch.is_w)
    value = (loss_tok * batch.w_tok).sum()
    if cfg.entropy_coef != 0:
        value = value - ppo.entropy_coef * (entropy * (batch.w_tok if batch.w_ent is None else batch.w_ent)).sum()
    return value, ratio, dual_active, kl


@torch.no_grad()
def _metrics(logp, entropy, ratio, dual_active, kl, batch: _PolicyBatch, cfg: PolicyLoss) -> dict[str, torch.Tensor]:
    mask_f, adv, r = batch.mask_f, batch.adv, ratio.detach()
    zero = mask_f.new_zeros(())
    metrics = {
        "kl": _masked_mean(kl.detach(), mask_f) if kl is not None else zero,
        "clip_frac_low": _masked_mean(((adv < 0) & (r < 1 - cfg.clip_low)).float(), mask_f),
        "clip_frac_high": _masked_mean(((adv > 0) & (r > 1 + cfg.clip_high)).float(), mask_f),
        "dual_clip_frac": _masked_mean(dual_active.float(), mask_f) if dual_active is not None else zero,
        "ratio_mean": _masked_mean(r, mask_f),
        "entropy_mean": _masked_mean(entropy.detach(), mask_f),
        "logprob_mean": _masked_mean(logp.detach(), mask_f),
    }
    if batch.is_w is not None:
        metrics["rollout_is_mean"] = _masked_mean(batch.is_w, mask_f)
    return metrics


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    rollout_is_weights: torch.Tensor | None = None,
    backend: str | None = None,
    loss: PolicyLoss | None = None,
    **settings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss straight from the LM head's input.

    Per token (``m`` = mask): ``ratio = exp(logp - old)``, ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low,
    1 + clip_high))``; with ``dual_clip = c > 1``, ``pg = min(pg, -c * A)`` where ``A < 0``; with rollout importance
    weights ``w``, ``pg = w * pg``; ``loss_tok = pg + beta * k3(ref, logp)`` with ``k3 = exp(ref - logp) - (ref -
    logp) - 1``; ``loss = agg(loss_tok) - entropy_coef * agg_H(entropy)``. The settings are one :class:`PolicyLoss`
    (its docstring lists them); ``PolicyLoss.trl(...)`` / ``PolicyLoss.verl(...)`` give TRL's and verl's losses
    exactly (docs/presets.md).

    Args:
        hidden: ``[B, L, H]`` last hidden states (``[B*L, H]`` also accepted). Rows where ``mask`` is 0 may hold
            anything, NaN and inf included: they reach neither the loss nor any gradient.
        weight: ``[V, H]`` LM-head weight (same dtype/device); ``bias`` optional ``[V]``.
        targets: ``[B, L]`` integer ids; any value where ``mask`` is 0 (padding), ``[0, V)`` elsewhere.
        advantages: ``[B]`` per sequence (broadcast over tokens) or ``[B, L]`` per token, finite; a constant of the
            loss (detached).
        mask: ``[B, L]`` bool, or 0/1 float / integer, the response tokens that count (other values are an error).
        old_logprobs: ``[B, L]`` log-probs of the behaviour policy (detached; ``<= 0`` where ``mask`` is 1, up to
            ``1e-4`` of rounding); None = on-policy (ratio 1, gradient flows).
        ref_logprobs: ``[B, L]`` reference log-probs for the k3 KL (needed when ``beta != 0``; detached; ``<= 0``).
        temperature: a finite float ``>= MIN_TEMPERATURE`` or a ``[B, L]`` per-token tensor, applied to the logits.
        rollout_is_weights: ``[B, L]`` per token or ``[B]`` per sequence, finite and ``>= 0``, detached: multiply the
            policy-gradient term of each token (not the KL or entropy terms), as verl's ``rollout_is_weights`` (TIS)
            and TRL's ``importance_sampling_ratio``. Make them with :func:`rollout_importance_weights` (or
            ``loss.rollout_is_weights(...)``) from the trainer's own ``old_logprobs`` and the rollout's log-probs.
        backend: for the fused log-prob op.
        loss: the loss settings, a :class:`PolicyLoss` (default ``PolicyLoss()``).
        **settings: the older form: :class:`PolicyLoss`'s fields as keywords (``clip_low=``, ``beta=``,
            ``aggregation=``, ...), validated the same way. Not together with ``loss=`` (a TypeError).

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and a dict of detached 0-dim tensors: ``kl`` (masked mean k3, 0
        without ``ref_logprobs``), ``clip_frac_low`` (A < 0 and ratio < 1 - clip_low), ``clip_frac_high`` (A > 0 and
        ratio > 1 + clip_high), ``dual_clip_frac``, ``ratio_mean``, ``entropy_mean``, ``logprob_mean``, and with
        ``rollout_is_weights`` ``rollout_is_mean`` (masked mean weight).
        With gradients enabled and ``importance_level="token"``, the gradients of ``hidden`` / ``weight`` / ``bias``
        are formed during this call (3 GEMMs per token chunk, no recomputation) and ``loss.backward()`` only scales
        them by the upstream scalar; GSPO's sequence-level ratio needs every token first, so it recomputes (4 GEMMs).
        The value checks cost one host sync (skipped under torch.compile, where the op's own checks still run).

    Example:
        >>> import torch, r4b_fast
        >>> h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(32, 8)
        >>> y, m = torch.randint(0, 32, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
        >>> settings = r4b_fast.PolicyLoss(clip_high=0.28, aggregation="seq-mean-token-mean")
        >>> loss, metrics = r4b_fast.fused_linear_policy_loss(h, w, y, torch.tensor([1.0, -1.0]), m, loss=settings)
        >>> loss.backward(); float(metrics["ratio_mean"])
        1.0
    """
    cfg = _resolve_settings(loss, settings)
    _validate_linear(hidden, weight, bias)
    _check_policy_inputs(hidden, targets, advantages, mask, old_logprobs, ref_logprobs, rollout_is_weights,
                         temperature, cfg)  # fmt: skip
    mask_b = mask if mask.dtype == torch.bool else mask != 0
    if not torch.compiler.is_compiling():  # value checks (one host sync); under compile only the op's checks run
        _check_policy_values(targets, mask, mask_b, advantages, old_logprobs, ref_logprobs, rollout_is_weights,
                             cfg.normaliser, weight.shape[0])  # fmt: skip
    batch = _PolicyBatch.build(targets, advantages, mask_b, old_logprobs, ref_logprobs, rollout_is_weights, cfg)
    ppo = cfg.token_constants()
    B, L = targets.shape
    temp = temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else temperature
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    fused = needs_grad and cfg.importance_level == "token"
    if fused:  # the loss is the last op: form its gradients during the forward (3 GEMMs), attach them below
        logp, entropy, grads = _fused_forward(hidden, weight, bias, temp, batch, ppo, backend)
    else:
        logp, entropy = fused_linear_logprobs(
            hidden.reshape(B * L, hidden.shape[-1]), weight, batch.targets.reshape(-1), bias=bias, temperature=temp,
            return_entropy=True, ignore_index=IGNORE, backend=backend,
        )  # fmt: skip
        logp, entropy = logp.view(B, L), entropy.view(B, L)
        if cfg.entropy_coef == 0:
            entropy = entropy.detach()
    value, ratio, dual_active, kl = _loss_value(logp, entropy, batch, cfg, ppo)
    if fused:
        value = _attach_grads_op(value.detach(), hidden, weight, bias, *grads)
    return value, _metrics(logp, entropy, ratio, dual_active, kl, batch, cfg)
