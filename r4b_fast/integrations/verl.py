"""BPO inside verl (tested with verl 0.9.1), through verl's own registries; ``pip install "r4b_fast[verl]"``.

Importing this module registers three names with verl (or load it in every verl process with
``VERL_USE_EXTERNAL_MODULES=r4b_fast.integrations.verl``, which ``import verl`` honours in the driver and the Ray
workers alike):

- ``algorithm.adv_estimator=bpo``: :func:`compute_bpo_outcome_advantage`, registered with ``register_adv_est``.
  R-4B's advantage: GRPO-normalised over the *mixed* group of every rollout of a prompt (verl's ``uid``), computed
  by ``r4b_fast.group_advantages(estimator="bpo")`` (float64, two-pass variance, all-equal groups exactly 0).
- ``actor_rollout_ref.actor.policy_loss.loss_mode=r4b_bpo``: :func:`compute_policy_loss_r4b`, registered with
  ``register_policy_loss``: the project's clipped loss (the per-token math of ``fused_linear_policy_loss``) on the
  log-probs verl's actor hands to every registered loss; with verl's defaults it equals verl's ``vanilla`` loss
  (dual clip ``clip_ratio_c``, log-ratio clamp +-20, ``rollout_is_weights``, every ``loss_agg_mode`` and
  ``global_batch_info``).
- ``agent_name=r4b_bpo_agent``: :class:`BPOModeAgentLoop`, registered with verl's agent-loop registry: verl's
  single-turn loop with the mode prefix appended after the generation prompt, thinking (``<think>\\n``) for the first
  half of each prompt's ``rollout.n`` samples and non-thinking (``<think>\\n\\n</think>\\n\\n``) for the second.

Why an agent loop and not prompt duplication in the dataset: verl gives every dataset row its own ``uid`` (a
``uuid4`` per row, before ``rollout.n`` repeats it) and the advantage estimator sees nothing but that ``uid`` to
group by. A thinking copy and a non-thinking copy of a prompt would be two rows, two uids, two single-mode groups:
GRPO per mode, not BPO. Forcing the mode at rollout time keeps all ``n = 2g`` rollouts of a prompt under one uid,
so verl's own grouping is R-4B's mixed group.

What verl's extension points do not allow (0.9.1):

- Per-mode statistics inside ``compute_advantage``: verl passes a registered estimator only ``token_level_rewards``,
  ``response_mask``, ``index`` (the uid) and ``config`` (its built-in ``gdpo`` alone gets the non-tensor batch), so the
  estimator cannot see the rollout's mode. BPO's advantage does not need it (the normalisation is over the mixed
  group); the agent loop records each rollout's mode in the non-tensor column ``bpo_mode`` and
  :func:`bpo_mode_metrics` computes per-mode reward, length and advantage from a batch that holds it. Called
  directly with ``modes=``, the estimator also checks that every group is mixed.
- The fused LM-head loss: a registered policy loss receives ``log_prob`` from the actor's forward, which has already
  formed the ``[T, V]`` logits. Skipping them needs an actor / engine whose forward returns the last hidden states;
  such a custom actor calls :func:`fused_policy_loss_for_verl` with verl's actor config, which maps it to the same
  ``fused_linear_policy_loss`` arguments (same loss and gradients as the registered loss, tested). verl's
  extension point for such an actor is its ``EngineRegistry`` (a subclass of its FSDP engine whose forward stops at
  the last hidden states); that engine is not part of this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:
    from verl.experimental.agent_loop.agent_loop import register as register_agent_loop
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
except ImportError as e:  # verl, or one of the packages its core imports, is missing
    raise ImportError(
        f"r4b_fast.integrations.verl needs verl 0.9.1 and its core's imports ({e}); install them with "
        '`pip install "r4b_fast[verl]"`, or on a CPU machine `pip install --no-deps verl==0.9.1` plus the packages '
        "listed in README.md (section 'BPO inside verl')"
    ) from e

from r4b_fast.models.r4b import THINKING_MODE_OF, THINKING_MODE_PREFIX
from r4b_fast.modes import Mode
from r4b_fast.ops.group_advantages import group_advantages
from r4b_fast.ops.lm_head import PolicyLoss, fused_linear_policy_loss
from r4b_fast.ops.lm_head.token_loss import _PPO, _log_ratio_bounds, _ppo_token_loss, _token_weights

ADV_ESTIMATOR = "bpo"
POLICY_LOSS = "r4b_bpo"
AGENT_LOOP = "r4b_bpo_agent"
MODE_FIELD = "bpo_mode"  # non-tensor column: the rollout's forced mode ("think" / "no_think"), or a row's request

# verl's vanilla loss clamps the log-ratio to +-20 before exp (and its dual clip defaults to clip_ratio_c = 3.0)
VERL_LOG_RATIO_CLAMP = 20.0
VERL_CLIP_RATIO_C = 3.0
MODE_NAMES = {Mode.THINK: "think", Mode.NO_THINK: "no_think", Mode.AUTO: "auto"}
_MODE_OF_NAME = {name: mode for mode, name in MODE_NAMES.items()}


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's dataclass configs, DictConfigs and plain dicts alike (None when absent)."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # a dataclass whose .get is not a mapping's
            pass
    return getattr(config, key, default)


def modes_from_field(values: Any) -> torch.Tensor:
    """A ``bpo_mode`` column (``"think"`` / ``"no_think"`` / ``"auto"``, or ``r4b_fast.Mode`` ints) as ``[N]`` int64.

    Example:
        >>> modes_from_field(np.array(["think", "no_think"], dtype=object)).tolist()
        [1, 0]
    """
    out = []
    for i, v in enumerate(np.asarray(values, dtype=object).reshape(-1).tolist()):
        if isinstance(v, str) and v in _MODE_OF_NAME:
            out.append(int(_MODE_OF_NAME[v]))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) in set(Mode):
            out.append(int(v))
        else:
            raise ValueError(f"{MODE_FIELD}: row {i} holds {v!r}; expected one of {sorted(_MODE_OF_NAME)} or a "
                             "r4b_fast.Mode value")
    return torch.tensor(out, dtype=torch.int64)


def _group_ids(index: Any, n: int) -> tuple[torch.Tensor, int]:
    """verl's uid array (any hashable ids) as dense group ids ``0..G-1`` in order of first appearance."""
    ids = list(np.asarray(index, dtype=object).reshape(-1).tolist())
    if len(ids) != n:
        raise ValueError(f"index: {len(ids)} uids for {n} rollouts (token_level_rewards rows)")
    first: dict[Any, int] = {}
    dense = [first.setdefault(u, len(first)) for u in ids]
    return torch.tensor(dense, dtype=torch.int64), len(first)


@register_adv_est(ADV_ESTIMATOR)
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


# ----------------------------------------------------------------------------------------------------------------
# The policy loss
# ----------------------------------------------------------------------------------------------------------------
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


@register_policy_loss(POLICY_LOSS)
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


# ----------------------------------------------------------------------------------------------------------------
# Mode forcing on the rollout side
# ----------------------------------------------------------------------------------------------------------------
def bpo_mode_for_sample(priority: int, n: int) -> Mode:
    """The forced mode of one rollout: thinking for the first ``n / 2`` samples of its prompt, non-thinking after.

    verl (0.9.1) repeats each prompt ``n`` times interleaved (``repeat(n, interleave=True)``) and its agent-loop
    manager numbers the repeated batch ``priority = 0 .. len - 1`` before splitting it across workers, so sample
    ``priority`` is replica ``priority % n`` of its prompt, wherever it runs.

    Example:
        >>> [bpo_mode_for_sample(p, 4).name for p in range(4)]
        ['THINK', 'THINK', 'NO_THINK', 'NO_THINK']
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
        raise ValueError(f"actor_rollout_ref.rollout.n: BPO needs an even number of samples per prompt (g thinking "
                         f"+ g non-thinking), got {n!r}")
    return Mode.THINK if int(priority) % int(n) < int(n) // 2 else Mode.NO_THINK


@register_agent_loop(AGENT_LOOP)
class BPOModeAgentLoop(SingleTurnAgentLoop):
    """verl agent loop ``"r4b_bpo_agent"``: single-turn generation forced into thinking or non-thinking mode.

    The mode prefix (``MODE_PREFIX``: R-4B's ``<think>\\n`` / ``<think>\\n\\n</think>\\n\\n``) is appended to the prompt
    tokens after the chat template's generation prompt, so it is prompt, not response: the policy is trained on what
    it writes after the forced decision. Half of each prompt's ``rollout.n`` samples think
    (:func:`bpo_mode_for_sample`); a row may instead request a mode in its own ``bpo_mode`` column. Each output
    carries its mode in ``extra_fields["bpo_mode"]`` (the batch's ``bpo_mode`` column, for :func:`bpo_mode_metrics`).

    Use it for the training data only (the column ``agent_name = "r4b_bpo_agent"``, e.g. :func:`add_bpo_agent_column`),
    and leave validation on verl's ``single_turn_agent`` so that evaluation measures auto mode. Subclass and change
    ``MODE_PREFIX`` for another template (e.g. Qwen3's ``enable_thinking`` strings).

    Example:
        >>> # data.train_files=bpo_train.parquet (agent_name column) with
        >>> # VERL_USE_EXTERNAL_MODULES=r4b_fast.integrations.verl and actor_rollout_ref.rollout.n=8
    """

    MODE_PREFIX = {Mode.THINK: THINKING_MODE_PREFIX[THINKING_MODE_OF[Mode.THINK]],
                   Mode.NO_THINK: THINKING_MODE_PREFIX[THINKING_MODE_OF[Mode.NO_THINK]]}

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any):
        requested = kwargs.pop(MODE_FIELD, None)
        if requested is not None:
            mode = Mode(int(modes_from_field([requested])[0]))
            if mode not in self.MODE_PREFIX:
                raise ValueError(f"{MODE_FIELD}: {requested!r} is not a forced mode (think / no_think)")
        else:
            mode = bpo_mode_for_sample(priority, self.rollout_config.n)
        self._bpo_prefix_ids = list(self.tokenizer.encode(self.MODE_PREFIX[mode], add_special_tokens=False))
        output = await super().run(sampling_params, priority=priority, **kwargs)
        output.extra_fields[MODE_FIELD] = MODE_NAMES[mode]
        return output

    async def ct_build_initial_tokens(self, *args: Any, **kwargs: Any) -> list[int]:
        prompt_ids = list(await super().ct_build_initial_tokens(*args, **kwargs)) + self._bpo_prefix_ids
        if len(prompt_ids) > self.rollout_config.prompt_length:
            raise ValueError(
                f"actor_rollout_ref.rollout.prompt_length: the prompt with its {len(self._bpo_prefix_ids)}-token mode "
                f"prefix has {len(prompt_ids)} tokens, over prompt_length={self.rollout_config.prompt_length}; raise "
                "it by the prefix length (data.max_prompt_length stays as it is)"
            )
        return prompt_ids


def add_bpo_agent_column(frame: Any) -> Any:
    """A copy of a verl RL dataset frame (pandas, one row per prompt) whose rows run :class:`BPOModeAgentLoop`.

    Sets the ``agent_name`` column that verl's agent-loop manager reads per row to ``"r4b_bpo_agent"``; rows are
    not duplicated (see the module docstring).

    Example:
        >>> import pandas as pd
        >>> add_bpo_agent_column(pd.DataFrame({"prompt": ["a"]}))["agent_name"].tolist()
        ['r4b_bpo_agent']
    """
    if not hasattr(frame, "assign") or not hasattr(frame, "columns"):
        raise TypeError(f"frame: expected a pandas DataFrame, got {type(frame).__name__}")
    return frame.assign(agent_name=AGENT_LOOP)
