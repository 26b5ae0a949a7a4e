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

The code: :mod:`~r4b_fast.integrations.verl_common` (the registered names, the ``bpo_mode`` column, config access),
:mod:`~r4b_fast.integrations.verl_advantage` (the estimator, :func:`bpo_mode_metrics`),
:mod:`~r4b_fast.integrations.verl_loss` (the policy loss, the fused path), :mod:`~r4b_fast.integrations.verl_rollout`
(the agent loop); this module registers them with verl, once, when it is imported.
"""

from __future__ import annotations

try:  # verl_rollout imports SingleTurnAgentLoop: checked here for the message below
    from verl.experimental.agent_loop.agent_loop import register as register_agent_loop
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop  # noqa: F401
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
except ImportError as e:  # verl, or one of the packages its core imports, is missing
    raise ImportError(
        f"r4b_fast.integrations.verl needs verl 0.9.1 and its core's imports ({e}); install them with "
        '`pip install "r4b_fast[verl]"`, or on a CPU machine `pip install --no-deps verl==0.9.1` plus the packages '
        "listed in README.md (section 'BPO inside verl')"
    ) from e

from r4b_fast.integrations.verl_advantage import _group_ids as _group_ids
from r4b_fast.integrations.verl_advantage import bpo_mode_metrics, compute_bpo_outcome_advantage
from r4b_fast.integrations.verl_common import _MODE_OF_NAME as _MODE_OF_NAME
from r4b_fast.integrations.verl_common import (
    ADV_ESTIMATOR,
    AGENT_LOOP,
    MODE_FIELD,
    MODE_NAMES,
    POLICY_LOSS,
    modes_from_field,
)
from r4b_fast.integrations.verl_common import _cfg_get as _cfg_get
from r4b_fast.integrations.verl_loss import (
    VERL_CLIP_RATIO_C,
    VERL_LOG_RATIO_CLAMP,
    compute_policy_loss_r4b,
    fused_policy_loss_for_verl,
    policy_loss_from_logprobs,
    verl_policy_loss,
    verl_policy_loss_kwargs,
)
from r4b_fast.integrations.verl_loss import _verl_metrics as _verl_metrics
from r4b_fast.integrations.verl_rollout import BPOModeAgentLoop, add_bpo_agent_column, bpo_mode_for_sample

__all__ = [
    "ADV_ESTIMATOR", "AGENT_LOOP", "MODE_FIELD", "MODE_NAMES", "POLICY_LOSS", "VERL_CLIP_RATIO_C",
    "VERL_LOG_RATIO_CLAMP", "BPOModeAgentLoop", "add_bpo_agent_column", "bpo_mode_for_sample", "bpo_mode_metrics",
    "compute_bpo_outcome_advantage", "compute_policy_loss_r4b", "fused_policy_loss_for_verl", "modes_from_field",
    "policy_loss_from_logprobs", "verl_policy_loss", "verl_policy_loss_kwargs",
]  # fmt: skip

# The registrations, once, at import. verl's agent-loop registry records a class as ``__module__.__qualname__`` and
# its workers import that path: the loop's public home is this module, so a worker that builds the loop imports it
# and registers the estimator and the loss too.
register_adv_est(ADV_ESTIMATOR)(compute_bpo_outcome_advantage)
register_policy_loss(POLICY_LOSS)(compute_policy_loss_r4b)
BPOModeAgentLoop.__module__ = __name__
register_agent_loop(AGENT_LOOP)(BPOModeAgentLoop)

# doctest finds only what a module defines: list the moved functions so that ``DocTestFinder().find`` on this module
# still runs their examples
__test__ = {fn.__name__: fn for fn in (
    modes_from_field, compute_bpo_outcome_advantage, bpo_mode_metrics, verl_policy_loss, verl_policy_loss_kwargs,
    policy_loss_from_logprobs, compute_policy_loss_r4b, fused_policy_loss_for_verl, bpo_mode_for_sample,
    add_bpo_agent_column,
)}  # fmt: skip
