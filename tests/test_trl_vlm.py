"""BPOTrainer (r4b_fast.integrations.trl) on vision-language models with images: LLaVA-OneVision, R-4B (our class),
Qwen2.5-VL and Qwen3-VL, tiny random models built from their config classes (as in test_models.py), their processors
built without torchvision (r4b_fast.models.processor_for: PIL image processors; torchvision is not importable here),
PIL-made images, on CPU.

Per family: 3 steps of trainer.train() with images and strict modes; with the split off, loss and every gradient
equal TRL's own GRPOTrainer on the same batch (fp32); for rows of different prompt lengths (and, for the Qwen
families, image counts), the fused path's per-token log-probs equal the model's own forward of each row alone with
its images, with negative controls: token types shifted by one, padded on the wrong side (TRL #5785) or dropped
from the fused forward (TRL #6697) break the equality."""

import math

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'r4b_fast[trl]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs datasets")

from test_models import FAMILY_PARAMS, HAS_R4B, WRITERS  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from r4b_fast.integrations.trl import (  # noqa: E402
    _FORWARD_KEYS,  # noqa: E402
    BPOConfig,
    BPOTrainer,
    trl_reward,
)
from r4b_fast.integrations.trl_strict import violations  # noqa: E402
from r4b_fast.models import processor_for  # noqa: E402
from r4b_fast.modes import Mode  # noqa: E402
from r4b_fast.training.rewards import accuracy_reward  # noqa: E402

ITEMS = [("what is 2+3?", "5"), ("what is 12+30, then times 1?", "42"), ("what is 4+1?", "5"), ("what is 3+3?", "6")]
# (width, height) per image of each item; the Qwen families get a second image on item 1 (two image counts)
SIZES = [[(16, 16)], [(24, 16)], [(16, 24)], [(16, 16)]]


def image(size, seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


_BUILT = {}


def build(name, tmp_path_factory, padding_side="left"):
    """``(model, processor)`` of a tiny random model of family ``name`` (fresh weights each call)."""
    if name == "r4b":
        from r4b_fast.models import r4b

        if "r4b" not in _BUILT:
            _BUILT["r4b"] = r4b.write_tiny_r4b_checkpoint(tmp_path_factory.mktemp("r4b"))
        path = _BUILT["r4b"]
        model = r4b.load_r4b(str(path))
        processor = processor_for(path, padding_side=padding_side)
    else:
        model, tok, image_processor = WRITERS[name](None)
        processor = processor_for(model.config, tokenizer=tok, image_processor=image_processor,
                                  padding_side=padding_side)  # fmt: skip
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.float(), processor


def multi_image(name):
    return family_of_name(name) == "mrope"


def family_of_name(name):
    return "mrope" if name.startswith("qwen") else "1d"


def vlm_dataset(name):
    sizes = [list(s) for s in SIZES]
    if multi_image(name):
        sizes[1] = sizes[1] + [(16, 16)]
    images = [[image(s, 10 * i + j) for j, s in enumerate(row)] for i, row in enumerate(sizes)]
    data = {"prompt": [[{"role": "user", "content": q}] for q, _ in ITEMS], "answer": [a for _, a in ITEMS]}
    if multi_image(name):
        data["images"] = images
    else:
        data["image"] = [row[0] for row in images]
    return datasets.Dataset.from_dict(data)


def reward_fn():
    inner = trl_reward(accuracy_reward)

    def reward(completions, completion_ids, **kwargs):  # accuracy + a bonus by ids: every group has signal
        out = inner(completions=completions, completion_ids=completion_ids, **kwargs)
        return [r + 0.1 * (sum(ids) % 5) for r, ids in zip(out, completion_ids)]

    reward.__name__ = "accuracy_and_length"
    return reward


SETTINGS = dict(num_generations=4, per_device_train_batch_size=4, max_completion_length=6, learning_rate=1e-2,
                max_steps=3, logging_steps=1, report_to="none", use_cpu=True, seed=0, save_strategy="no",
                loss_type="grpo", beta=0.0, temperature=1.0, disable_dropout=True, gradient_checkpointing=False,
                bf16=False)  # fmt: skip


def make(name, tmp_path, model, processor, config_cls=BPOConfig, trainer_cls=BPOTrainer, **config):
    settings = dict(SETTINGS, output_dir=str(tmp_path / "out"))
    settings.update(config)
    args = config_cls(**settings)
    return trainer_cls(model=model, reward_funcs=reward_fn(), args=args, train_dataset=vlm_dataset(name),
                       processing_class=processor)  # fmt: skip


def batch(name, rows=(0, 1), n_gen=4):
    data = vlm_dataset(name)
    return [dict(data[i]) for i in rows for _ in range(n_gen)]


# ------------------------------------------------------------------------------------------------ training runs
@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_trains_three_steps_with_images_and_strict_modes(tmp_path_factory, tmp_path, name):
    model, processor = build(name, tmp_path_factory)
    trainer = make(name, tmp_path, model, processor, min_think_tokens=2, no_reopen=True)
    seen = []
    original = trainer._generate_and_score_completions

    def record(inputs):
        out = original(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = record
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert math.isfinite(result.training_loss) and len(seen) == 3
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("vision" in n or "visual" in n for n in changed)  # the images reached the loss
    assert any("language_model" in n for n in changed)
    logs = [h for h in trainer.state.log_history if "bpo/think/reward" in h]
    assert len(logs) == 3
    for h in logs:
        for key in ("bpo/think/reward", "bpo/no_think/reward", "bpo/decision_loss", "strict/constrained_frac",
                    "strict/logp_mismatch/mean"):  # fmt: skip
            assert key in h and math.isfinite(h[key])
    assert any(h["strict/constrained_frac"] > 0 for h in logs)  # min_think_tokens bans </think> / eos early
    rules = trainer.bpo_strict_rules
    for out in seen:  # every completion obeys the strict rules
        prompts = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
        modes = [rules.mode_of(p) for p in prompts]
        assert modes == [Mode.THINK, Mode.THINK, Mode.NO_THINK, Mode.NO_THINK]
        comps = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
        assert violations(rules, modes, comps) == []
        assert "pixel_values" in out and (("image_grid_thw" in out) == multi_image(name))


# ------------------------------------------------------------------------------------- parity with TRL (no split)
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_no_split_loss_and_gradients_equal_trl_on_a_vlm_batch(tmp_path_factory, tmp_path, name):
    model, processor = build(name, tmp_path_factory)
    bpo = make(name, tmp_path, model, processor, mode_split=False, per_device_train_batch_size=8)
    plain = {k: v for k, v in SETTINGS.items()}
    grpo = make(name, tmp_path / "trl", model, processor, config_cls=GRPOConfig, trainer_cls=GRPOTrainer,
                **dict(plain, per_device_train_batch_size=8, output_dir=str(tmp_path / "trl")))  # fmt: skip
    model.train()
    for t in (bpo, grpo):
        t.current_gradient_accumulation_steps = 1
    inputs = bpo._generate_and_score_completions(batch(name))
    assert "pixel_values" in inputs
    if multi_image(name):  # left-padding processor: our rebuilt token types are the processor's own
        assert inputs["mm_token_type_ids"].sum() > 0
    with torch.no_grad():  # off-policy old log-probs, so that the clip is exercised
        logps, _, _ = grpo._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1),
            num_images=inputs.get("num_images"), **{k: inputs[k] for k in _FORWARD_KEYS if k in inputs})
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for trainer, fn in ((grpo, GRPOTrainer._compute_loss), (bpo, BPOTrainer._compute_loss)):
        model.zero_grad()
        loss = fn(trainer, model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    assert any("vision" in n or "visual" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------- fused log-probs vs each row's own forward
def _row_reference(model, processor, name, ids, images):
    """Next-token log-probs of the model's own forward on one unpadded row with its own images."""
    kwargs = {}
    if images:
        pix = processor.image_processor(images=images, return_tensors="pt")
        kwargs["pixel_values"] = pix["pixel_values"]
        if multi_image(name):
            kwargs["image_grid_thw"] = pix["image_grid_thw"]
            kwargs["mm_token_type_ids"] = (ids == processor.image_token_id).long()[None]
        else:
            kwargs["image_sizes"] = pix["image_sizes"]
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **kwargs).logits[0]
    return out.float().log_softmax(-1)


def _fused_logprobs(trainer, model, inputs, **override):
    """The fused path's per-token log-probs: the hidden states its forward computes (captured), through the head,
    and the loss's own ``logprob_mean``."""
    captured = {}

    def hook(module, args, out):  # returns None: the output is left as it is
        captured.setdefault("h", out.last_hidden_state)

    handle = model.model.register_forward_hook(hook)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    extra = {k: inputs[k] for k in _FORWARD_KEYS if inputs.get(k) is not None}
    extra.update(override)
    extra = {k: v for k, v in extra.items() if v is not None}
    spec = trainer._policy_loss_spec(inputs, inputs["completion_mask"])
    spec.pop("decision", None)
    try:
        with torch.no_grad():
            _, metrics = model(input_ids=ids, attention_mask=attn, r4b_policy_loss=spec, **extra)
    finally:
        handle.remove()
    keep = inputs["completion_ids"].size(1)
    hidden = captured["h"][:, -keep - 1 : -1]
    logp = (hidden @ model.lm_head.weight.T).float().log_softmax(-1)
    _fused_logprobs.states = captured["h"]
    return logp.gather(-1, inputs["completion_ids"][..., None])[..., 0], metrics


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_fused_logprobs_equal_each_rows_own_forward(tmp_path_factory, tmp_path, name, padding_side):
    """Rows of different prompt lengths (mode prefixes of 2 and 4+ tokens, different image sizes, and for the Qwen
    families one or two images) in one left-padded batch. A processor padding on the right (TRL #5785) changes
    nothing: the token types come from the trained ids."""
    model, processor = build(name, tmp_path_factory, padding_side=padding_side)
    trainer = make(name, tmp_path, model, processor, per_device_train_batch_size=8)
    model.eval()
    data = vlm_dataset(name)
    inputs = trainer._generate_and_score_completions(batch(name))
    pmask, cmask = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    assert len(set(pmask.sum(1).tolist())) > 2  # different prompt lengths: real left padding
    got, metrics = _fused_logprobs(trainer, model, inputs)
    want = torch.zeros_like(got)
    for r in range(got.size(0)):
        row = data[r // 4]
        imgs = row["images"] if multi_image(name) else [row["image"]]
        ids = torch.cat([inputs["prompt_ids"][r][pmask[r]], inputs["completion_ids"][r][cmask[r]]])
        ref = _row_reference(model, processor, name, ids, imgs)
        L = int(pmask[r].sum())
        want[r, : int(cmask[r].sum())] = ref[L - 1 : -1].gather(-1, ids[L:, None])[:, 0]
    torch.testing.assert_close(got[cmask], want[cmask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metrics["logprob_mean"], want[cmask].mean(), atol=1e-4, rtol=1e-4)
    if not multi_image(name):
        return
    # negative controls: token types misaligned by one, or dropped from the fused forward (TRL #6697)
    types = inputs["mm_token_type_ids"]
    wrong, _ = _fused_logprobs(trainer, model, inputs, mm_token_type_ids=torch.roll(types, 1, dims=1))
    assert (wrong[cmask] - want[cmask]).abs().max() > 1e-3
    try:  # Qwen3-VL refuses a forward without them; Qwen2.5-VL silently falls back to 1-D positions
        wrong, _ = _fused_logprobs(trainer, model, inputs, mm_token_type_ids=None)
    except ValueError as err:
        assert "mm_token_type_ids" in str(err)
    else:
        assert (wrong[cmask] - want[cmask]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_decision_state_is_each_rows_own_with_its_images(tmp_path_factory, tmp_path, name):
    """The mode-decision loss reads, per row, the state before the decision token (a prompt position, left padding,
    prefixes of different lengths): it equals that row's own forward with its images at that position."""
    from r4b_fast.integrations.trl_loss import decision_positions

    model, processor = build(name, tmp_path_factory)
    trainer = make(name, tmp_path, model, processor, per_device_train_batch_size=8)
    model.eval()
    data = vlm_dataset(name)
    inputs = trainer._generate_and_score_completions(batch(name))
    _fused_logprobs(trainer, model, inputs)
    states = _fused_logprobs.states
    pos = decision_positions(trainer, inputs)
    d = trainer.bpo_decision
    pmask = inputs["prompt_mask"].bool()
    width = pmask.size(1)
    for r in range(pos.numel()):
        assert int(inputs["prompt_ids"][r, pos[r] + 1]) == (d.think if r % 4 < 2 else d.no_think)
        row = data[r // 4]
        imgs = row["images"] if multi_image(name) else [row["image"]]
        ids = inputs["prompt_ids"][r][pmask[r]]
        ref = _row_reference(model, processor, name, ids, imgs)
        at = int(pos[r]) - (width - int(pmask[r].sum()))  # the same position in the unpadded row
        mine = (states[r, pos[r]] @ model.lm_head.weight.T).float().log_softmax(-1)
        torch.testing.assert_close(mine, ref[at], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_R4B, reason="r4b_fast/models/r4b.py is not in this tree")
def test_r4b_template_keeps_its_open_think_tag(tmp_path_factory, tmp_path):
    """R-4B's template ends the generation prompt with ``<think>`` (auto mode): the forced prefixes are what follows
    it, and the decision token is the first of them."""
    model, processor = build("r4b", tmp_path_factory)
    trainer = make("r4b", tmp_path, model, processor)
    tok = processor.tokenizer
    assert trainer.bpo_prefix_text == {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n"}
    assert tok.decode(trainer.bpo_prefix_ids[Mode.THINK]) == "\n"
    assert tok.decode(trainer.bpo_prefix_ids[Mode.NO_THINK]) == "\n\n</think>\n\n"
    assert trainer.bpo_decision.position == 0
