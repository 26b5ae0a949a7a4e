"""BPOTrainer refuses, when it is built and before any model forward, what it cannot train: each case names the
field (family, processor, dataset column, TRL option)."""

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'r4b_fast[trl]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs datasets")

from test_integration_trl import build_tokenizer, tiny_model  # noqa: E402
from test_trl_vlm import SETTINGS, build, reward_fn, vlm_dataset  # noqa: E402

from r4b_fast.integrations.trl import BPOConfig, BPOTrainer  # noqa: E402


def no_forward(model):
    """A pre-hook that fails the test if the model runs a forward."""

    def hook(*_):
        raise AssertionError("a model forward ran before the refusal")

    return model.register_forward_pre_hook(hook)


def construct(tmp_path, model, processing_class, dataset, trainer_kwargs=None, **config):
    settings = dict(SETTINGS, output_dir=str(tmp_path / "out"))
    settings.update(config)
    handle = no_forward(model)
    try:
        return BPOTrainer(model=model, reward_funcs=reward_fn(), args=BPOConfig(**settings), train_dataset=dataset,
                          processing_class=processing_class, **(trainer_kwargs or {}))  # fmt: skip
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build("qwen2_5_vl", tmp_path_factory)


def test_images_without_a_processor(tmp_path, qwen):
    model, processor = qwen
    with pytest.raises(ValueError, match="processing_class: the dataset has images"):
        construct(tmp_path, model, processor.tokenizer, vlm_dataset("qwen2_5_vl"))


def test_a_processor_for_a_model_outside_the_families(tmp_path, qwen):
    _, processor = qwen
    tok = build_tokenizer()
    text_model = tiny_model(tok)
    text_model.config.vocab_size = len(processor.tokenizer)
    with pytest.raises(ValueError, match="model: Qwen3ForCausalLM is not a vision-language family"):
        construct(tmp_path, text_model, processor, vlm_dataset("qwen2_5_vl"))


def test_a_processor_whose_placeholder_is_not_the_models(tmp_path, tmp_path_factory):
    model, processor = build("qwen2_5_vl", tmp_path_factory)
    model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with pytest.raises(ValueError, match="processing_class.image_token_id"):
        construct(tmp_path, model, processor, vlm_dataset("qwen2_5_vl"))


def test_video_columns(tmp_path, qwen):
    model, processor = qwen
    data = vlm_dataset("qwen2_5_vl").add_column("video", ["v.mp4"] * 4)
    with pytest.raises(ValueError, match="train_dataset: video columns"):
        construct(tmp_path, model, processor, data)


def test_strict_modes_with_a_rollout_func(tmp_path, qwen):
    model, processor = qwen
    with pytest.raises(ValueError, match="rollout_func"):
        construct(tmp_path, model, processor, vlm_dataset("qwen2_5_vl"), mode_split=False, no_reopen=True,
                  trainer_kwargs=dict(rollout_func=lambda *a, **k: None))  # fmt: skip


def test_a_prefix_that_does_not_continue_an_open_think_tag(tmp_path, tmp_path_factory):
    from test_models import HAS_R4B

    if not HAS_R4B:
        pytest.skip("r4b_fast/models/r4b.py is not in this tree")
    model, processor = build("r4b", tmp_path_factory)
    with pytest.raises(ValueError, match="BPOConfig.think_prefix"):
        construct(tmp_path, model, processor, vlm_dataset("r4b"), think_prefix="Let me think.\n")


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(strict_auto=True), "BPOConfig.strict_auto"),  # no auto rows with the split
        (dict(mode_split=False, min_think_tokens=2), "BPOConfig.min_think_tokens"),
        (dict(min_think_tokens=6), "BPOConfig.min_think_tokens"),  # >= max_completion_length
        (dict(min_think_tokens=-1), "BPOConfig.min_think_tokens"),
        (dict(no_reopen=1), "BPOConfig.no_reopen"),
        (dict(no_reopen=True, use_transformers_continuous_batching=True), "use_transformers_continuous_batching"),
    ],
)
def test_config_refuses_strict_modes_it_cannot_apply(tmp_path, config, match):
    settings = dict(SETTINGS, output_dir=str(tmp_path))
    settings.update(config)
    with pytest.raises(ValueError, match=match):
        BPOConfig(**settings)


def test_nothing_ran_before_a_successful_construction(tmp_path, qwen):
    """The refusals above are checked with a forward pre-hook; a supported set-up builds without a forward too."""
    model, processor = qwen
    trainer = construct(tmp_path, model, processor, vlm_dataset("qwen2_5_vl"), no_reopen=True, min_think_tokens=2)
    assert trainer.bpo_vision.key == "mm_token_type_ids" and trainer.bpo_strict is not None
    assert torch.is_tensor(next(trainer.model.parameters()))
