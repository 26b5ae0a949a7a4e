"""README's "Reproducing a trainer's loss": every row of the table, our call against that trainer's own function on
random inputs, loss and gradients (of the LM head's input and weight) within fp32 precision.

TRL 1.16: ``GRPOTrainer._compute_loss`` itself, called on a stand-in ``self`` whose per-token log-probs / entropies
come from an eager LM head over the same hidden states. verl 0.9.1: ``get_policy_loss_fn(loss_mode)`` +
``agg_loss`` + ``kl_penalty`` composed as ``verl.workers.utils.losses.ppo_loss`` composes them, and the advantage
estimators / rollout-correction helpers themselves. Skipped with a reason where the trainer is not installed."""

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r4b_fast import (
    PolicyLoss,
    fused_linear_policy_loss,
    group_advantages,
    logprob_mismatch,
    rollout_importance_weights,
)

B, L, H, V = 5, 7, 8, 37
GA = 2  # TRL's gradient-accumulation steps (and steps_per_generation): exercises its normalisers


def _case(seed=0, extreme=25.0):
    """Random inputs; ``extreme``: one log-ratio of +extreme, one of -(extreme + 5), one ref log-ratio of +extreme
    (100 overflows exp in float32: what verl's clamps are for). Old, ref and rollout log-probs stay log-probabilities
    (<= 0): the targets of row 1 and of position (3, 0) are made unlikely (log-prob <= -(extreme + 25), their hidden
    state scaled), so that the old / ref log-probs can sit far above them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.75
    mask[:, 0] = True
    mask[0, 1] = mask[1, 2] = mask[2, 3] = True
    far = torch.zeros(B, L, dtype=torch.bool)
    far[1], far[3, 0] = True, True
    with torch.no_grad():
        logits = h @ w.T
        y = torch.where(far, logits.argmin(-1), y)
        h = h * torch.where(far, (extreme + 25) / (logits.amax(-1) - logits.amin(-1)), 1.0)[..., None]
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    assert (logp[far] <= -(extreme + 25) + 1e-3).all()
    old = (logp + 0.3 * torch.randn(B, L, generator=g)).clamp(max=0.0)  # ratios across the clip range
    old[0, 1], old[1, 2], old[2, 3] = logp[0, 1] - extreme, logp[1, 2] + extreme + 5, logp[2, 3] - 1.5  # dual clip
    ref = (logp + 0.3 * torch.randn(B, L, generator=g)).clamp(max=0.0)
    ref[3, 0] = logp[3, 0] + extreme  # k3's clamps
    adv = torch.randn(B, generator=g)
    adv[2] = -1.0
    rollout = (old + 0.4 * torch.randn(B, L, generator=g)).clamp(max=0.0)  # a rollout engine's log-probs
    return dict(h=h, w=w, y=y, mask=mask, old=old, ref=ref, adv=adv, rollout=rollout)


def _eager_head(h, w, y):
    logsm = torch.log_softmax(h @ w.T, -1)
    return logsm.gather(-1, y[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _ours(c, loss, **kw):
    """Our loss with the preset's settings ``loss``, and its gradients of the LM head's input and weight."""
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    value, _ = fused_linear_policy_loss(h, w, c["y"], c["adv"], c["mask"], old_logprobs=c["old"], loss=loss, **kw)
    return value.detach(), torch.autograd.grad(value, (h, w))


def _assert_same(ours, peer):
    (loss, grads), (peer_loss, peer_grads) = ours, peer
    torch.testing.assert_close(loss, peer_loss.detach().float(), rtol=1e-5, atol=1e-6)
    for g, pg in zip(grads, peer_grads):
        torch.testing.assert_close(g, pg.float(), rtol=1e-4, atol=1e-6)


def _assert_sets(loss, expected):
    """The preset sets what docs/presets.md says it sets."""
    for name, want in expected.items():
        got = getattr(loss, name)
        if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
            torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want).float(), msg=name)
        else:
            assert got == want, (name, got, want)


# ----------------------------------------------------------------------------------------------------------------
# TRL 1.16
# ----------------------------------------------------------------------------------------------------------------
def _trl_is_ratio(c, mode, clip_max):
    """TRL's ``importance_sampling_ratio`` for ``*_truncate`` as TRL forms it: ``[B, L]`` per token, ``[B, 1]`` per
    sequence (``clip_min=None``)."""
    d = (c["old"] - c["rollout"]) * c["mask"]
    if mode == "sequence_truncate":
        d = d.sum(-1, keepdim=True)
    return torch.clamp(torch.exp(d), max=clip_max)


def _trl_loss(c, config):
    """TRL's own ``GRPOTrainer._compute_loss`` with the ``GRPOConfig`` settings ``config`` on our inputs: ``(loss,
    (d/dh, d/dw))``."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL not installed (pip install trl==1.16.0)")
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    mask = c["mask"].long()
    beta, entropy_coef = config.get("beta", 0.0), config.get("entropy_coef", 0.0)
    is_mode = config.get("vllm_importance_sampling_mode")

    def per_token(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_):
        logp, ent = _eager_head(h, w, c["y"])
        return logp, (ent if compute_entropy else None), None

    acc = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x)  # fmt: skip
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=config.get("importance_sampling_level", "token"), beta=beta,
        loss_type=config["loss_type"], epsilon_low=TRL_CLIP["epsilon"], epsilon_high=TRL_CLIP["epsilon_high"],
        args=SimpleNamespace(use_bias_correction_kl=False, delta=config.get("delta"), steps_per_generation=GA),
        use_vllm=is_mode is not None, vllm_importance_sampling_correction=is_mode is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=GA, accelerator=acc,
        max_completion_length=L + 3, _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                  completion_ids=c["y"], completion_mask=mask, advantages=c["adv"], old_per_token_logps=c["old"],
                  num_items_in_batch=mask.sum() * GA)  # fmt: skip
    if beta:
        inputs["ref_per_token_logps"] = c["ref"]
    if is_mode is not None:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(c, is_mode, config["vllm_importance_sampling_clip_max"])
        assert (inputs["importance_sampling_ratio"] == config["vllm_importance_sampling_clip_max"]).any()
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, torch.autograd.grad(loss, (h, w))


TRL_CLIP = dict(epsilon=0.2, epsilon_high=0.28)


def _trl_preset(c, config):
    """``PolicyLoss.trl`` with the row's ``GRPOConfig`` settings and this micro-batch's counts, as a trainer calls it
    (``_trl_loss``'s TRL runs 2 accumulation steps, steps_per_generation 2, max_completion_length L + 3)."""
    return PolicyLoss.trl(**config, **TRL_CLIP, max_completion_length=L + 3, gradient_accumulation_steps=GA,
                          num_sequences=B, num_tokens=c["mask"].sum(), num_items_in_batch=c["mask"].sum() * GA,
                          steps_per_generation=GA)  # fmt: skip


TRL_ROWS = {
    # row: (GRPOConfig settings, what the preset sets (c: the inputs))
    "grpo": (dict(loss_type="grpo", beta=0.04),
             lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, beta=0.04)),
    "bnpo": (dict(loss_type="bnpo"), lambda c: dict(aggregation="token-mean", normaliser=c["mask"].sum() * GA)),
    "dr_grpo": (dict(loss_type="dr_grpo"), lambda c: dict(aggregation="seq-mean-token-sum-norm", max_length=L + 3,
                                                          normaliser=B * GA)),
    "dapo": (dict(loss_type="dapo", beta=0.04), lambda c: dict(aggregation="token-mean", beta=0.04,
                                                              normaliser=c["mask"].sum() * GA)),
    "gspo (grpo, importance_sampling_level=sequence)": (
        dict(loss_type="grpo", importance_sampling_level="sequence"),
        lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, importance_level="sequence")),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"),
              lambda c: dict(aggregation="seq-mean-token-sum", normaliser=B * GA, importance_level="sequence")),
    "grpo + entropy_coef": (
        dict(loss_type="grpo", entropy_coef=0.05),
        lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, entropy_coef=0.05 / GA,
                       entropy_aggregation="token-mean")),
    "dapo + vLLM importance sampling (token_truncate)": (
        dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.5),
        lambda c: dict(aggregation="token-mean", normaliser=c["mask"].sum() * GA, rollout_is_level="token",
                       rollout_is_cap=1.5)),
    "grpo + vLLM importance sampling (sequence_truncate)": (
        dict(loss_type="grpo", vllm_importance_sampling_mode="sequence_truncate",
             vllm_importance_sampling_clip_max=1.2),
        lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, rollout_is_level="sequence",
                       rollout_is_cap=1.2)),
    "dapo + delta (two-sided clipping)": (
        dict(loss_type="dapo", delta=1.5), lambda c: dict(log_ratio_clamp=(-math.inf, math.log(1.5)))),
}


@pytest.mark.parametrize("row", list(TRL_ROWS))
def test_trl_loss_types(row):
    c = _case(1)
    config, expected = TRL_ROWS[row]
    peer = _trl_loss(c, config)
    loss = _trl_preset(c, config)
    _assert_sets(loss, dict(clip_low=0.2, clip_high=0.28, **expected(c)))
    kw = dict(ref_logprobs=c["ref"]) if loss.beta else {}
    if loss.rollout_is_level is not None:  # the weights the preset asks for, from the rollout's log-probs
        kw["rollout_is_weights"] = loss.rollout_is_weights(c["old"], c["rollout"], c["mask"])
    _assert_same(_ours(c, loss, **kw), peer)


def test_trl_preset_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        PolicyLoss.trl("cispo")
    with pytest.raises(ValueError, match="delta: expected a float > 1 \\+ epsilon_high"):
        PolicyLoss.trl("dapo", epsilon_high=0.28, delta=1.2)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        PolicyLoss.trl("dapo", vllm_importance_sampling_mode="sequence_mask")
    with pytest.raises(ValueError, match="num_sequences: needed"):
        PolicyLoss.trl("grpo", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="num_items_in_batch: needed"):
        PolicyLoss.trl("dapo", num_processes=2)
    # one micro-batch, one process: the call's own count is TRL's
    assert PolicyLoss.trl("bnpo").normaliser is None


def test_trl_advantages_eps():
    """TRL's group advantages (``_generate_and_score_completions``, scale_rewards "group" / "batch"): its lines with
    its own ``nanstd``, against ``group_advantages(eps=1e-4)``."""
    nanstd = pytest.importorskip("trl.trainer.utils", reason="TRL not installed").nanstd
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.9, 0.3, 1.0, 1.0, 1.0, 1.0])
    g = 4
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    for scale, std in (("group", nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)),
                       ("batch", nanstd(rewards).expand_as(rewards))):  # fmt: skip
        trl = (rewards - mean) / (std + 1e-4)
        ours = group_advantages(rewards, g, **PolicyLoss.trl_advantages(scale_rewards=scale)).advantages
        torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(group_advantages(rewards, g, scale=scale).advantages, trl, rtol=1e-5, atol=1e-6)
    ours = group_advantages(rewards, g, **PolicyLoss.trl_advantages(scale_rewards="none")).advantages
    torch.testing.assert_close(ours, rewards - mean, rtol=1e-5, atol=1e-6)  # TRL's scale_rewards="none": no division


# ----------------------------------------------------------------------------------------------------------------
# verl 0.9.1
# ----------------------------------------------------------------------------------------------------------------
def _verl_available():
    pytest.importorskip("verl", reason="verl not installed (pip install --no-deps verl==0.9.1 + ray omegaconf "
                                       "tensordict codetiming)")  # fmt: skip


def _verl_loss(c, config):
    """verl's actor loss with the actor settings ``config`` (``PolicyLoss.verl``'s names): the policy loss
    ``get_policy_loss_fn(loss_mode)`` + entropy and k3 KL through ``agg_loss``, as ``ppo_loss`` composes them, with
    rollout-correction weights from verl's own helper."""
    _verl_available()
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **VERL_CLIP)
    cfg.global_batch_info.update(config.get("global_batch_info") or {})
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    logp, ent = _eager_head(h, w, c["y"])
    mask, adv, agg = c["mask"], c["adv"][:, None].expand(B, L), config["loss_agg_mode"]
    is_weights = None
    if config.get("rollout_is"):  # verl's own helper makes the weights (old - rollout, threshold 2.0)
        is_weights, _ = compute_rollout_correction_weights(c["old"] - c["rollout"], mask.float(),
                                                           rollout_is=config["rollout_is"], rollout_is_threshold=2.0)
    loss, _ = get_policy_loss_fn(config.get("loss_mode", "vanilla"))(
        old_log_prob=c["old"], log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg,
        rollout_is_weights=is_weights)  # fmt: skip
    info = cfg.global_batch_info
    if config.get("entropy_coeff"):
        loss = loss - config["entropy_coeff"] * agg_loss(loss_mat=ent, loss_mask=mask, loss_agg_mode=agg, **info)
    if config.get("use_kl_loss"):
        kld = kl_penalty(logprob=logp, ref_logprob=c["ref"], kl_penalty=config["kl_loss_type"])
        loss = loss + config["kl_loss_coef"] * agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=agg, **info)
    return loss, torch.autograd.grad(loss, (h, w))


VERL_CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
VANILLA = dict(log_ratio_clamp=20.0, dual_clip=3.0)  # verl's vanilla: log-ratio clamp +-20, dual clip clip_ratio_c
GSPO = dict(importance_level="sequence", log_ratio_clamp=(-math.inf, 10.0), dual_clip=None)
VERL_ROWS = {
    # row: (actor settings, what the preset sets)
    "vanilla, token-mean": (dict(loss_agg_mode="token-mean"), dict(VANILLA, aggregation="token-mean")),
    "vanilla, seq-mean-token-mean": (dict(loss_agg_mode="seq-mean-token-mean"),
                                     dict(VANILLA, aggregation="seq-mean-token-mean")),
    "vanilla, seq-mean-token-sum": (dict(loss_agg_mode="seq-mean-token-sum"),
                                    dict(VANILLA, aggregation="seq-mean-token-sum")),
    "vanilla, seq-mean-token-sum-norm": (dict(loss_agg_mode="seq-mean-token-sum-norm"),
                                         dict(VANILLA, aggregation="seq-mean-token-sum-norm")),
    "vanilla, token-sum": (dict(loss_agg_mode="token-sum"), dict(VANILLA, aggregation="token-mean", normaliser=1.0)),
    "vanilla, token-mean, global batch_num_tokens": (
        dict(loss_agg_mode="token-mean", global_batch_info=dict(dp_size=2, batch_num_tokens=90)),
        dict(VANILLA, aggregation="token-mean", normaliser=45.0)),
    "vanilla + low_var_kl + entropy_coeff + TIS": (
        dict(loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl",
             entropy_coeff=0.01, rollout_is="token"),
        dict(VANILLA, aggregation="seq-mean-token-mean", beta=0.1, kl_log_ratio_clamp=20.0, kl_clamp=10.0,
             entropy_coef=0.01, entropy_aggregation=None, rollout_is_level="token", rollout_is_cap=2.0)),
    "vanilla + k3 KL": (
        dict(loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="k3"),
        dict(VANILLA, beta=0.05, kl_log_ratio_clamp=20.0, kl_clamp=10.0)),
    "gspo, seq-mean-token-mean": (dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean"),
                                  dict(GSPO, aggregation="seq-mean-token-mean")),
    "gspo, token-mean + TIS (sequence)": (
        dict(loss_mode="gspo", loss_agg_mode="token-mean", rollout_is="sequence"),
        dict(GSPO, aggregation="token-mean", rollout_is_level="sequence", rollout_is_cap=2.0)),
}


@pytest.mark.parametrize("row", list(VERL_ROWS))
def test_verl_policy_losses(row):
    config, expected = VERL_ROWS[row]
    loss = PolicyLoss.verl(**config, **VERL_CLIP)
    _assert_sets(loss, dict(clip_low=0.2, clip_high=0.28, **expected))
    _verl_available()
    c = _case(2, extreme=100.0)  # without verl's clamps exp overflows: NaN gradients
    if row.startswith("gspo"):  # verl clamps GSPO's log-ratio above 10 only: one sequence beyond +10, one below -10
        c["old"][0] -= 12.0
        c["old"][1] += 12.0
    kw = dict(ref_logprobs=c["ref"]) if loss.beta else {}
    if loss.rollout_is_level is not None:
        kw["rollout_is_weights"] = loss.rollout_is_weights(c["old"], c["rollout"], c["mask"])
    _assert_same(_ours(c, loss, **kw), _verl_loss(c, config))


def test_verl_preset_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="loss_mode: expected one of"):
        PolicyLoss.verl("clip_cov")
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        PolicyLoss.verl("vanilla", "seq-sum")
    with pytest.raises(ValueError, match="kl_loss_type: expected one of"):
        PolicyLoss.verl(use_kl_loss=True, kl_loss_type="k1")
    with pytest.raises(ValueError, match="global_batch_info: batch_num_tokens is needed"):
        PolicyLoss.verl(global_batch_info=dict(dp_size=2))
    assert PolicyLoss.verl("vanilla", "seq-mean-token-sum-norm", loss_scale_factor=512).max_length == 512


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_rollout_correction_weights_and_metrics(level):
    _verl_available()
    from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics, compute_rollout_correction_weights

    c = _case(3)
    c["rollout"][0, 0] = c["old"][0, 0] + 30.0  # beyond the +-20 bound
    mask = c["mask"].float()
    theirs, _ = compute_rollout_correction_weights(c["old"] - c["rollout"], mask, rollout_is=level,
                                                   rollout_is_threshold=1.7)  # fmt: skip
    ours = rollout_importance_weights(c["old"], c["rollout"], c["mask"], cap=1.7, level=level)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    c["rollout"][0, 0] = c["old"][0, 0] - 0.5  # back in range: k3 of a log-ratio of 30 is e^30
    m = compute_offpolicy_metrics(c["old"], c["rollout"], mask)
    assert float(logprob_mismatch(c["old"], c["rollout"], c["mask"])["mismatch/k3"]) == pytest.approx(m["k3_kl"],
                                                                                                      rel=1e-5)


VERL_ADVANTAGES = {
    # verl estimator (arguments): what PolicyLoss.verl_advantages gives
    "grpo (epsilon=1e-6)": ("grpo", dict(norm_adv_by_std_in_grpo=True), dict(estimator="grpo", singleton="verl")),
    "grpo, norm_adv_by_std_in_grpo=False (Dr.GRPO)": ("grpo", dict(norm_adv_by_std_in_grpo=False),
                                                      dict(estimator="drgrpo", singleton="verl")),
    "grpo_vectorized": ("grpo_vectorized", dict(norm_adv_by_std_in_grpo=True),
                        dict(estimator="grpo", singleton="verl")),
    "rloo": ("rloo", {}, dict(estimator="rloo", singleton="verl")),
}


@pytest.mark.parametrize("row", list(VERL_ADVANTAGES))
def test_verl_advantage_estimators(row):
    name, verl_kw, ours_kw = VERL_ADVANTAGES[row]
    assert PolicyLoss.verl_advantages(name, **verl_kw) == ours_kw
    _verl_available()
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    # ragged uid groups in any order, a singleton (verl: mean 0, std 1), an all-equal group of exact values
    uid = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "b", "a", "e", "e"], dtype=object)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.7, 1.0, 0.5, 1.0, 1.0, 0.25, 1.0, 0.3, 0.9])
    mask = torch.ones(12, 3)
    scores = torch.zeros(12, 3)
    scores[:, -1] = rewards
    theirs, _ = get_adv_estimator_fn(name)(token_level_rewards=scores, response_mask=mask, index=uid, **verl_kw)
    _, gidx = np.unique(uid, return_inverse=True)
    ours = group_advantages(rewards, group_index=torch.as_tensor(gidx), **ours_kw).advantages
    torch.testing.assert_close(ours, theirs[:, 0], rtol=1e-5, atol=1e-6)
    assert theirs[3, 0] != 0  # the singleton
