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

from r4b_fast import fused_linear_policy_loss, group_advantages, logprob_mismatch, rollout_importance_weights

B, L, H, V = 5, 7, 8, 37
GA = 2  # TRL's gradient-accumulation steps (and steps_per_generation): exercises its normalisers


def _case(seed=0, extreme=25.0):
    """Random inputs; ``extreme``: one log-ratio of +extreme, one of -(extreme + 5), one ref log-ratio of +extreme
    (100 overflows exp in float32: what verl's clamps are for)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.75
    mask[:, 0] = True
    mask[0, 1] = mask[1, 2] = mask[2, 3] = True
    with torch.no_grad():
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, L, generator=g)  # ratios across the clip range
    old[0, 1], old[1, 2], old[2, 3] = logp[0, 1] - extreme, logp[1, 2] + extreme + 5, logp[2, 3] - 1.5  # dual clip
    ref = logp + 0.3 * torch.randn(B, L, generator=g)
    ref[3, 0] = logp[3, 0] + extreme  # k3's clamps
    adv = torch.randn(B, generator=g)
    adv[2] = -1.0
    rollout = old + 0.4 * torch.randn(B, L, generator=g)  # a rollout engine's log-probs
    return dict(h=h, w=w, y=y, mask=mask, old=old, ref=ref, adv=adv, rollout=rollout)


def _eager_head(h, w, y):
    logsm = torch.log_softmax(h @ w.T, -1)
    return logsm.gather(-1, y[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _ours(c, **kw):
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    loss, _ = fused_linear_policy_loss(h, w, c["y"], c["adv"], c["mask"], **kw)
    return loss.detach(), torch.autograd.grad(loss, (h, w))


def _assert_same(ours, peer):
    (loss, grads), (peer_loss, peer_grads) = ours, peer
    torch.testing.assert_close(loss, peer_loss.detach().float(), rtol=1e-5, atol=1e-6)
    for g, pg in zip(grads, peer_grads):
        torch.testing.assert_close(g, pg.float(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# TRL 1.16
# ----------------------------------------------------------------------------------------------------------------
def _trl_loss(c, loss_type, *, beta=0.0, level="token", entropy_coef=0.0, is_ratio=None):
    """TRL's own ``GRPOTrainer._compute_loss`` on our inputs: ``(loss, (d/dh, d/dw))``."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL not installed (pip install trl==1.16.0)")
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    mask = c["mask"].long()

    def per_token(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_):
        logp, ent = _eager_head(h, w, c["y"])
        return logp, (ent if compute_entropy else None), None

    acc = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x)  # fmt: skip
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=GA),
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=GA, accelerator=acc,
        max_completion_length=L + 3, _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                  completion_ids=c["y"], completion_mask=mask, advantages=c["adv"], old_per_token_logps=c["old"],
                  num_items_in_batch=mask.sum() * GA)  # fmt: skip
    if beta:
        inputs["ref_per_token_logps"] = c["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, torch.autograd.grad(loss, (h, w))


TRL_ROWS = {
    # loss_type: (TRL's arguments, ours)
    "grpo": (dict(loss_type="grpo", beta=0.04),
             lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, beta=0.04, ref_logprobs=c["ref"])),
    "bnpo": (dict(loss_type="bnpo"), lambda c: dict(aggregation="token-mean", normaliser=c["mask"].sum() * GA)),
    "dr_grpo": (dict(loss_type="dr_grpo"), lambda c: dict(aggregation="seq-mean-token-sum-norm", max_length=L + 3,
                                                          normaliser=B * GA)),
    "dapo": (dict(loss_type="dapo", beta=0.04), lambda c: dict(aggregation="token-mean", beta=0.04,
                                                              ref_logprobs=c["ref"],
                                                              normaliser=c["mask"].sum() * GA)),
    "gspo (grpo, importance_sampling_level=sequence)": (
        dict(loss_type="grpo", level="sequence"),
        lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, importance_level="sequence")),
    "luspo": (dict(loss_type="luspo", level="sequence"),
              lambda c: dict(aggregation="seq-mean-token-sum", normaliser=B * GA, importance_level="sequence")),
    "grpo + entropy_coef": (
        dict(loss_type="grpo", entropy_coef=0.05),
        lambda c: dict(aggregation="seq-mean-token-mean", normaliser=B * GA, entropy_coef=0.05 / GA,
                       entropy_aggregation="token-mean")),
    "dapo + vLLM importance sampling (token_truncate)": (
        dict(loss_type="dapo", is_ratio="token"),
        lambda c: dict(aggregation="token-mean", normaliser=c["mask"].sum() * GA,
                       rollout_is_weights=rollout_importance_weights(c["old"], c["rollout"], c["mask"], cap=1.5))),
}


@pytest.mark.parametrize("row", list(TRL_ROWS))
def test_trl_loss_types(row):
    c = _case(1)
    trl_kw, ours_kw = TRL_ROWS[row]
    trl_kw = dict(trl_kw)
    if trl_kw.get("is_ratio"):  # TRL's importance_sampling_ratio, token_truncate with clip_max=1.5, as TRL forms it
        d = (c["old"] - c["rollout"]) * c["mask"]
        trl_kw["is_ratio"] = torch.clamp(torch.exp(d), max=1.5)
        assert (trl_kw["is_ratio"] == 1.5).any()
    kw = ours_kw(c)
    _assert_same(_ours(c, old_logprobs=c["old"], clip_low=0.2, clip_high=0.28, **kw), _trl_loss(c, **trl_kw))


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
        ours = group_advantages(rewards, g, scale=scale, eps=1e-4).advantages
        torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(group_advantages(rewards, g, scale=scale).advantages, trl, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# verl 0.9.1
# ----------------------------------------------------------------------------------------------------------------
def _verl_loss(c, mode, agg, *, kl_coef=0.0, entropy_coeff=0.0, is_weights=None, info=None):
    """verl's policy loss ``get_policy_loss_fn(mode)`` + entropy and k3 KL through ``agg_loss``, as ``ppo_loss``."""
    pytest.importorskip("verl", reason="verl not installed (pip install --no-deps verl==0.9.1 + ray omegaconf "
                                       "tensordict codetiming)")  # fmt: skip
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                      ppo_micro_batch_size_per_gpu=1, rollout_n=1)  # fmt: skip
    cfg.global_batch_info.update(info or {})
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    logp, ent = _eager_head(h, w, c["y"])
    mask, adv = c["mask"], c["adv"][:, None].expand(B, L)
    loss, _ = get_policy_loss_fn(mode)(old_log_prob=c["old"], log_prob=logp, advantages=adv, response_mask=mask,
                                       loss_agg_mode=agg, config=cfg, rollout_is_weights=is_weights)  # fmt: skip
    info = cfg.global_batch_info
    if entropy_coeff:
        loss = loss - entropy_coeff * agg_loss(loss_mat=ent, loss_mask=mask, loss_agg_mode=agg, **info)
    if kl_coef:
        kld = kl_penalty(logprob=logp, ref_logprob=c["ref"], kl_penalty="low_var_kl")
        loss = loss + kl_coef * agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=agg, **info)
    return loss, torch.autograd.grad(loss, (h, w))


VANILLA = dict(log_ratio_clamp=20.0, dual_clip=3.0)  # verl's vanilla: log-ratio clamp +-20, dual clip clip_ratio_c
VERL_ROWS = {
    "vanilla, token-mean": (dict(mode="vanilla", agg="token-mean"), lambda c: dict(VANILLA, aggregation="token-mean")),
    "vanilla, seq-mean-token-mean": (dict(mode="vanilla", agg="seq-mean-token-mean"),
                                     lambda c: dict(VANILLA, aggregation="seq-mean-token-mean")),
    "vanilla, seq-mean-token-sum": (dict(mode="vanilla", agg="seq-mean-token-sum"),
                                    lambda c: dict(VANILLA, aggregation="seq-mean-token-sum")),
    "vanilla, seq-mean-token-sum-norm": (dict(mode="vanilla", agg="seq-mean-token-sum-norm"),
                                         lambda c: dict(VANILLA, aggregation="seq-mean-token-sum-norm")),
    "vanilla, token-sum": (dict(mode="vanilla", agg="token-sum"),
                           lambda c: dict(VANILLA, aggregation="token-mean", normaliser=1.0)),
    "vanilla, token-mean, global batch_num_tokens": (
        dict(mode="vanilla", agg="token-mean", info=dict(dp_size=2, batch_num_tokens=90)),
        lambda c: dict(VANILLA, aggregation="token-mean", normaliser=45.0)),
    "vanilla + low_var_kl + entropy_coeff + TIS": (
        dict(mode="vanilla", agg="seq-mean-token-mean", kl_coef=0.1, entropy_coeff=0.01, is_weights="token"),
        lambda c: dict(VANILLA, aggregation="seq-mean-token-mean", beta=0.1, ref_logprobs=c["ref"],
                       kl_log_ratio_clamp=20.0, kl_clamp=10.0, entropy_coef=0.01,
                       rollout_is_weights=rollout_importance_weights(c["old"], c["rollout"], c["mask"]))),
    "gspo, seq-mean-token-mean": (dict(mode="gspo", agg="seq-mean-token-mean"),
                                  lambda c: dict(aggregation="seq-mean-token-mean", importance_level="sequence",
                                                 log_ratio_clamp=(-math.inf, 10.0))),
    "gspo, token-mean + TIS (sequence)": (
        dict(mode="gspo", agg="token-mean", is_weights="sequence"),
        lambda c: dict(aggregation="token-mean", importance_level="sequence", log_ratio_clamp=(-math.inf, 10.0),
                       rollout_is_weights=rollout_importance_weights(c["old"], c["rollout"], c["mask"],
                                                                     level="sequence"))),
}


@pytest.mark.parametrize("row", list(VERL_ROWS))
def test_verl_policy_losses(row):
    c = _case(2, extreme=100.0)  # without verl's clamps exp overflows: NaN gradients
    if row.startswith("gspo"):  # verl clamps GSPO's log-ratio above 10 only: one sequence beyond +10, one below -10
        c["old"][0] -= 12.0
        c["old"][1] += 12.0
    verl_kw, ours_kw = VERL_ROWS[row]
    verl_kw = dict(verl_kw)
    if verl_kw.get("is_weights"):  # verl's own helper makes the weights (old - rollout, threshold 2.0)
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

        verl_kw["is_weights"], _ = compute_rollout_correction_weights(
            c["old"] - c["rollout"], c["mask"].float(), rollout_is=verl_kw["is_weights"], rollout_is_threshold=2.0)
    kw = ours_kw(c)
    _assert_same(_ours(c, old_logprobs=c["old"], clip_low=0.2, clip_high=0.28, **kw), _verl_loss(c, **verl_kw))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_rollout_correction_weights_and_metrics(level):
    pytest.importorskip("verl", reason="verl not installed")
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
    # verl estimator (arguments): ours
    "grpo (epsilon=1e-6)": ("grpo", dict(norm_adv_by_std_in_grpo=True), dict(estimator="grpo", singleton="verl")),
    "grpo, norm_adv_by_std_in_grpo=False (Dr.GRPO)": ("grpo", dict(norm_adv_by_std_in_grpo=False),
                                                      dict(estimator="drgrpo", singleton="verl")),
    "grpo_vectorized": ("grpo_vectorized", dict(norm_adv_by_std_in_grpo=True),
                        dict(estimator="grpo", singleton="verl")),
    "rloo": ("rloo", {}, dict(estimator="rloo", singleton="verl")),
}


@pytest.mark.parametrize("row", list(VERL_ADVANTAGES))
def test_verl_advantage_estimators(row):
    pytest.importorskip("verl", reason="verl not installed")
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    name, verl_kw, ours_kw = VERL_ADVANTAGES[row]
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
