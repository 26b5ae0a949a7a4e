"""r4b_fast.models: every family the loops load (LLaVA-OneVision, R-4B, Qwen2.5-VL, Qwen3-VL), from a folder as a
user's download looks (config, safetensors weights, a byte-level BPE tokenizer with the family's special tokens and
chat template, preprocessor_config.json), all built here from transformers config classes (nothing downloaded).

Per family: the mode prefixes come from the chat template and the thinking prefix is not a token prefix of the
non-thinking one; the loop's packed forward equals the model's own padded forward (SFT log-probs and BPO's policy
hidden states); the rollout engine's log-probs equal the model's own forward on the generated tokens; both loops
run one step and the saved folder loads back as the same family."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from r4b_fast.models import FAMILIES, ChatFormat, ModeIds, detect_family, family_of, load_pretrained
from r4b_fast.modes import Mode
from r4b_fast.training.task import MODE_PREFIX, THINK_CLOSE_SEQUENCE, build_tokenizer, prompt_text, sample_items

HAS_R4B = importlib.util.find_spec("r4b_fast.models.r4b") is not None

# Qwen2's pre-tokenizer split (digits alone, letters with one leading non-letter, punctuation runs with their
# trailing newlines, newline runs): what makes "<think>\n" and "<think>\n\n..." differ in their second token
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")  # fmt: skip
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]  # fmt: skip

# the families' chat templates, shaped like the published ones
QWEN25_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's hybrid thinking switch on a Qwen3-VL prompt (the published Qwen3-VL Instruct template has no switch, as
# Qwen2.5-VL's; the Thinking one always opens the block: both shapes are covered by the ChatFormat tests)
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bpe_tokenizer(special: list[str], template: str, extra_words: list[str] = ()):
    """A byte-level BPE (Qwen2's split) trained here on the task's text and the mode strings, with ``special``
    tokens, ``<|im_end|>`` as eos, ``<|endoftext|>`` as padding and ``template`` as its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    core.decoder = decoders.ByteLevel()
    items = sample_items(200, 0)
    corpus = [f"{it.question} {it.steps} {it.answer}" for it in items]
    corpus += [MODE_PREFIX[Mode.THINK] + "x" + THINK_CLOSE_SEQUENCE + "7", MODE_PREFIX[Mode.NO_THINK] + "7",
               "system\nYou are a helpful assistant.\nuser\nassistant\n", "a\n\nb", *extra_words] * 200  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def _qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 4-pixel patches merged 2x2: a 16x16 image is a 4x4 grid, 4 placeholders; 16x24 a 4x6 grid, 6
    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 64, "longest_edge": 4096})  # fmt: skip


def _qwen_ids(tok):
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    return ids


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2)  # fmt: skip


def write_qwen25_vl(path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = bpe_tokenizer(QWEN_SPECIAL, QWEN25_VL_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **TEXT),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=True, **_qwen_ids(tok))  # fmt: skip
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config), tok, _qwen_image_processor()


def write_qwen3_vl(path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = bpe_tokenizer(QWEN_SPECIAL + ["<think>", "</think>"], QWEN3_VL_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), head_dim=8, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True}, **TEXT),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=True, **_qwen_ids(tok))  # fmt: skip
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config), tok, _qwen_image_processor()


def write_llava_onevision(path):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = bpe_tokenizer(QWEN_SPECIAL + ["<image>", "<video>"], LLAVA_OV_TEMPLATE)
    pinpoints = [[16, 16], [16, 32], [32, 16]]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints,
                                                do_pad=True)  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config), tok, processor


WRITERS = {"qwen2_5_vl": write_qwen25_vl, "qwen3_vl": write_qwen3_vl, "llava_onevision": write_llava_onevision}
NAMES = ["llava_onevision", "r4b", "qwen2_5_vl", "qwen3_vl"]
FAMILY_PARAMS = [pytest.param(n, marks=pytest.mark.skipif(
    n == "r4b" and not HAS_R4B, reason="r4b_fast/models/r4b.py (R-4B's model class) is not in this tree yet"))
    for n in NAMES]  # fmt: skip


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the folder of a tiny checkpoint of that family (written once per module)."""
    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            if name == "r4b":
                from r4b_fast.models import r4b

                r4b.write_tiny_r4b_checkpoint(path)
            else:
                model, tok, processor = WRITERS[name](path)
                model.save_pretrained(path)
                tok.save_pretrained(path)
                processor.save_pretrained(path)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny jsonl dataset of PNG images (16x16 and 16x24: two patch grids) with thinking and non-thinking rows,
    and a 2-row evaluation file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rows = []
    for i, it in enumerate(sample_items(6, 3)):
        img = it.image()
        if i % 2:
            img = torch.nn.functional.interpolate(img[None], size=(16, 24), mode="nearest")[0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": it.question, "answer": it.answer, "hard": it.hard,
                     "mode": "think" if i % 3 == 0 else "no_think", "thought": it.steps})  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    return root


def _load(path):
    model, tok, family = load_pretrained(path, "cpu")
    return model, tok, family


# ---------------------------------------------------------------------------------------------------------------
# detection and bad input
# ---------------------------------------------------------------------------------------------------------------
def test_detect_family_by_architecture_and_model_type():
    for family in FAMILIES:
        assert detect_family({"architectures": [family.architectures[0]]}) is family
    assert detect_family({"model_type": "qwen3_vl"}).name == "qwen3_vl"
    assert detect_family({"model_type": "llava_onevision"}).name == "llava_onevision"
    # R-4B's own config names its class: it is not taken for LLaVA-OneVision
    r4b_config = {"architectures": ["RForConditionalGeneration"], "model_type": "llava_onevision"}
    assert detect_family(r4b_config).name == "r4b"
    assert detect_family({"model_type": "rvl"}).name == "r4b"


@pytest.mark.skipif(not HAS_R4B, reason="r4b_fast/models/r4b.py (R-4B's model class) is not in this tree yet")
def test_r4b_detection_agrees_with_the_r4b_module(family_dir):
    from r4b_fast.models import R4B, r4b

    assert R4B.model_types == (r4b.R4B_MODEL_TYPE,) and R4B.architectures == (r4b.R4B_ARCHITECTURE,)
    assert detect_family(family_dir("r4b")) is R4B and r4b.is_r4b_checkpoint(family_dir("r4b"))


def test_unsupported_architecture_names_what_was_found_and_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                      "model_type": "gemma3"}))  # fmt: skip
    with pytest.raises(ValueError, match=r"unsupported architecture \['Gemma3ForConditionalGeneration'\].*gemma3.*"
                                         r"supported: R-4B.*LLaVA-OneVision.*Qwen2.5-VL.*Qwen3-VL"):  # fmt: skip
        load_pretrained(tmp_path, "cpu")
    from r4b_fast.training.common import load_model

    with pytest.raises(ValueError, match="--model: unsupported architecture"):
        load_model(tmp_path, "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(empty, "cpu")


def test_qwen_family_without_image_processor_is_refused(family_dir, tmp_path):
    from r4b_fast.training.vision import ImageEncoder

    model, _, _ = _load(family_dir("qwen2_5_vl"))
    with pytest.raises(ValueError, match=r"Qwen2.5-VL needs its checkpoint's image processor"):
        ImageEncoder.for_model(model, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# chat templates and mode prefixes
# ---------------------------------------------------------------------------------------------------------------
def test_project_format_without_a_template_is_the_task_format():
    tok = build_tokenizer()
    fmt = ChatFormat.from_tokenizer(tok)
    assert not fmt.uses_template and fmt.image_token == "<image>"
    item = sample_items(1, 0)[0]
    assert fmt.prompt(item.question, 5) == prompt_text(item, 5)
    assert fmt.mode_prefix == MODE_PREFIX and fmt.think_close == THINK_CLOSE_SEQUENCE
    ids = ModeIds.from_format(fmt)
    assert (ids.think_start, ids.think_end) == tuple(tok.convert_tokens_to_ids(["<think>", "</think>"]))


def _template_tokenizer(template):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


R4B_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>{% else %}{{ '\\n' + c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    "{% if thinking_mode == 'long' %}<think>\n{% elif thinking_mode == 'short' %}<think>\n\n</think>\n\n{% endif %}"
)
ALWAYS_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>{% else %}{{ '\\n' + c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    "{{ '<think>\\n' }}"
)


def test_template_switches_and_an_always_thinking_template():
    item = sample_items(1, 0)[0]
    want_prompt = prompt_text(item, 3)  # these templates write the project's prompt
    fmt = ChatFormat.from_tokenizer(_template_tokenizer(R4B_STYLE_TEMPLATE))
    assert fmt.switch == "thinking_mode" and fmt.prompt(item.question, 3) == want_prompt
    assert fmt.mode_prefix == {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: ""}
    fmt = ChatFormat.from_tokenizer(_template_tokenizer(ALWAYS_THINKING_TEMPLATE))
    assert fmt.switch is None and fmt.prompt(item.question, 3) == want_prompt  # the prompt ends before <think>
    assert fmt.mode_prefix == {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: "<think>"}
    with pytest.raises(ValueError, match="renders none of the known image placeholders"):
        ChatFormat.from_tokenizer(_template_tokenizer(R4B_STYLE_TEMPLATE.replace("<image>", "")))
    with pytest.raises(ValueError, match="expected one <image> placeholder"):
        ChatFormat.from_tokenizer(_template_tokenizer(R4B_STYLE_TEMPLATE.replace("<image>", "")), "<image>").prompt(
            "q", 2)  # fmt: skip
    with pytest.raises(TypeError, match="image_token"):
        ChatFormat.from_tokenizer(build_tokenizer(), 5)


EXPECTED = {  # per family: the template's switch, the prefixes, whether <think> is one token
    "r4b": ("thinking_mode", {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: "<think>"},
            True),
    "llava_onevision": (None, {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: "<think>"},
                        False),
    "qwen2_5_vl": (None, {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: "<think>"},
                   False),
    "qwen3_vl": ("enable_thinking", {Mode.THINK: "<think>\n", Mode.NO_THINK: "<think>\n\n</think>\n\n", Mode.AUTO: ""},
                 True),
}  # fmt: skip


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_mode_prefixes_come_from_the_template_and_thinking_is_not_a_token_prefix(family_dir, name):
    from r4b_fast.training.evaluation import ModeTokens

    model, tok, family = _load(family_dir(name))
    assert family.name == name and family_of(model) is family
    tokens = ModeTokens.from_tokenizer(tok, model)
    fmt = tokens.format
    assert fmt.uses_template
    assert fmt.image_token == tok.convert_ids_to_tokens(family.image_token_id(model.config))
    assert ChatFormat.from_tokenizer(tok).image_token == fmt.image_token  # what _data finds without the model
    switch, prefixes, single = EXPECTED[name]
    assert fmt.switch == switch and fmt.mode_prefix == prefixes
    assert ("<think>" in tok.get_vocab()) == single
    # tokenized once, from the tokenizer: the ids are what it gives for the strings
    for ids, text in ((tokens.think_open, fmt.mode_prefix[Mode.THINK]),
                      (tokens.no_think, fmt.mode_prefix[Mode.NO_THINK]),
                      (tokens.think_close, fmt.think_close)):  # fmt: skip
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # the condition for forced thinking to be forced: the thinking prefix is no token prefix of the non-thinking one
    assert tokens.no_think[: len(tokens.think_open)] != tokens.think_open
    # auto mode stops where the two part: its next token is the decision BPO's decision loss trains (a byte-level
    # "<think>" without its own token: "<", "think", then ">\n" or ">\n\n"); the text is the template's auto prefix
    # or the part of it the forced prefixes share
    from r4b_fast.training.mode_decision import DecisionTokens

    decision = DecisionTokens.from_prefixes(tokens.think_open, tokens.no_think)
    assert tokens.auto == tokens.think_open[: decision.position] == tokens.no_think[: decision.position]
    auto_text, decoded = fmt.mode_prefix[Mode.AUTO], tok.decode(tokens.auto)
    assert fmt.mode_prefix[Mode.THINK].startswith(decoded) and fmt.mode_prefix[Mode.NO_THINK].startswith(decoded)
    # the template's own auto text where it ends there (R-4B: "<think>"), shortened (byte-level "<think") or
    # extended (Qwen3-VL's empty auto prefix: "<think>", as R-4B's) to the shared part
    assert auto_text.startswith(decoded) or decoded.startswith(auto_text)
    assert (decoded == auto_text) == (name in ("r4b",)), (name, decoded, auto_text)
    assert tok.decode([tokens.think_start]).startswith("<") and "/" in tok.decode([tokens.think_end])
    # a full prompt: the template's text with one placeholder per feature row
    item = sample_items(1, 0)[0]
    ids = tokens.prompt_ids(item, 4)
    assert ids.count(tokens.image) == 4
    assert tok.decode(ids).endswith("assistant\n") and item.question in tok.decode(ids)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_strict_mode_forces_thinking_with_a_bpe_think_tag(family_dir, name):
    """Tokenizers without a ``<think>`` token: the block's end marker is the BPE token covering ``/`` of ``</think>``;
    with a model that wants to close at once (and end), ``min_think_tokens`` still makes forced thinking think."""
    from r4b_fast.ops.sampling import ModeState, sample_with_modes
    from r4b_fast.training.evaluation import ModeTokens

    model, tok, _ = _load(family_dir(name))
    t = ModeTokens.from_tokenizer(tok, model)
    k = 3
    state = ModeState.create([Mode.THINK] * 4, t.think_open, t.no_think, t.think_close, eos_id=t.eos, pad_id=t.pad,
                             think_start_id=t.think_start, think_end_id=t.think_end, min_think_tokens=k)  # fmt: skip
    logits = torch.zeros(4, len(tok))
    logits[:, [t.think_end, t.eos]] = 20.0  # closing (and ending) is what this model wants
    gen = torch.Generator().manual_seed(0)
    # the close sequence's tokens before the end marker ("\n" of "\n</think>") are thought too
    wait = k + t.think_close.index(t.think_end)
    n_open = len(t.think_open)
    out = torch.stack([sample_with_modes(logits, state, generator=gen).tokens for _ in range(n_open + wait + 1)], 1)
    assert out[:, :n_open].tolist() == [t.think_open] * 4
    ends = torch.tensor([t.think_end, t.eos])
    assert not torch.isin(out[:, n_open : n_open + wait], ends).any()  # thought first
    assert torch.isin(out[:, -1], ends).all()  # then the model's wish is allowed


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_engine_default_think_end_is_the_templates_marker(family_dir, name):
    """BPO's rollouts name no think-block markers: the engine's default must find the ``</think>`` token (or its BPE
    piece covering ``/``), not the close sequence's leading newline."""
    from r4b_fast.training.evaluation import ModeTokens
    from r4b_fast.training.rollout import _think_end_default

    model, tok, _ = _load(family_dir(name))
    t = ModeTokens.from_tokenizer(tok, model)
    assert _think_end_default(t.think_open, t.no_think, t.think_close) == t.think_end
    assert t.think_open[0] == t.think_start  # the sampler's default start marker


# ---------------------------------------------------------------------------------------------------------------
# the loops' packed forward against the model's own padded forward
# ---------------------------------------------------------------------------------------------------------------
def _rows(dataset):
    from r4b_fast.training.data import load_rows

    rows, _ = load_rows(dataset / "train.jsonl")
    return rows


def _padded_logprobs(model, family, encoder, ids, mask, images):
    """Per-token log-probs of the next token from the model's own forward on the padded batch (transformers'
    placeholder merge, RoPE indices and DeepStack)."""
    pixel_values, extra = encoder.pixel_inputs(images, "cpu", torch.float32)
    kwargs = {"image_sizes": extra} if family.rope == "1d" else {"image_grid_thw": extra}
    image_id = family.image_token_id(model.config)
    if family.rope == "mrope":
        import inspect

        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kwargs["mm_token_type_ids"] = (ids == image_id).int()
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **kwargs).logits
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_packed_loss_equals_the_models_padded_forward(family_dir, dataset, name):
    from r4b_fast.ops.fused_linear_logprobs import fused_linear_logprobs
    from r4b_fast.training.annealing import encode_sft_batch, sft_loss
    from r4b_fast.training.bpo import policy_forward
    from r4b_fast.training.evaluation import ModeTokens
    from r4b_fast.training.vision import ImageEncoder

    path = family_dir(name)
    model, tok, family = _load(path)
    encoder = ImageEncoder.for_model(model, path)
    tokens = ModeTokens.from_tokenizer(tok, model)
    rows = _rows(dataset)
    counts = [encoder.count(model, r) for r in rows]
    assert len(set(counts)) > 1 or family.rope == "1d"  # two image sizes: two grids for the Qwen families
    ids, mask, labels, images = encode_sft_batch(tok, rows, [r.mode for r in rows], counts, fmt=tokens.format)
    # SFT: the loop's loss and its per-token log-probs
    loss, n = sft_loss(model, ids, mask, labels, images, encoder=encoder)
    ref = _padded_logprobs(model, family, encoder, ids, mask, images)
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    on = nxt != -100
    want = ref[on].gather(-1, nxt[on][:, None])[:, 0]
    assert n == int(on.sum()) > 0
    torch.testing.assert_close(loss, -want.mean(), rtol=1e-5, atol=1e-5)
    hidden, packed = family.packed_hidden(model, ids, mask, encoder.encode(model, images))
    got = fused_linear_logprobs(hidden, model.lm_head.weight, packed.pack(nxt))
    torch.testing.assert_close(got[packed.pack(nxt) != -100], want, rtol=1e-5, atol=1e-5)
    # BPO: the policy's hidden states for completions of rows that share prompts (two rollouts per prompt)
    gen = torch.Generator().manual_seed(1)
    prompt_ids = [tokens.prompt_ids(r, c) for r, c in zip(rows[:2], counts[:2])]
    N = 5
    completions = torch.randint(0, len(tok), (4, N), generator=gen)
    completions[0, 1] = tokens.image  # a sampled placeholder id is text, not an image
    cmask = torch.ones(4, N, dtype=torch.bool)
    cmask[1, 3:] = False
    rollouts = SimpleNamespace(completions=completions, completion_mask=cmask, prompt_index=torch.tensor([0, 0, 1, 1]))
    h = policy_forward(model, rows[:2], prompt_ids, rollouts, tokens.image, tokens.pad, encoder)
    logp = (h @ model.lm_head.weight.T).log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    for r, p in enumerate([0, 0, 1, 1]):
        L = len(prompt_ids[p])
        seq = torch.tensor(prompt_ids[p] + completions[r][cmask[r]].tolist())[None]
        inputs = seq.clone()
        inputs[0, L:][inputs[0, L:] == tokens.image] = tokens.pad  # the reference takes every placeholder id for one
        own = model(input_ids=inputs, attention_mask=torch.ones_like(seq),
                    **_vision_kwargs(model, family, encoder, [rows[p].image()], inputs)).logits  # fmt: skip
        want = own[0, L - 1 : -1].log_softmax(-1).gather(-1, seq[0, L:, None])[:, 0]
        mine = logp[r][cmask[r]]
        if r == 0:  # ... so it is compared up to the sampled one (its embedding differs from there on)
            want, mine = want[:2], mine[:2]
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


def _vision_kwargs(model, family, encoder, images, ids):
    pixel_values, extra = encoder.pixel_inputs(images, "cpu", torch.float32)
    kwargs = {"pixel_values": pixel_values}
    if family.rope == "1d":
        kwargs["image_sizes"] = extra
    else:
        import inspect

        kwargs["image_grid_thw"] = extra
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kwargs["mm_token_type_ids"] = (ids == family.image_token_id(model.config)).int()
    return kwargs


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_rollout_logprobs_equal_the_models_own_forward(family_dir, dataset, name):
    """The engine (prompt embeddings with the image, M-RoPE positions and DeepStack for Qwen, KV-cache decoding)
    samples with the log-probs the model's own forward gives the generated tokens."""
    from r4b_fast.training.evaluation import ModeTokens, prompt_embeddings
    from r4b_fast.training.rollout import generate_rollouts
    from r4b_fast.training.vision import ImageEncoder

    path = family_dir(name)
    model, tok, family = _load(path)
    model.eval()
    encoder = ImageEncoder.for_model(model, path)
    t = ModeTokens.from_tokenizer(tok, model)
    rows = _rows(dataset)[:2]
    prompt_ids = [t.prompt_ids(r, encoder.count(model, r)) for r in rows]
    out = generate_rollouts(
        model, prompt_ids, [[Mode.THINK, Mode.NO_THINK, Mode.AUTO]] * 2, think_open_ids=t.think_open,
        no_think_ids=t.no_think, think_close_ids=t.think_close, auto_ids=t.auto, eos_id=t.eos, pad_id=t.pad,
        think_start_id=t.think_start, think_end_id=t.think_end, max_new_tokens=10,
        generator=torch.Generator().manual_seed(0),
        prompt_embeds=prompt_embeddings(model, prompt_ids, rows, t.image, encoder))  # fmt: skip
    with torch.no_grad():
        for r in range(6):
            p = r // 3
            gen_ids = out.completions[r][out.completion_mask[r]]
            sampled_image = (gen_ids == t.image).nonzero()  # text there, a placeholder to the reference: cut before
            gen_ids = gen_ids[: int(sampled_image[0]) if len(sampled_image) else len(gen_ids)]
            seq = torch.tensor(prompt_ids[p] + gen_ids.tolist())[None]
            own = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                        **_vision_kwargs(model, family, encoder, [rows[p].image()], seq)).logits  # fmt: skip
            L = len(prompt_ids[p])
            want = own[0, L - 1 : -1].float().log_softmax(-1).gather(-1, gen_ids[:, None])[:, 0]
            torch.testing.assert_close(out.logprobs[r][out.completion_mask[r]][: len(want)], want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# both loops, one step each, and the saved folders load back as the same family
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_annealing_and_bpo_run_one_step_and_save_the_same_family(family_dir, dataset, tmp_path, name):
    from r4b_fast.training import annealing, bpo

    path = family_dir(name)
    common = ["--device", "cpu", "--max-prompt-tokens", "256", "--seed", "0"]
    assert annealing.main(["--model", str(path), "--dataset", str(dataset / "train.jsonl"), "--steps", "1",
                           "--batch-size", "2", "--eval-items", "0", "--output-dir", str(tmp_path / "anneal"),
                           "--save-every", "0", *common]) == 0  # fmt: skip
    annealed = tmp_path / "anneal" / "model"
    assert bpo.main(["--model", str(annealed), "--dataset", str(dataset / "train.jsonl"), "--eval-dataset",
                     str(dataset / "eval.jsonl"), "--eval-items", "2", "--steps", "1", "--prompts", "2", "--g", "1",
                     "--max-new-tokens", "8", "--min-think-tokens", "2", "--output-dir", str(tmp_path / "bpo"),
                     *common]) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "bpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("eval/acc_auto_") for r in records for k in r) and any("loss" in r for r in records)
    original, tok0, family = _load(path)
    for folder in (annealed, tmp_path / "bpo" / "model"):
        model, tok, again = _load(folder)
        assert again is family and type(model) is type(original)
        assert (folder / "preprocessor_config.json").exists() and tok.chat_template == tok0.chat_template
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, original.get_parameter(n))]
        assert changed  # trained weights were saved


# ---------------------------------------------------------------------------------------------------------------
# processors without torchvision (r4b_fast.models.processor_for)
# ---------------------------------------------------------------------------------------------------------------
def _pil_and_tensor(width, height, seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy()), pixels.permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_processor_for_matches_the_families_documented_expansion(family_dir, name):
    """``processor_for`` (the family's processor class, a PIL image processor, no video processor) against what the
    project's loops compute (``ImageEncoder``: the image processor's pixels and grid, the placeholder count from the
    grid or the model's own feature rows): torchvision is not importable here, so the family's ``AutoProcessor``
    cannot be the oracle; the documented expansion is (Qwen: ``t*h*w / merge**2`` ``<|image_pad|>`` per image,
    LLaVA-OneVision / R-4B: one ``<image>`` per feature row of AnyRes + newlines)."""
    import sys

    from transformers import ProcessorMixin

    from r4b_fast.models import processor_for
    from r4b_fast.training.vision import ImageEncoder

    path = family_dir(name)
    model, tok, family = _load(path)
    processor = processor_for(path)
    assert isinstance(processor, ProcessorMixin) and "torchvision" not in sys.modules
    assert processor.tokenizer.padding_side == "left"
    encoder = ImageEncoder.for_model(model, path)
    image_id = family.image_token_id(model.config)
    placeholder = tok.convert_ids_to_tokens(image_id)
    pils, tensors = zip(*[_pil_and_tensor(w, h, i) for i, (w, h) in enumerate([(16, 16), (24, 16)])])
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is {i}?"}]}]
                for i in range(2)]  # fmt: skip
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    out = processor(images=[[p] for p in pils], text=texts, padding=True, return_tensors="pt")
    pixel_values, extra = encoder.pixel_inputs(list(tensors), "cpu", torch.float32)
    torch.testing.assert_close(out["pixel_values"].float(), pixel_values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["image_grid_thw" if family.rope == "mrope" else "image_sizes"], extra)
    for r, (text, img) in enumerate(zip(texts, tensors)):
        count = encoder.count(model, SimpleNamespace(image=lambda img=img: img, size=tuple(img.shape[-2:])))
        assert text.count(placeholder) == 1
        want = tok(text.replace(placeholder, placeholder * count), add_special_tokens=False)["input_ids"]
        got = out["input_ids"][r][out["attention_mask"][r].bool()].tolist()
        assert got == want
        if family.rope == "mrope":
            types = out["mm_token_type_ids"][r][out["attention_mask"][r].bool()]
            assert types.tolist() == [int(t == image_id) for t in want]
    lens = out["attention_mask"].sum(1)
    assert lens[0] != lens[1] and out["attention_mask"][int(lens.argmin()), 0] == 0  # left-padded, as TRL pads


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_processor_for_from_a_config_builds_the_pil_image_processor(family_dir, name):
    """Without a folder, the PIL image processor comes from the config's sizes (patch / merge / crop, AnyRes grid)."""
    from r4b_fast.models import processor_for

    path = family_dir(name)
    model, tok, family = _load(path)
    processor = processor_for(model.config, tokenizer=tok)
    ip = processor.image_processor
    assert type(ip).__name__.endswith("Pil")
    if family.rope == "mrope":
        assert (ip.patch_size, ip.merge_size) == (model.config.vision_config.patch_size,
                                                  model.config.vision_config.spatial_merge_size)  # fmt: skip
    else:
        assert ip.size["height"] == model.config.vision_config.image_size
    with pytest.raises(ValueError, match="tokenizer"):
        processor_for(model.config)
