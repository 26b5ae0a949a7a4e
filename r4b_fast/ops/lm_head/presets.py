"""Presets: the ``PolicyLoss`` settings (and ``group_advantages`` arguments) that reproduce TRL 1.16's and verl 0.9.1's
losses exactly, from those trainers' own configuration names. Each is checked against the trainer's own function in
tests/test_parity.py; docs/presets.md has the table. A trainer setting these losses cannot reproduce is a ValueError
naming it, never an approximation."""

from __future__ import annotations

import math
from typing import Any

import torch

# TRL loss_type -> aggregation; its normaliser: "rows" (micro-batch rows x accumulation steps), "tokens" (micro-batch
# tokens x accumulation steps), "items" (the generation batch's tokens per process, rescaled to one accumulation window)
TRL_LOSS_TYPES = {"grpo": ("seq-mean-token-mean", "rows"), "dr_grpo": ("seq-mean-token-sum-norm", "rows"),
                  "luspo": ("seq-mean-token-sum", "rows"), "bnpo": ("token-mean", "tokens"),
                  "dapo": ("token-mean", "items")}  # fmt: skip
TRL_IS_MODES = {"token_truncate": "token", "sequence_truncate": "sequence"}
VERL_LOSS_MODES = ("vanilla", "gspo")
VERL_LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                       "seq-mean-token-sum-norm")  # fmt: skip
VERL_KL_TYPES = ("low_var_kl", "k3")  # verl's kl_penalty: both are k3 with the +-20 / +-10 clamps
VERL_LOG_RATIO_CLAMP = 20.0  # verl's vanilla loss clamps the log-ratio to +-20 before exp
VERL_GSPO_LOG_RATIO_CLAMP = (-math.inf, 10.0)  # verl's GSPO: the sequence log-ratio clamped at 10 from above
VERL_KL_CLAMPS = (20.0, 10.0)


def _count(value: Any, name: str):
    """A micro-batch count as given (a number or a one-element tensor), at least 1 (as TRL clamps it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().clamp(min=1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a count > 0 (a number or a one-element tensor), got {value!r}")
    return max(float(value), 1.0)


def _trl_normaliser(kind, k, num_sequences, num_tokens, num_items_in_batch, num_processes, steps_per_generation):
    """TRL's denominator for one micro-batch; None (the call's own count) where that is TRL's with ``k = 1``."""
    name, given = {"rows": ("num_sequences", num_sequences), "tokens": ("num_tokens", num_tokens),
                   "items": ("num_items_in_batch", num_items_in_batch)}[kind]  # fmt: skip
    whole = k == 1 and (kind != "items" or (num_processes, steps_per_generation) == (1, 1))
    if given is None:
        if whole:
            return None
        raise ValueError(f"{name}: needed with gradient accumulation or several processes (TRL divides this "
                         "loss_type by it); pass the micro-batch's count")
    if kind != "items":
        return _count(given, name) * k
    return _count(given, name) / num_processes * k / steps_per_generation


def _verl_normaliser(loss_agg_mode: str, info: dict) -> tuple[str, Any]:
    """``(aggregation, normaliser)`` as verl's ``agg_loss`` divides with ``global_batch_info``."""
    dp = info.get("dp_size") or 1
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    if info.get(key) is None:
        if dp > 1:
            raise ValueError(f"global_batch_info: {key} is needed when dp_size > 1 (as in verl)")
        return loss_agg_mode, None
    normaliser = info[key] / dp
    return loss_agg_mode, normaliser.detach().float() if isinstance(normaliser, torch.Tensor) else normaliser


def _rollout_is(level: str | None, cap: float | None) -> dict:
    """``PolicyLoss``'s rollout importance-sampling fields; none without a level (the default cap stays)."""
    return {} if level is None else {"rollout_is_level": level, "rollout_is_cap": cap}


class _Presets:
    """The trainer presets of ``PolicyLoss`` (a mixin: ``cls`` is ``PolicyLoss``)."""

    @classmethod
    def trl(
        cls,
        loss_type: str = "dapo",
        *,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        delta: float | None = None,
        importance_sampling_level: str = "token",
        max_completion_length: int | None = 256,
        entropy_coef: float = 0.0,
        gradient_accumulation_steps: int = 1,
        num_sequences: int | torch.Tensor | None = None,
        num_tokens: int | torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        num_processes: int = 1,
        steps_per_generation: int | None = None,
        vllm_importance_sampling_mode: str | None = None,
        vllm_importance_sampling_clip_max: float | None = 3.0,
    ):
        """The settings of TRL 1.16's ``GRPOTrainer`` loss for one micro-batch, from ``GRPOConfig``'s names.

        Args:
            loss_type: ``"grpo"``, ``"dr_grpo"``, ``"bnpo"``, ``"dapo"`` (TRL's default) or ``"luspo"``.
            epsilon, epsilon_high, beta, delta, importance_sampling_level, max_completion_length, entropy_coef: as in
                ``GRPOConfig`` (``delta``, two-sided clipping, must exceed ``1 + epsilon_high``).
            gradient_accumulation_steps: TRL's ``current_gradient_accumulation_steps`` (1 in evaluation).
            num_sequences: rows of the micro-batch (grpo, dr_grpo, luspo); num_tokens: its completion tokens (bnpo);
                num_items_in_batch, num_processes, steps_per_generation: TRL's (dapo; ``steps_per_generation``
                defaults to ``gradient_accumulation_steps``; pass 1 in evaluation). Numbers or one-element tensors.
                Omitted with one micro-batch and one process: the call's own count (for grpo / dr_grpo / luspo TRL
                also counts rows without tokens; pass ``num_sequences`` when a row can be empty).
            vllm_importance_sampling_mode: None (no vLLM correction), ``"token_truncate"`` or
                ``"sequence_truncate"`` with ``vllm_importance_sampling_clip_max``: the call then needs
                ``rollout_is_weights`` (``loss.rollout_is_weights(old, sampling_logprobs, mask)``).

        Returns:
            ``PolicyLoss``. TRL's ``temperature`` is the call's ``temperature=``.

        Example:
            >>> from r4b_fast import PolicyLoss
            >>> PolicyLoss.trl("grpo", epsilon_high=0.28, num_sequences=8, gradient_accumulation_steps=2).normaliser
            16.0
        """
        if loss_type not in TRL_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {tuple(TRL_LOSS_TYPES)} (TRL's cispo, sapo and vespo have "
                             f"no fused equivalent), got {loss_type!r}")
        k = gradient_accumulation_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"gradient_accumulation_steps: expected an int >= 1, got {k!r}")
        high = epsilon if epsilon_high is None else epsilon_high
        clamp = None
        if delta is not None:
            if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 1 + high:
                raise ValueError(f"delta: expected a float > 1 + epsilon_high = {1 + high} (below it TRL's two-sided "
                                 f"clip is not a log-ratio clamp), got {delta!r}")
            clamp = (-math.inf, math.log(delta))  # min(ratio, delta) on both sides of the clip
        aggregation, kind = TRL_LOSS_TYPES[loss_type]
        spg = k if steps_per_generation is None else steps_per_generation
        normaliser = _trl_normaliser(kind, k, num_sequences, num_tokens, num_items_in_batch, num_processes, spg)
        if vllm_importance_sampling_mode is not None and vllm_importance_sampling_mode not in TRL_IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode: expected None or one of {tuple(TRL_IS_MODES)} (the "
                             f"*_mask modes have no equivalent), got {vllm_importance_sampling_mode!r}")
        return cls(
            clip_low=epsilon, clip_high=high, beta=beta, entropy_coef=entropy_coef / k,
            entropy_aggregation="token-mean" if entropy_coef else None, aggregation=aggregation,
            normaliser=normaliser, max_length=max_completion_length if loss_type == "dr_grpo" else None,
            importance_level=importance_sampling_level, log_ratio_clamp=clamp,
            **_rollout_is(TRL_IS_MODES.get(vllm_importance_sampling_mode), vllm_importance_sampling_clip_max),
        )  # fmt: skip

    @classmethod
    def verl(
        cls,
        loss_mode: str = "vanilla",
        loss_agg_mode: str = "token-mean",
        *,
        clip_ratio: float = 0.2,
        clip_ratio_low: float | None = None,
        clip_ratio_high: float | None = None,
        clip_ratio_c: float = 3.0,
        use_kl_loss: bool = False,
        kl_loss_coef: float = 0.001,
        kl_loss_type: str = "low_var_kl",
        entropy_coeff: float = 0.0,
        global_batch_info: dict | None = None,
        loss_scale_factor: int | None = None,
        rollout_is: str | None = None,
        rollout_is_threshold: float | None = 2.0,
    ):
        """The settings of verl 0.9.1's actor loss (``policy_loss.loss_mode`` + ``agg_loss`` + ``kl_penalty`` as its
        ``ppo_loss`` composes them), from ``actor_rollout_ref.actor``'s names.

        Args:
            loss_mode: ``"vanilla"`` (dual clip ``clip_ratio_c``, log-ratio clamp +-20) or ``"gspo"`` (sequence
                ratio clamped at 10 from above, no dual clip).
            loss_agg_mode: verl's (``"token-sum"`` too).
            clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c, use_kl_loss, kl_loss_coef, kl_loss_type
                (``"low_var_kl"`` / ``"k3"``), entropy_coeff, loss_scale_factor: verl's actor config.
            global_batch_info: verl's per-micro-batch dict (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
                ``loss_scale_factor``), or None for one process.
            rollout_is, rollout_is_threshold: ``algorithm.rollout_correction``'s TIS (``"token"`` / ``"sequence"``):
                the call then needs ``rollout_is_weights`` (``loss.rollout_is_weights(old, rollout_log_probs, mask)``).

        Returns:
            ``PolicyLoss``.

        Example:
            >>> from r4b_fast import PolicyLoss
            >>> PolicyLoss.verl("vanilla", "token-sum", clip_ratio_high=0.28).normaliser
            1.0
        """
        if loss_mode not in VERL_LOSS_MODES:
            raise ValueError(f"loss_mode: expected one of {VERL_LOSS_MODES}, got {loss_mode!r}")
        if loss_agg_mode not in VERL_LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode: expected one of {VERL_LOSS_AGG_MODES}, got {loss_agg_mode!r}")
        if use_kl_loss and kl_loss_type not in VERL_KL_TYPES:
            raise ValueError(f"kl_loss_type: expected one of {VERL_KL_TYPES} with use_kl_loss, got {kl_loss_type!r}")
        info = dict(global_batch_info or {})
        aggregation, normaliser = _verl_normaliser(loss_agg_mode, info)
        scale = loss_scale_factor if loss_scale_factor is not None else info.get("loss_scale_factor")
        max_length = int(scale) if loss_agg_mode == "seq-mean-token-sum-norm" and scale is not None else None
        vanilla = loss_mode == "vanilla"
        kl_lr, kl_value = VERL_KL_CLAMPS if use_kl_loss else (None, None)
        return cls(
            clip_low=clip_ratio if clip_ratio_low is None else clip_ratio_low,
            clip_high=clip_ratio if clip_ratio_high is None else clip_ratio_high,
            dual_clip=clip_ratio_c if vanilla else None, beta=kl_loss_coef if use_kl_loss else 0.0,
            entropy_coef=entropy_coeff, aggregation=aggregation, normaliser=normaliser, max_length=max_length,
            importance_level="token" if vanilla else "sequence",
            log_ratio_clamp=VERL_LOG_RATIO_CLAMP if vanilla else VERL_GSPO_LOG_RATIO_CLAMP,
            kl_log_ratio_clamp=kl_lr, kl_clamp=kl_value, **_rollout_is(rollout_is, rollout_is_threshold),
        )  # fmt: skip

    @staticmethod
    def trl_advantages(scale_rewards: str | bool = "group") -> dict:
        """``group_advantages`` arguments that give TRL 1.16's advantages (``scale_rewards`` ``"group"`` / ``"batch"``
        / ``"none"``, or the older True / False): ``group_advantages(rewards, num_generations, **these)``.

        Example:
            >>> from r4b_fast import PolicyLoss
            >>> PolicyLoss.trl_advantages("batch")
            {'scale': 'batch', 'eps': 0.0001}
        """
        scale = ("group" if scale_rewards else "none") if isinstance(scale_rewards, bool) else scale_rewards
        if scale not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: expected 'group', 'batch', 'none' or a bool, got {scale_rewards!r}")
        return {"scale": scale, "eps": 1e-4}

    @staticmethod
    def verl_advantages(adv_estimator: str = "grpo", norm_adv_by_std_in_grpo: bool = True) -> dict:
        """``group_advantages`` arguments that give verl 0.9.1's ``algorithm.adv_estimator`` (``"grpo"``,
        ``"grpo_vectorized"``, ``"rloo"``): ``group_advantages(rewards, group_index=uid ids, **these)``.

        Example:
            >>> from r4b_fast import PolicyLoss
            >>> PolicyLoss.verl_advantages("grpo", norm_adv_by_std_in_grpo=False)
            {'estimator': 'drgrpo', 'singleton': 'verl'}
        """
        if adv_estimator in ("grpo", "grpo_vectorized"):
            return {"estimator": "grpo" if norm_adv_by_std_in_grpo else "drgrpo", "singleton": "verl"}
        if adv_estimator == "rloo":
            return {"estimator": "rloo", "singleton": "verl"}
        raise ValueError(f"adv_estimator: expected 'grpo', 'grpo_vectorized' or 'rloo', got {adv_estimator!r}")
