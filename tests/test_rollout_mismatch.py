"""Rollout vs trainer log-probs: the BPO loop logs their mismatch every --mismatch-every steps (every step in these
tests; our own engine's is ~1e-7 on CPU fp32),
``--rollout-is`` passes truncated importance weights to the loss, and those weights correct a perturbed rollout (an
expected-value check over the whole vocabulary: the weighted gradient is the on-policy one)."""

import math

import pytest
import torch

from r4b_fast import fused_linear_policy_loss, logprob_mismatch, rollout_importance_weights
from r4b_fast.training import bpo, bpo_loss, bpo_step
from r4b_fast.training.common import read_metrics

MISMATCH_KEYS = ("mismatch/abs_mean", "mismatch/abs_max", "mismatch/k3")


def _run(tmp_path, model_dir, *extra):
    args = ["--model", str(model_dir), "--steps", "2", "--prompts", "2", "--g", "2", "--max-new-tokens", "8",
            "--eval-items", "0", "--output-dir", str(tmp_path), *extra]
    assert bpo.main(args) == 0
    return read_metrics(tmp_path / "metrics.jsonl")


def test_own_engine_mismatch_is_small_every_step(tmp_path, tiny_policy_dir):
    """KV-cache sampling and the packed training forward agree to float32 rounding on CPU."""
    log = _run(tmp_path, tiny_policy_dir, "--mismatch-every", "1")
    assert [r["step"] for r in log] == [1, 2]
    for rec in log:
        assert all(k in rec for k in MISMATCH_KEYS), rec.keys()
        assert 0 <= rec["mismatch/abs_max"] < 1e-4 and rec["mismatch/abs_mean"] <= rec["mismatch/abs_max"]
        assert 0 <= rec["mismatch/k3"] < 1e-8
        assert "rollout_is_mean" not in rec  # --rollout-is off: no weights in the loss


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_perturbed_rollout_is_measured_and_weighted(tmp_path, tiny_policy_dir, monkeypatch, level):
    """A rollout engine that reports every sampled token's log-prob 0.5 too high: the loop measures |d| = 0.5 on the
    policy's tokens, and --rollout-is hands the loss min(exp(-0.5), cap) per token (exp(-0.5 n) per sequence)."""
    real = bpo_step.generate_rollouts

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logprobs = torch.where(out.policy_mask, out.logprobs + 0.5, out.logprobs)
        return out

    monkeypatch.setattr(bpo_step, "generate_rollouts", shifted)
    seen = []
    real_loss = bpo_loss.fused_linear_policy_loss

    def spy(*args, **kwargs):
        seen.append((args[4].clone(), kwargs["rollout_is_weights"]))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(bpo_loss, "fused_linear_policy_loss", spy)
    log = _run(tmp_path, tiny_policy_dir, "--rollout-is", level, "--rollout-is-cap", "1.5")
    for rec in log:
        assert rec["mismatch/abs_mean"] == pytest.approx(0.5, abs=1e-4)
        assert rec["mismatch/abs_max"] == pytest.approx(0.5, abs=1e-4)
        assert rec["mismatch/k3"] == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-4)
    assert len(seen) == 2
    for mask, weights in seen:
        assert weights is not None and weights.shape == mask.shape
        assert (weights[~mask] == 0).all()
        if level == "token":
            torch.testing.assert_close(weights[mask], torch.full_like(weights[mask], math.exp(-0.5)), rtol=1e-4,
                                       atol=0)  # fmt: skip
        else:
            n = mask.sum(1, keepdim=True).expand_as(mask)
            torch.testing.assert_close(weights[mask], torch.exp(-0.5 * n[mask].float()), rtol=1e-3, atol=0)
    assert log[-1]["rollout_is_mean"] < 1


def test_rollout_is_flags_validated_and_recorded(tmp_path, tiny_policy_dir, capsys):
    with pytest.raises(SystemExit):
        bpo.parse_args(["--model", str(tiny_policy_dir), "--rollout-is-cap", "0", "--output-dir", str(tmp_path)])
    assert "--rollout-is-cap: expected a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bpo.parse_args(["--model", str(tiny_policy_dir), "--rollout-is", "batch", "--output-dir", str(tmp_path)])
    assert "--rollout-is" in capsys.readouterr().err
    args = bpo.parse_args(["--model", str(tiny_policy_dir), "--rollout-is", "sequence", "--output-dir",
                           str(tmp_path / "x")])  # fmt: skip
    assert args.settings["--rollout-is"] == "sequence" and args.settings["--rollout-is-cap"] == 2.0


# ----------------------------------------------------------------------------------------------------------------
# The correction itself, in expectation: every token y of the vocabulary as a one-token rollout, weighted by the
# probability q(y) that the perturbed engine samples it.
# ----------------------------------------------------------------------------------------------------------------
def _expected_gradient(h, w, adv, sample_prob, train_logp, rollout_logp, cap, use_weights):
    """``sum_y sample_prob[y] * d loss(y) / d (h, w)`` with the loss of a single sampled token y: old log-probs
    the trainer's (ratio 1), optional importance weights ``min(p / q, cap)``."""
    V = w.shape[0]
    gh, gw = torch.zeros_like(h), torch.zeros_like(w)
    for y in range(V):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        target, mask = torch.tensor([[y]]), torch.ones(1, 1, dtype=torch.bool)
        old = train_logp[y].reshape(1, 1)
        weights = None
        if use_weights:
            weights = rollout_importance_weights(old, rollout_logp[y].reshape(1, 1), mask, cap=cap)
        loss, _ = fused_linear_policy_loss(hh, ww, target, adv[y].reshape(1), mask, old_logprobs=old,
                                           rollout_is_weights=weights)  # fmt: skip
        dh, dw = torch.autograd.grad(loss, (hh, ww))
        gh += sample_prob[y] * dh
        gw += sample_prob[y] * dw
    return torch.cat([gh.flatten(), gw.flatten()])


@pytest.mark.parametrize("perturbation", ["temperature", "shifted_logprobs"])
def test_importance_weights_correct_a_perturbed_rollout_in_expectation(perturbation):
    V, H = 13, 6
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(1, 1, H, generator=gen), torch.randn(V, H, generator=gen)
    adv = torch.randn(V, generator=gen)  # each token's advantage
    logits = (h[0, 0] @ w.T).double()
    p_log = torch.log_softmax(logits, -1)  # the trainer's policy
    if perturbation == "temperature":
        q_log = torch.log_softmax(logits / 3.0, -1)  # the rollout sampled (and scored) at another temperature
    else:
        q_log = torch.log_softmax(logits + 1.5 * torch.randn(V, generator=gen, dtype=torch.float64), -1)
    p, q = p_log.exp(), q_log.exp()
    train_logp, rollout_logp = p_log.float(), q_log.float()
    on_policy = _expected_gradient(h, w, adv, p, train_logp, train_logp, None, False)  # sampled from p itself
    plain = _expected_gradient(h, w, adv, q, train_logp, rollout_logp, None, False)
    exact = _expected_gradient(h, w, adv, q, train_logp, rollout_logp, None, True)  # untruncated: unbiased
    capped = _expected_gradient(h, w, adv, q, train_logp, rollout_logp, 2.0, True)
    ratio = (p / q).max()
    assert ratio > 2.0  # the cap truncates some tokens
    err = {name: float((g - on_policy).norm() / on_policy.norm()) for name, g in
           (("plain", plain), ("exact", exact), ("capped", capped))}  # fmt: skip
    assert err["plain"] > 0.05, err  # the perturbation matters
    assert err["exact"] < 1e-5, err  # sum_y q(y) p(y)/q(y) g(y) = sum_y p(y) g(y)
    assert err["capped"] < 0.5 * err["plain"], err  # truncated weights: biased, still much closer


def test_logprob_mismatch_matches_the_loop_definition():
    """The metric the loop logs is the masked mean / max of |train - rollout| and the masked k3 mean."""
    gen = torch.Generator().manual_seed(1)
    train, rollout = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    mask = torch.rand(4, 7, generator=gen) < 0.6
    m = logprob_mismatch(train, rollout, mask)
    d = (train - rollout)[mask].double()
    assert float(m["mismatch/abs_mean"]) == pytest.approx(float(d.abs().mean()), rel=1e-6)
    assert float(m["mismatch/abs_max"]) == pytest.approx(float(d.abs().max()), rel=1e-6)
    assert float(m["mismatch/k3"]) == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-6)
