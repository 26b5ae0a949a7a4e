"""``PolicyLoss``: every setting of :func:`fused_linear_policy_loss` in one frozen dataclass, validated once.

Build one directly, or from a trainer's configuration with the presets (``PolicyLoss.trl(...)``,
``PolicyLoss.verl(...)``, see ``presets.py`` and docs/presets.md), and pass it as ``loss=``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from r4b_fast.ops.lm_head.importance import IS_LEVELS, rollout_importance_weights
from r4b_fast.ops.lm_head.presets import _Presets
from r4b_fast.ops.lm_head.token_loss import _PPO, _log_ratio_bounds

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


@dataclass(frozen=True)
class PolicyLoss(_Presets):
    """The settings of the clipped GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss (:func:`fused_linear_policy_loss`).

    Per token: ``ratio = exp(clamp(logp - old, log_ratio_clamp))``, ``pg = max(-A * ratio, -A * clip(ratio,
    1 - clip_low, 1 + clip_high))``, with ``dual_clip = c``: ``pg = min(pg, -c * A)`` where ``A < 0``; ``loss_tok = w_is
    * pg + beta * k3``; ``loss = agg(loss_tok) - entropy_coef * agg_H(entropy)``.

    Attributes:
        clip_low, clip_high: the clip range ``[1 - clip_low, 1 + clip_high]``, finite floats ``>= 0``, ``clip_low <
            1`` (``clip_high > clip_low`` is DAPO's clip-higher).
        dual_clip: ``c > 1`` (verl's ``clip_ratio_c``, e.g. 3.0) or None.
        beta: weight of the k3 KL to the reference policy (needs ``ref_logprobs`` at the call), ``>= 0``.
        entropy_coef: weight of the entropy bonus, ``>= 0``.
        aggregation: verl's ``loss_agg_mode``: ``"token-mean"`` (sum / masked tokens, DAPO), ``"seq-mean-token-mean"``
            (GRPO), ``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"`` (Dr.GRPO: token sum / ``max_length``, then
            mean over sequences). Sequence means run over sequences with at least one masked token.
        entropy_aggregation: how the entropy bonus is averaged: None as ``aggregation`` with ``normaliser`` (verl's
            ``entropy_coeff``), or one of the aggregations over the call's tokens without ``normaliser``
            (``"token-mean"``: TRL's bonus).
        normaliser: replaces the aggregation's denominator (global token or sequence count under gradient
            accumulation): a finite number > 0, or a one-element tensor (its value is checked at the call, in the
            call's one host sync). None: the call's own count.
        max_length: the constant length of ``seq-mean-token-sum-norm`` (None: the call's ``L``).
        importance_level: ``"token"`` (PPO / GRPO) or ``"sequence"`` (GSPO).
        log_ratio_clamp: clamp of ``logp - old`` before ``exp``: ``c > 0`` for ``[-c, c]`` (verl's vanilla: 20.0), a
            pair ``(low, high)`` with ``low <= 0 <= high`` (either may be infinite; verl's GSPO: ``(-inf, 10.0)``), or
            None.
        kl_log_ratio_clamp, kl_clamp: verl's k3 clamps (``ref - logp`` to ``+-20`` before ``exp``, the value to
            ``+-10``): finite floats ``> 0`` or None.
        rollout_is_level, rollout_is_cap: rollout importance sampling (verl's TIS, TRL's vLLM correction): the call
            must then be given ``rollout_is_weights`` (make them with :meth:`rollout_is_weights`). None: the call's
            ``rollout_is_weights``, if any, are used as given.

    Example:
        >>> from r4b_fast import PolicyLoss
        >>> PolicyLoss(clip_high=0.28, aggregation="token-mean").clip_high
        0.28
        >>> PolicyLoss(clip_low=1.5)
        Traceback (most recent call last):
        ...
        ValueError: clip_low: must be < 1 (the ratio is clipped to 1 - clip_low > 0), got 1.5
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    entropy_aggregation: str | None = None
    normaliser: float | torch.Tensor | None = None
    max_length: int | None = None
    importance_level: str = "token"
    log_ratio_clamp: float | tuple[float, float] | None = None
    kl_log_ratio_clamp: float | None = None
    kl_clamp: float | None = None
    rollout_is_level: str | None = None
    rollout_is_cap: float | None = 2.0

    def __post_init__(self):
        self._check_choices()
        self._log_ratio_bounds()
        for name in ("kl_log_ratio_clamp", "kl_clamp"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite float > 0 (verl: 20.0 / 10.0) or None, got {v!r}")
        for name in ("beta", "clip_low", "clip_high", "entropy_coef"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low: must be < 1 (the ratio is clipped to 1 - clip_low > 0), got {self.clip_low}")
        if self.dual_clip is not None and not (_is_number(self.dual_clip) and 1 < self.dual_clip < math.inf):
            raise ValueError(f"dual_clip: expected a float > 1 (verl's clip_ratio_c, e.g. 3.0) or None, got "
                             f"{self.dual_clip!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise ValueError(f"max_length: expected a positive int, got {self.max_length!r}")
        self._check_normaliser()
        cap = self.rollout_is_cap
        if cap is not None and not (_is_number(cap) and cap > 0):  # NaN fails cap > 0
            raise ValueError(f"rollout_is_cap: expected a float > 0 (verl's rollout_is_threshold, default 2.0) or "
                             f"None, got {cap!r}")

    def _check_choices(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.entropy_aggregation is not None and self.entropy_aggregation not in AGGREGATIONS:
            raise ValueError(f"entropy_aggregation: expected None or one of {AGGREGATIONS}, got "
                             f"{self.entropy_aggregation!r}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_level: expected one of {IMPORTANCE_LEVELS}, got {self.importance_level!r}")
        if self.rollout_is_level is not None and self.rollout_is_level not in IS_LEVELS:
            raise ValueError(f"rollout_is_level: expected None or one of {IS_LEVELS}, got {self.rollout_is_level!r}")

    def _check_normaliser(self):
        n = self.normaliser
        if n is None:
            return
        if isinstance(n, torch.Tensor):
            if n.numel() != 1:
                raise ValueError(f"normaliser: expected a scalar, got shape {tuple(n.shape)}")
            if n.dtype.is_complex or n.dtype == torch.bool:
                raise TypeError(f"normaliser: expected a real number, got dtype {n.dtype}")
        elif not _is_number(n) or not math.isfinite(n) or not n > 0:
            raise ValueError(f"normaliser: expected a finite number > 0, got {n!r}")

    def _log_ratio_bounds(self) -> tuple[float | None, float | None]:
        """``log_ratio_clamp`` as ``(low, high)`` (None: unbounded); raises ValueError when malformed."""
        return _log_ratio_bounds(self.log_ratio_clamp)

    def token_constants(self) -> _PPO:
        """The per-token constants of the loss (what the fused gradient op receives)."""
        low, high = self._log_ratio_bounds()

        def opt(v):
            return None if v is None else float(v)

        return _PPO(float(self.clip_low), float(self.clip_high), opt(self.dual_clip), float(self.beta),
                    float(self.entropy_coef), low, high, opt(self.kl_log_ratio_clamp), opt(self.kl_clamp))  # fmt: skip

    def replace(self, **changes) -> PolicyLoss:
        """A copy with ``changes`` (validated again), e.g. a new ``normaliser`` for the next micro-batch."""
        return dataclasses.replace(self, **changes)

    def rollout_is_weights(self, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor | None:
        """The rollout importance weights these settings ask for (``rollout_importance_weights(old_logprobs,
        rollout_logprobs, mask, cap=rollout_is_cap, level=rollout_is_level)``), or None without ``rollout_is_level``.
        """
        if self.rollout_is_level is None:
            return None
        return rollout_importance_weights(old_logprobs, rollout_logprobs, mask, cap=self.rollout_is_cap,
                                          level=self.rollout_is_level)  # fmt: skip


SETTINGS = tuple(f.name for f in dataclasses.fields(PolicyLoss))
