"""BPO inside TRL's GRPOTrainer (r4b_fast.integrations.trl): a tiny Qwen3 model built from its config class, a
tokenizer built locally (think tags as ordinary added tokens, as in Qwen's tokenizers, and a Qwen3-style chat
template with the enable_thinking switch), an in-memory dataset and a rule-based reward; everything on CPU."""

import math

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'r4b_fast[trl]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs datasets")

from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from r4b_fast.integrations.trl import BPOConfig, BPOTrainer, thinks, trl_reward  # noqa: E402
from r4b_fast.modes import Mode  # noqa: E402
from r4b_fast.ops.fused_linear_logprobs import fused_linear_policy_loss, rollout_importance_weights  # noqa: E402
from r4b_fast.training.mode_decision import decision_targets, mode_decision_loss  # noqa: E402
from r4b_fast.training.rewards import accuracy_reward  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tokenizer(merge_newlines=True) -> PreTrainedTokenizerFast:
    """``merge_newlines``: "\\n\\n" is one token (as in BPE tokenizers), so the mode prefixes part at a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set("0123456789+*=, \n?abcdefghijklmnopqrstuvwxyz:"))
    vocab = {t: i for i, t in enumerate(["<|pad|>", "<unk>", *chars, "\n\n"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    split = r"\n\n|[\s\S]" if merge_newlines else r"[\s\S]"
    core.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|pad|>",
                                  eos_token="<|im_end|>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.add_tokens(["<think>", "</think>"])  # not special: decoded completions keep them (Qwen3's tokenizer does)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tok, seed=0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    return Qwen3ForCausalLM(config).float()


def dataset():
    items = [(2, 3), (4, 1), (3, 3), (5, 2)]
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"what is {a}+{b}?"}] for a, b in items],
                                       "answer": [str(a + b) for a, b in items]})  # fmt: skip


class Recorder:
    """A rule-based reward (accuracy of prefix + completion) that records what TRL passed to it."""

    __name__ = "recorded_accuracy"

    def __init__(self):
        self.calls = []
        self.inner = trl_reward(accuracy_reward)

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        out = self.inner(completions=completions, **kwargs)
        # a known, varied reward: accuracy + a length bonus, so every group has signal
        out = [r + 0.1 * (len(ids) % 3) for r, ids in zip(out, completion_ids)]
        self.calls.append({"completions": completions, "completion_ids": completion_ids, "rewards": out, **kwargs})
        return out


def make_trainer(tmp_path, reward=None, model=None, trainer_kwargs=None, tok=None, **config):
    tok = tok or build_tokenizer()
    settings = dict(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=6, learning_rate=1e-2, max_steps=2, logging_steps=1, report_to="none",
                    use_cpu=True, seed=0, save_strategy="no", loss_type="grpo", beta=0.0, temperature=1.0,
                    disable_dropout=True, gradient_checkpointing=False, bf16=False)  # fmt: skip
    settings.update(config)
    args = BPOConfig(**settings)
    return BPOTrainer(model=model if model is not None else tiny_model(tok), reward_funcs=reward or Recorder(),
                      args=args, train_dataset=dataset(), processing_class=tok, **(trainer_kwargs or {}))  # fmt: skip


def batch_inputs(n_gen=4, rows=(0, 1)):
    data = dataset()
    return [dict(data[i]) for i in rows for _ in range(n_gen)]


def test_prefixes_from_the_template(tmp_path):
    trainer = make_trainer(tmp_path)
    tok = trainer.processing_class
    assert trainer.bpo_prefix_text == {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n"}
    assert trainer.bpo_prefix_ids[Mode.THINK] == tok.convert_tokens_to_ids(["<think>", "\n"])
    assert trainer.bpo_prefix_ids[Mode.NO_THINK] == tok.convert_tokens_to_ids(["<think>", "\n\n", "</think>", "\n\n"])
    # a template whose enable_thinking=False block differs: the non-thinking prefix is the template's, not ours
    tok2 = build_tokenizer()
    tok2.chat_template = CHAT_TEMPLATE.replace("<think>\n\n</think>\n\n{% endif", "<think>\n</think>\n\n{% endif")
    args = BPOConfig(output_dir=str(tmp_path / "o2"), num_generations=4, per_device_train_batch_size=4,
                     report_to="none", use_cpu=True, loss_type="grpo", decision_coef=0.0)  # fmt: skip
    t2 = BPOTrainer(model=tiny_model(tok2), reward_funcs=Recorder(), args=args, train_dataset=dataset(),
                    processing_class=tok2)  # fmt: skip
    assert t2.bpo_prefix_text[Mode.NO_THINK] == "<think>\n</think>\n\n"


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(num_generations=3, per_device_train_batch_size=6), "num_generations"),
        (dict(loss_type="cispo"), "loss_type"),
        (dict(delta=2.0), "delta"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(beta=0.1, use_bias_correction_kl=True), "use_bias_correction_kl"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(think_prefix=""), "think_prefix"),
        (dict(decision_coef=-0.5), "decision_coef"),
        (dict(decision_coef=float("nan")), "decision_coef"),
        (dict(decision_coef="1"), "decision_coef"),
        (dict(decision_tie=-0.25), "decision_tie"),
        (dict(decision_tie=float("inf")), "decision_tie"),
    ],
)
def test_config_refuses_what_the_loss_does_not_do(tmp_path, config, match):
    settings = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none",
                    use_cpu=True, loss_type="grpo")  # fmt: skip
    settings.update(config)
    with pytest.raises(ValueError, match=match):
        BPOConfig(**settings)


def test_trainer_refuses_bad_args(tmp_path):
    tok = build_tokenizer()
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="args"):
        BPOTrainer(model=tiny_model(tok), reward_funcs=Recorder(), processing_class=tok, train_dataset=dataset(),
                   args=GRPOConfig(output_dir=str(tmp_path), num_generations=4, report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="tools"):
        make_trainer(tmp_path, trainer_kwargs=dict(tools=[lambda x: x]))
    tok.chat_template = CHAT_TEMPLATE.replace("assistant\n", "assistant\n<think>\n")  # a thinking-only template
    args = BPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, loss_type="grpo")  # fmt: skip
    with pytest.raises(ValueError, match="already fixes a mode"):
        BPOTrainer(model=tiny_model(tok), reward_funcs=Recorder(), args=args, train_dataset=dataset(),
                   processing_class=tok)  # fmt: skip


def test_split_advantages_and_metrics_on_a_known_batch(tmp_path):
    reward = Recorder()
    trainer = make_trainer(tmp_path, reward=reward)
    tok = trainer.processing_class
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch_inputs())
    (call,) = reward.calls
    g = 2
    modes = call["bpo_mode"]
    assert modes == ["think"] * g + ["no_think"] * g + ["think"] * g + ["no_think"] * g
    # every rollout's prompt is the plain generation prompt + its mode's prefix
    text = tok.apply_chat_template(dataset()[0]["prompt"], add_generation_prompt=True, tokenize=False)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    pref = trainer.bpo_prefix_ids
    for r in range(4):
        ids = out["prompt_ids"][r][out["prompt_mask"][r].bool()].tolist()
        want = pref[Mode.THINK] if modes[r] == "think" else pref[Mode.NO_THINK]
        assert ids == plain + want
    starts = [out["prompt_ids"][r][-len(pref[Mode.NO_THINK]) :].tolist() == pref[Mode.NO_THINK] for r in range(8)]
    assert starts == [False, False, True, True] * 2  # exactly g of each mode per prompt
    # advantages: (r - mean) / (std + 1e-4) over each mixed group of 2g (Bessel std), as TRL normalises
    rewards = torch.tensor(call["rewards"]).view(2, 4)
    want = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    want = torch.where(rewards.std(1, keepdim=True) > 0, want, torch.zeros_like(want))
    torch.testing.assert_close(out["advantages"], want.flatten(), atol=1e-5, rtol=1e-5)
    # per-mode metrics, recomputed from what the reward function saw
    metrics = trainer._metrics["train"]
    flat = torch.tensor(call["rewards"])
    lengths = torch.tensor([float(len(ids)) for ids in call["completion_ids"]])
    for name in ("think", "no_think"):
        sel = torch.tensor([m == name for m in modes])
        assert metrics[f"bpo/{name}/reward"] == [pytest.approx(flat[sel].mean().item())]
        assert metrics[f"bpo/{name}/completion_length"] == [pytest.approx(lengths[sel].mean().item())]
        texts = [p + tok.decode([t for t in ids if t != tok.eos_token_id])
                 for p, ids, s in zip(call["bpo_prefix"], call["completion_ids"], sel) if s]  # fmt: skip
        assert metrics[f"bpo/{name}/think_rate"] == [pytest.approx(sum(map(thinks, texts)) / len(texts))]
    assert call["bpo_prefix"][0] == "<think>\n" and call["bpo_prefix"][2] == "<think>\n\n</think>\n\n"


def test_thinks_and_trl_reward():
    assert thinks("<think>\nx") and not thinks("<think>\n\n</think>\n\n7") and not thinks("7")
    assert thinks("<think>\n\n</think>\n\n<think>more</think>7")  # a reopened block in non-thinking mode
    reward = trl_reward(accuracy_reward)
    out = reward(completions=[[{"role": "assistant", "content": "1+1\n</think>\n\n2"}], [{"content": "3"}]],
                 answer=["2", "2"], bpo_prefix=["<think>\n", "<think>\n\n</think>\n\n"])  # fmt: skip
    assert out == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer_column"):
        reward(completions=["2"], solution=["2"])


def test_trains_bpo_steps_through_trl(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, bf16=True)  # TRL's default: bf16 autocast (on CPU here)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any("layers.0" in n for n in changed)
    logs = [h for h in trainer.state.log_history if "bpo/think/reward" in h]
    assert len(logs) == 3
    for h in logs:
        for key in ("bpo/think/reward", "bpo/no_think/reward", "bpo/think/completion_length",
                    "bpo/no_think/think_rate", "entropy", "clip_ratio/region_mean"):  # fmt: skip
            assert key in h and math.isfinite(h[key])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type="grpo"),
        dict(loss_type="bnpo", beta=0.1),
        dict(loss_type="dr_grpo", epsilon=0.1, epsilon_high=0.3),
        dict(loss_type="dapo", temperature=0.7, beta=0.05),
        dict(loss_type="grpo", importance_sampling_level="sequence"),
        dict(loss_type="bnpo", entropy_coef=0.05),
        dict(loss_type="dapo", vllm="token_truncate"),
        dict(loss_type="grpo", vllm="sequence_truncate"),
    ],
    ids=["grpo", "bnpo-kl", "dr_grpo-clip-higher", "dapo-temp-kl", "gspo", "entropy-bonus", "vllm-is-token",
         "vllm-is-sequence"],
)
def test_loss_and_gradients_equal_trl(tmp_path, config):
    """Plain GRPO (no split): our fused loss on TRL's batch equals TRL's own _compute_loss, gradients included."""
    config = dict(config)
    vllm_mode = config.pop("vllm", None)
    tok = build_tokenizer()
    path = tmp_path / "policy"  # a saved model: TRL builds the beta > 0 reference from its path
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    trainer = make_trainer(tmp_path, model=str(path), mode_split=False, **config)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by train(); 2 exercises the accumulation normaliser
    inputs = trainer._generate_and_score_completions(batch_inputs())
    # off-policy: old log-probs away from the current ones so that some ratios leave the clip range
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    if trainer.beta:
        assert "ref_per_token_logps" in inputs
    if vllm_mode is not None:  # what TRL does with vLLM rollouts, without vLLM: the rollout's log-probs are perturbed
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        rollout = inputs["old_per_token_logps"] + 0.5 * torch.randn(logps.shape, generator=gen)
        level = vllm_mode.split("_")[0]
        weights = rollout_importance_weights(inputs["old_per_token_logps"], rollout, inputs["completion_mask"],
                                             cap=1.5, level=level)  # TRL's *_truncate with clip_max=1.5  # fmt: skip
        inputs["importance_sampling_ratio"] = weights if level == "token" else weights[:, :1]
        assert (weights != 1).any() and (weights == 1.5).any()  # some truncated
    losses, grads = [], []
    for fn in (GRPOTrainer._compute_loss, BPOTrainer._compute_loss):
        model.zero_grad()
        loss = fn(trainer, model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    metrics = trainer._metrics["train"]
    if trainer.importance_sampling_level == "token":  # TRL counts GSPO's clipping per sequence, we per token
        assert metrics["clip_ratio/region_mean"][0] == pytest.approx(metrics["clip_ratio/region_mean"][1], abs=1e-6)
        assert metrics["clip_ratio/region_mean"][0] > 0  # the perturbed old log-probs do clip some tokens
    assert metrics["entropy"][0] == pytest.approx(metrics["entropy"][1], rel=1e-5)


def test_grpo_advantages_equal_trl(tmp_path):
    """Without the split, the advantages that replace TRL's are TRL's own (estimator grpo, one mode)."""
    reward = Recorder()
    trainer = make_trainer(tmp_path, reward=reward, mode_split=False, scale_rewards="batch")
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch_inputs())
    (call,) = reward.calls
    assert call["bpo_mode"] == ["auto"] * 8 and call["bpo_prefix"] == [""] * 8
    trl_adv = torch.tensor(list(trainer._logs["advantages"]))  # replaced by ours: recompute TRL's formula
    r = torch.tensor(call["rewards"])
    want = (r - r.view(2, 4).mean(1).repeat_interleave(4)) / (r.std() + 1e-4)
    torch.testing.assert_close(out["advantages"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trl_adv, want, atol=1e-5, rtol=1e-5)
    assert "bpo/auto/reward" in trainer._metrics["train"]


def test_modes_follow_the_global_position(tmp_path):
    """TRL's sampler lays groups of num_generations out in a row over all processes: a process holding half a group
    gets the right half's modes (here: 2 processes x 2 rollouts, groups of 4)."""
    trainer = make_trainer(tmp_path)
    T, N = Mode.THINK, Mode.NO_THINK
    assert trainer._group_modes(2, 0, 4) == [T, T] and trainer._group_modes(2, 2, 4) == [N, N]
    assert trainer._group_modes(8, 0, 8) == [T] * 4 + [N] * 4
    assert trainer._group_modes(6, 6, 6) == [T] * 3 + [N] * 3


# ---------------------------------------------------------------------------------------------- mode-decision loss
def mixed_inputs():
    """Two prompts of different lengths, 4 rollouts each: with the 2- and 4-token prefixes, left padding differs."""
    items = (("what is 2+3?", "5"), ("what is 12+30, then times 1?", "42"))
    return [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in items for _ in range(4)]


def decision_reference(model, dec, out, target, weight, normaliser, shift=0):
    """mode_decision_loss from a plain forward of the backbone, row by row: each row's forced prefix is located by
    searching its prompt for the ``<think>`` token, and handed over as the "completion" whose token ``position`` is
    the decision (``shift`` moves the state off the right one, to show that the comparison tells)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    states = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    open_id = model.config.think_open_id
    total, p_think = 0.0, []
    for r in range(ids.size(0)):
        start = (out["prompt_ids"][r] == open_id).nonzero()[-1].item()  # the prefix starts at <think>
        hidden = states[r : r + 1, start - 1 + shift :]  # hidden[:, t] predicts the prefix's token t
        loss, m = mode_decision_loss(hidden, model.lm_head.weight, dec, target[r : r + 1], weight[r : r + 1],
                                     normaliser=normaliser)  # fmt: skip
        total = total + loss
        p_think.append(m["decision_p_think"])
    return total, torch.cat(p_think)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_decision_loss_equals_mode_decision_loss_at_the_prompt_position(tmp_path, loss_type):
    reward = Recorder()
    trainer = make_trainer(tmp_path, reward=reward, decision_coef=0.5, decision_tie=0.25, loss_type=loss_type)
    tok, model = trainer.processing_class, trainer.model
    model.config.think_open_id = tok.convert_tokens_to_ids("<think>")
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    dec = trainer.bpo_decision
    assert (dec.position, dec.think, dec.no_think) == (1, *tok.convert_tokens_to_ids(["\n", "\n\n"]))
    out = trainer._generate_and_score_completions(mixed_inputs())
    assert len(set(out["prompt_mask"].sum(1).tolist())) == 4 and (out["prompt_mask"][:, 0] == 0).any()
    # targets and weights: decision_targets over each mixed group of 2g, from what the reward function saw
    (call,) = reward.calls
    modes = torch.tensor([int(Mode.THINK if m == "think" else Mode.NO_THINK) for m in call["bpo_mode"]])
    lengths = torch.tensor([float(len(ids)) for ids in call["completion_ids"]])
    target, weight = decision_targets(out["advantages"], modes, 4, rewards=torch.tensor(call["rewards"]),
                                      lengths=lengths, tie_weight=0.25)  # fmt: skip
    assert torch.equal(out["bpo_decision_target"], target) and (weight > 0).all()
    torch.testing.assert_close(out["bpo_decision_weight"], weight)
    # the trainer's loss = the policy loss alone + 0.5 * the reference decision term, over the policy loss's
    # normaliser: rows x accumulation steps (grpo), tokens x accumulation steps (bnpo)
    normaliser = 8 * 2 if loss_type == "grpo" else out["completion_mask"].sum().float() * 2
    model.zero_grad()
    loss = trainer._compute_loss(model, out)
    loss.backward()
    grads = _grads(model)
    trainer.bpo_decision = None  # the policy loss alone, on the same batch
    model.zero_grad()
    policy = trainer._compute_loss(model, out)
    ref, p_think = decision_reference(model, dec, out, target, weight, normaliser=normaliser)
    (policy + 0.5 * ref).backward()
    metrics = trainer._metrics["train"]
    assert metrics["bpo/decision_loss"] == [pytest.approx(ref.item(), rel=1e-5)]
    assert metrics["bpo/decision_p_think"] == [pytest.approx(p_think.mean().item(), rel=1e-5)]
    torch.testing.assert_close(loss.detach(), (policy + 0.5 * ref).detach(), atol=1e-6, rtol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    for shift in (-1, 1):  # the state one before or after: a different loss, which the comparison above tells
        off, _ = decision_reference(model, dec, out, target, weight, normaliser=normaliser, shift=shift)
        assert abs(off.item() - ref.item()) > 1e-3 * abs(ref.item()) + 1e-4


def think_probability(model, tok) -> torch.Tensor:
    """p2(think) at auto mode's decision, for each dataset prompt: a plain forward of generation prompt + <think>."""
    probs = []
    think, no_think = tok.convert_tokens_to_ids(["\n", "\n\n"])
    for prompt in dataset()["prompt"]:
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) + "<think>"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        probs.append(torch.softmax(logits[[think, no_think]], 0)[0])
    return torch.stack(probs)


def favour_thinking(completions, bpo_mode, **kwargs):
    return [1.0 if m == "think" else 0.0 for m in bpo_mode]


@pytest.mark.parametrize("coef", [1.0, 0.0])
def test_a_reward_for_thinking_raises_p_think(tmp_path, coef):
    """The thinking half always wins: the decision loss raises p(think) after '<think>'; without it (coef 0) the
    decision barely moves (only the shared weights drift), so the rise is the loss's doing."""
    # two micro-batches per generation: the per-row decision targets travel through TRL's shuffle and split
    trainer = make_trainer(tmp_path, reward=favour_thinking, max_steps=3, decision_coef=coef,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2)
    tok = trainer.processing_class
    before = think_probability(trainer.model, tok)
    trainer.train()
    after = think_probability(trainer.model, tok)
    rise = (after - before).min().item()
    if coef:
        assert rise > 0.2, (before, after)
        logs = [h for h in trainer.state.log_history if "bpo/decision_p_think" in h]
        assert len(logs) == 3 and logs[-1]["bpo/decision_p_think"] > logs[0]["bpo/decision_p_think"]
    else:
        assert (after - before).abs().max().item() < 0.05, (before, after)
        assert not any("bpo/decision_loss" in h for h in trainer.state.log_history)


def test_decision_coef_zero_leaves_the_loss_exact(tmp_path):
    """decision_coef=0 (or mode_split=False): the loss is the fused policy loss alone, bit for bit, and no decision
    metric is logged; with decision_coef > 0 the same comparison fails."""
    assert make_trainer(tmp_path, mode_split=False).bpo_decision is None
    on = make_trainer(tmp_path, decision_coef=1.0)
    off = make_trainer(tmp_path, decision_coef=0.0)
    assert off.bpo_decision is None
    on.model.train()
    off.model.train()
    out = on._generate_and_score_completions(mixed_inputs())
    assert "bpo_decision_target" in out
    assert "bpo_decision_target" not in off._generate_and_score_completions(mixed_inputs())

    def policy_alone(trainer):
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        spec = trainer._policy_loss_spec(out, out["completion_mask"])
        spec.pop("decision", None)
        keep, _ = spec.pop("logits_to_keep"), spec.pop("cast_lm_head_to_fp32")
        states = trainer.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return fused_linear_policy_loss(states[:, -keep - 1 : -1], trainer.model.lm_head.weight, **spec)[0]

    for trainer in (on, off):
        trainer.current_gradient_accumulation_steps = 1
    assert torch.equal(off._compute_loss(off.model, out), policy_alone(off))
    assert "bpo/decision_loss" not in off._metrics["train"]
    assert not torch.equal(on._compute_loss(on.model, out), policy_alone(on))
    assert "bpo/decision_loss" in on._metrics["train"]


def test_refuses_prefixes_that_do_not_part_at_a_token(tmp_path):
    """Without a "\\n\\n" token, "<think>\\n" is a token prefix of "<think>\\n\\n</think>\\n\\n": no decision token."""
    tok = build_tokenizer(merge_newlines=False)
    with pytest.raises(ValueError, match="decision_coef=0 or use a tokenizer that merges"):
        make_trainer(tmp_path, tok=tok)
    assert make_trainer(tmp_path, tok=tok, decision_coef=0.0).bpo_decision is None


def test_vllm_server_mode_is_refused_with_the_split(tmp_path):
    settings = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none",
                    use_cpu=True, loss_type="grpo", use_vllm=True, vllm_mode="server")  # fmt: skip
    with pytest.raises(ValueError, match="vllm_mode"):
        BPOConfig(**settings)
    BPOConfig(**{**settings, "mode_split": False})  # plain GRPO: one prompt per group is right


def test_rewards_see_think_tags_that_the_tokenizer_marks_special(tmp_path):
    """The task tokenizer registers <think> / </think> as special tokens, which TRL's decoded completions lose:
    trl_reward's functions decode the completion ids themselves (the trainer hands them the tokenizer); any other
    reward function gets a warning."""
    from r4b_fast.training.rewards import accuracy_reward

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})  # as the project's task tokenizer
    assert "</think>" in tok.all_special_tokens
    ids = tok("x\n</think>\n\n7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stripped = tok.decode(ids, skip_special_tokens=True)  # what TRL passes as the completion
    assert "</think>" not in stripped
    reward = trl_reward(accuracy_reward)
    kw = dict(completions=[stripped], completion_ids=[ids], answer=["7"], bpo_prefix=["<think>\n"])
    assert reward(**kw) == [0.0]  # without the tokenizer: the answer after </think> is not found
    trainer = make_trainer(tmp_path, reward=reward, tok=tok)
    assert reward.tokenizer is trainer.processing_class
    assert reward(**kw) == [1.0]

    def plain(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.warns(UserWarning, match="special tokens"):
        make_trainer(tmp_path / "w", reward=plain, tok=tok)
