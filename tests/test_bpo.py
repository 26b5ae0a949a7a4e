"""The BPO loop: its pieces against plain computations, an end-to-end run, and exact resume after a kill."""

import subprocess
import sys

import pytest
import torch
from conftest import with_logit_bias

from r4b_fast.training.common import read_metrics


def test_thought_classifies_think_blocks():
    from r4b_fast.training.rewards import thought

    assert thought("<think>\n1+2=3\n</think>\n\n3")
    assert not thought("<think>\n\n</think>\n\n3")
    assert not thought("3")
    assert thought("<think>\nunfinished")


def test_policy_forward_hidden_predicts_the_completion_tokens(tiny_policy_dir):
    from r4b_fast.training.bpo import ModeTokens, policy_forward, prompt_embeddings
    from r4b_fast.training.common import load_model
    from r4b_fast.training.rollout import bpo_modes, generate_rollouts
    from r4b_fast.training.task import prompt_text, sample_items
    from r4b_fast.training.tiny_model import image_embeddings, num_image_tokens

    model, tok = load_model(tiny_policy_dir, "cpu")
    model.eval()
    tokens = ModeTokens.from_tokenizer(tok)
    n_img = num_image_tokens(model)
    items = sample_items(2, 5)
    prompt_ids = [tok(prompt_text(it, n_img), add_special_tokens=False)["input_ids"] for it in items]
    with torch.no_grad():
        ro = generate_rollouts(model, prompt_ids, [bpo_modes(1)] * 2, think_open_ids=tokens.think_open,
                               no_think_ids=tokens.no_think, think_close_ids=tokens.think_close, eos_id=tokens.eos,
                               pad_id=tokens.pad, max_new_tokens=6, temperature=1.0,
                               generator=torch.Generator().manual_seed(0),
                               prompt_embeds=prompt_embeddings(model, prompt_ids, items, tokens.image))
        hidden = policy_forward(model, items, prompt_ids, ro, tokens.image, tokens.pad)
        logits = hidden @ model.lm_head.weight.T
        # independent path: the model's own forward with pixel values, one rollout at a time, no padding
        for r in range(ro.completions.shape[0]):
            p = int(ro.prompt_index[r])
            n = int(ro.completion_mask[r].sum())
            ids = torch.tensor([prompt_ids[p] + ro.completions[r, :n].tolist()])
            # the model's own embedding, vision path and attention on one unpadded sequence; only the prompt's
            # <image> tokens are placeholders (a sampled <image> in the completion is text)
            embeds = model.get_input_embeddings()(ids)
            placeholder = torch.zeros_like(ids, dtype=torch.bool)
            placeholder[0, : len(prompt_ids[p])] = ids[0, : len(prompt_ids[p])] == tokens.image
            embeds[placeholder] = image_embeddings(model, items[p].image()[None])
            ref = model(inputs_embeds=embeds).logits[0]
            torch.testing.assert_close(logits[r, :n], ref[len(prompt_ids[p]) - 1 : len(prompt_ids[p]) - 1 + n],
                                       rtol=1e-4, atol=1e-4)
            # and the rollout's log-probs are those of the same distribution
            lp = torch.log_softmax(ref[len(prompt_ids[p]) - 1 : len(prompt_ids[p]) - 1 + n], -1)
            lp = lp.gather(1, ro.completions[r, :n, None])[:, 0]
            torch.testing.assert_close(ro.logprobs[r, :n], lp, rtol=1e-4, atol=1e-4)


def _bpo(out, model_dir, *extra):
    args = ["--model", str(model_dir), "--steps", "4", "--prompts", "2", "--g", "2", "--max-new-tokens", "8",
            "--eval-items", "4", "--eval-every", "2", "--save-every", "2", "--output-dir", str(out), *extra]
    return subprocess.run([sys.executable, "-m", "r4b_fast.training.bpo", *args], capture_output=True, text=True,
                          timeout=900)


def test_bpo_runs_logs_and_resumes_exactly_after_a_kill(tmp_path, tiny_policy_dir):
    from safetensors.torch import load_file

    full = _bpo(tmp_path / "full", tiny_policy_dir, "--plot")
    assert full.returncode == 0, full.stderr
    log = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    for key in ("reward/think", "reward/no_think", "length/think", "length/no_think", "kl", "clip_frac_low",
                "entropy_mean", "tokens_per_s"):
        assert key in log[1], key
    assert "eval/think_rate_hard" in log[0] and "eval/acc_auto_easy" in log[4]
    assert (tmp_path / "full" / "curves.png").exists()

    killed = _bpo(tmp_path / "killed", tiny_policy_dir, "--stop-after", "3")
    assert killed.returncode == 3
    resumed = _bpo(tmp_path / "killed", tiny_policy_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_grpo_baseline_and_kl_run(tmp_path, tiny_policy_dir):
    proc = _bpo(tmp_path, tiny_policy_dir, "--algo", "grpo", "--beta", "0.05", "--mini-batches", "2",
                "--grad-accum", "2", "--steps", "1", "--eval-items", "0", "--precision", "bf16")
    assert proc.returncode == 0, proc.stderr
    rec = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert rec["kl"] >= 0 and "reward/all" in rec
    assert "cpu, bf16" in proc.stdout


def test_bad_arguments(tmp_path, tiny_policy_dir):
    proc = _bpo(tmp_path, tiny_policy_dir, "--mini-batches", "3")
    assert proc.returncode != 0 and "must divide the rollouts" in proc.stderr
    proc = _bpo(tmp_path, tmp_path / "nope")
    assert proc.returncode != 0 and "--model" in proc.stderr
    proc = _bpo(tmp_path, tiny_policy_dir, "--device", "tpu")
    assert proc.returncode != 0 and "--device: expected auto, cpu, cuda or cuda:N" in proc.stderr


def _close_biased(model, tok):
    """The model with an LM head that adds a large bias to ``</think>`` (and a smaller one to ``<think>``): left
    alone it closes a think block at once and reopens it after (a model that learned to skip thinking)."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[tok.convert_tokens_to_ids("</think>")], bias[tok.convert_tokens_to_ids("<think>")] = 60.0, 50.0
    return with_logit_bias(model, bias)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_strict_evaluation_forced_thinking_thinks_and_no_tag_reopens(tiny_policy_dir, temperature):
    """Evaluation with the strict modes: a close-biased model forced into thinking writes a thought (without them it
    closes at once), and no completion has a think tag after its block (without them, they come back)."""
    from r4b_fast.modes import Mode
    from r4b_fast.training.common import load_model
    from r4b_fast.training.evaluation import ModeTokens, mode_completions
    from r4b_fast.training.rewards import thought
    from r4b_fast.training.task import sample_items
    from r4b_fast.training.vision import ImageEncoder

    model, tok = load_model(tiny_policy_dir, "cpu")
    model = _close_biased(model, tok)
    enc = ImageEncoder.for_model(model, tiny_policy_dir)
    items = sample_items(3, 0, split="eval")
    tokens = ModeTokens.from_tokenizer(tok)
    for mode in (Mode.THINK, Mode.NO_THINK, Mode.AUTO):
        kw = dict(max_new_tokens=12, temperature=temperature, seed=1)
        strict = mode_completions(model, tok, tokens, items, mode, enc, min_think_tokens=3, no_reopen=True, **kw)
        loose = mode_completions(model, tok, tokens, items, mode, enc, **kw)
        for s, f in zip(strict, loose):
            after, free_after = s.split("</think>", 1)[1], f.split("</think>", 1)[1]
            assert "<think>" not in after and "</think>" not in after, (mode, s)
            assert free_after.count("<think>") + free_after.count("</think>") > 3, (mode, f)  # unconstrained
            if mode == Mode.THINK:
                assert thought(s) and not thought(f), (s, f)
                assert s.startswith("<think>\n") and len(tok(s.split("</think>")[0])["input_ids"]) >= 2 + 3


def test_bpo_passes_the_strict_modes_to_rollouts_and_evaluation(tmp_path, tiny_policy_dir, monkeypatch):
    """--min-think-tokens / --no-reopen reach every generate_rollouts call of the loop (training rollouts and the
    held-out evaluation); the defaults are on (4, True)."""
    import r4b_fast.training.bpo as bpo
    import r4b_fast.training.bpo_step as bpo_step
    import r4b_fast.training.evaluation as evaluation
    from r4b_fast.training.rollout import generate_rollouts

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["min_think_tokens"], kwargs["no_reopen"]))
        return generate_rollouts(*args, **kwargs)

    monkeypatch.setattr(bpo_step, "generate_rollouts", spy)  # the step's generate stage
    monkeypatch.setattr(evaluation, "generate_rollouts", spy)
    common = ["--model", str(tiny_policy_dir), "--steps", "1", "--prompts", "1", "--g", "1", "--max-new-tokens", "8",
              "--eval-items", "2", "--eval-every", "1"]
    assert bpo.main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    assert len(seen) == 1 + 3 + 3 and set(seen) == {(4, True)}  # evaluation before (3 modes), the step, after
    seen.clear()
    assert bpo.main([*common, "--output-dir", str(tmp_path / "b"), "--min-think-tokens", "2", "--no-no-reopen"]) == 0
    assert len(seen) == 7 and set(seen) == {(2, False)}


def test_strict_mode_flags_validated_and_compared_on_resume(tmp_path, tiny_policy_dir):
    proc = _bpo(tmp_path / "x", tiny_policy_dir, "--min-think-tokens", "-1")
    assert proc.returncode == 2 and "--min-think-tokens: expected an integer >= 0" in proc.stderr
    proc = _bpo(tmp_path / "x", tiny_policy_dir, "--min-think-tokens", "9")  # above --max-new-tokens 8
    assert proc.returncode == 2 and "--min-think-tokens 9: above --max-new-tokens 8" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written
    run = _bpo(tmp_path / "r", tiny_policy_dir, "--steps", "2", "--eval-items", "0")
    assert run.returncode == 0, run.stderr
    for flag in (["--min-think-tokens", "3"], ["--no-no-reopen"]):
        proc = _bpo(tmp_path / "r", tiny_policy_dir, "--steps", "3", "--eval-items", "0", "--resume", *flag)
        assert proc.returncode == 2 and flag[0].replace("no-no-", "no-") in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag, decision_on", [([], True), (["--decision-coef", "0"], False)])
def test_bpo_trains_the_mode_decision_towards_the_better_half(tmp_path, tiny_policy_dir, monkeypatch, flag,
                                                              decision_on):  # fmt: skip
    """Default: the forced prefix stays out of the policy loss, and the decision loss gets each group's verdict
    (the thinking half earns the reward: every row pushed to THINK, weight |S| / 2g); --decision-coef 0: no
    decision loss."""
    import r4b_fast.training.bpo as bpo
    import r4b_fast.training.bpo_loss as bpo_loss
    import r4b_fast.training.bpo_step as bpo_step

    seen, decided = [], []

    def spy(hidden, weight, completions, advantages, mask, **kwargs):
        seen.append((mask.clone(), advantages.clone()))
        return real(hidden, weight, completions, advantages, mask, **kwargs)

    def spy_decision(hidden, weight, tokens, targets, row_weights, **kwargs):
        decided.append((tokens, targets.clone(), row_weights.clone()))
        return real_decision(hidden, weight, tokens, targets, row_weights, **kwargs)

    real, real_decision = bpo_loss.fused_linear_policy_loss, bpo_loss.mode_decision_loss
    rollouts_seen = []
    real_generate = bpo_step.generate_rollouts
    monkeypatch.setattr(bpo_loss, "fused_linear_policy_loss", spy)
    monkeypatch.setattr(bpo_loss, "mode_decision_loss", spy_decision)
    # the thinking half earns the reward: positive advantages there, negative in the non-thinking half
    monkeypatch.setattr(bpo_step, "accuracy_reward", lambda text, answer: float(not text.startswith("<think>\n\n")))
    monkeypatch.setattr(bpo_step, "generate_rollouts", lambda *a, **k: rollouts_seen.append(real_generate(*a, **k))
                        or rollouts_seen[-1])  # fmt: skip
    argv = ["--model", str(tiny_policy_dir), "--steps", "1", "--prompts", "2", "--g", "2", "--max-new-tokens", "8",
            "--eval-items", "0", "--output-dir", str(tmp_path), *flag]
    assert bpo.main(argv) == 0
    (ro,) = rollouts_seen
    ((mask, adv),) = seen
    assert ro.forced_mask.any() and (adv > 0).any() and (adv < 0).any()
    assert torch.equal(mask, ro.completion_mask & ~ro.forced_mask)  # the forced prefix is never in the policy loss
    if not decision_on:
        assert decided == []
        return
    ((tokens, targets, weights),) = decided
    tok = bpo.load_model(tiny_policy_dir, torch.device("cpu"))[1]
    assert tok.decode([tokens.think]) == "\n" and tok.decode([tokens.no_think]) == "\n\n" and tokens.position == 1
    assert targets.eq(int(bpo.Mode.THINK)).all()
    s = adv.view(2, 4)[:, :2].sum(1)  # per prompt: the thinking half's advantage sum
    torch.testing.assert_close(weights, (s / 4).repeat_interleave(4))
