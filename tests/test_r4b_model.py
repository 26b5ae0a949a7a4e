"""R-4B's own checkpoint without remote code (r4b_fast.models.r4b): a tiny random folder written with the published
key names (the projector's pre_norm included) loads with plain transformers; projector and logits equal references
written from the description (LayerNorm eps 1e-6 -> linear_1 -> GELU -> linear_2); saving writes the published
names back; the chat template's thinking_mode renders the three mode prefixes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from r4b_fast.models import r4b
from r4b_fast.models.r4b import RConfig, RForConditionalGeneration

# the published layout, written out here rather than taken from the module under test
PUBLISHED = ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.",
             "model.image_newline", "lm_head.")  # fmt: skip
PROJECTOR_KEYS = {f"model.multi_modal_projector.{m}.{p}" for m in ("pre_norm", "linear_1", "linear_2")
                  for p in ("weight", "bias")}  # fmt: skip
QUESTION = "What is the first digit?"


def read_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def memory_name(key: str, model) -> str:
    """Published key -> this transformers version's in-memory name (5.x drops the tower's ``vision_model.``)."""
    if not hasattr(model.model.vision_tower, "vision_model"):
        return key.replace("model.vision_tower.vision_model.", "model.vision_tower.")
    return key


def reference_projector(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The description, in plain torch from the file's tensors: LayerNorm(eps=1e-6) -> linear_1 -> GELU -> linear_2."""
    p = "model.multi_modal_projector."
    h = F.layer_norm(x, (x.shape[-1],), w[p + "pre_norm.weight"], w[p + "pre_norm.bias"], eps=1e-6)
    h = F.gelu(h @ w[p + "linear_1.weight"].T + w[p + "linear_1.bias"])  # exact (erf) GELU
    return h @ w[p + "linear_2.weight"].T + w[p + "linear_2.bias"]


@pytest.fixture(scope="module")
def r4b_dir(tmp_path_factory):
    return r4b.write_tiny_r4b_checkpoint(tmp_path_factory.mktemp("r4b"), seed=0)


@pytest.fixture(scope="module")
def weights(r4b_dir):
    return read_safetensors(r4b_dir / "model.safetensors")


@pytest.fixture(scope="module")
def model(r4b_dir):
    m, info = RForConditionalGeneration.from_pretrained(str(r4b_dir), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer(r4b_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(r4b_dir))


def test_checkpoint_has_the_published_key_names(r4b_dir, weights):
    keys = set(weights)
    assert PROJECTOR_KEYS <= keys
    assert {"model.image_newline", "lm_head.weight", "model.language_model.embed_tokens.weight",
            "model.language_model.norm.weight",
            "model.vision_tower.vision_model.embeddings.patch_embedding.weight"} <= keys  # fmt: skip
    assert all(k.startswith(PUBLISHED) for k in keys), sorted(k for k in keys if not k.startswith(PUBLISHED))
    cfg = json.loads((r4b_dir / "config.json").read_text())
    assert cfg["architectures"] == ["RForConditionalGeneration"] and cfg["model_type"] == "rvl"
    # the LayerNorm is not the identity affine: skipping it or its affine changes the output
    assert (weights["model.multi_modal_projector.pre_norm.weight"] - 1).abs().max() > 0.1
    assert weights["model.multi_modal_projector.pre_norm.bias"].abs().max() > 0.01


def test_loaded_weights_are_the_files(model, weights):
    sd = model.state_dict()
    assert len(sd) == len(weights)
    for k, v in weights.items():
        assert torch.equal(sd[memory_name(k, model)], v), k
    assert model.model.multi_modal_projector.pre_norm.eps == 1e-6


def test_projector_equals_reference(model, weights):
    gen = torch.Generator().manual_seed(1)
    hidden = weights["model.multi_modal_projector.pre_norm.weight"].shape[0]
    x = torch.randn(3, 7, hidden, generator=gen) * 3 + 1
    # rows with a variance near eps: an eps of 1e-5 instead of 1e-6 shows there
    x[0] = 1 + 1e-3 * torch.randn(7, hidden, generator=gen)
    with torch.no_grad():
        out = model.model.multi_modal_projector(x)
    ref = reference_projector(x, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the reference is sensitive to what it checks: without the LayerNorm, or with eps 1e-5, it differs
    p = "model.multi_modal_projector."
    no_norm = F.gelu(x @ weights[p + "linear_1.weight"].T + weights[p + "linear_1.bias"])
    no_norm = no_norm @ weights[p + "linear_2.weight"].T + weights[p + "linear_2.bias"]
    assert (no_norm - ref).abs().max() > 1e-2
    eps5 = F.layer_norm(x[0], (hidden,), weights[p + "pre_norm.weight"], weights[p + "pre_norm.bias"], eps=1e-5)
    eps5 = F.gelu(eps5 @ weights[p + "linear_1.weight"].T + weights[p + "linear_1.bias"])
    eps5 = eps5 @ weights[p + "linear_2.weight"].T + weights[p + "linear_2.bias"]
    assert (eps5 - ref[0]).abs().max() > 1e-2


def reference_model(r4b_dir, weights):
    """A plain LlavaOnevisionForConditionalGeneration with the file's weights (its own projector has no LayerNorm)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = json.loads((r4b_dir / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version", "dtype")}
    ref = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**cfg)).eval()
    state = {memory_name(k, ref): v for k, v in weights.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and sorted(unexpected) == sorted(k for k in PROJECTOR_KEYS if "pre_norm" in k)
    return ref


def image_inputs(r4b_dir, tokenizer, ref, mode="long"):
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((20, 30, 3)) * 255).astype("uint8"))  # not square: 1 base + grid crops
    proc = LlavaOnevisionImageProcessorPil.from_pretrained(str(r4b_dir))
    pix = proc(images=image, return_tensors="pt")
    with torch.no_grad():
        feats = ref.model.get_image_features(pix["pixel_values"], image_sizes=pix["image_sizes"])
    n = sum(f.shape[0] for f in (feats.pooler_output if hasattr(feats, "pooler_output") else feats))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, thinking_mode=mode)
    text = text.replace("<image>", "<image>" * n) + "3*5=15"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids, pix["pixel_values"], pix["image_sizes"], n


def test_logits_equal_reference_forward(r4b_dir, weights, model, tokenizer):
    ref = reference_model(r4b_dir, weights)
    ids, pixel_values, image_sizes, n = image_inputs(r4b_dir, tokenizer, ref)
    assert n > 4 and (ids == model.config.image_token_index).sum() == n
    with torch.no_grad():
        plain = ref(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        ref.model.multi_modal_projector.forward = lambda x: reference_projector(x, weights)
        expected = ref(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        got = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a model without pre_norm (LLaVA-OneVision's own projector on the same weights) gives other logits
    first_image = int((ids[0] == model.config.image_token_index).nonzero()[0])
    assert (plain[0, first_image:] - expected[0, first_image:]).abs().max() > 1e-3
    torch.testing.assert_close(plain[0, :first_image], expected[0, :first_image])  # text before the image: equal


def test_save_load_round_trip_keeps_class_names_and_weights(tmp_path, model, weights):
    model.save_pretrained(tmp_path)
    saved = read_safetensors(tmp_path / "model.safetensors")
    assert set(saved) == set(weights)  # the published names, not this version's in-memory or legacy names
    for k, v in weights.items():
        assert torch.equal(saved[k], v), k
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["RForConditionalGeneration"] and cfg["model_type"] == "rvl"
    back = RForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(back) is RForConditionalGeneration and isinstance(back.config, RConfig)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_classes_without_trust_remote_code(r4b_dir, model):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    r4b.register()
    r4b.register()  # idempotent
    assert isinstance(AutoConfig.from_pretrained(str(r4b_dir)), RConfig)
    for auto in (AutoModelForImageTextToText, AutoModel):
        m = auto.from_pretrained(str(r4b_dir), dtype=torch.float32)
        assert type(m) is RForConditionalGeneration, auto
        sd = m.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_detection(r4b_dir, tmp_path):
    assert r4b.is_r4b_checkpoint(r4b_dir)
    assert r4b.is_r4b_checkpoint(r4b_dir / "config.json")
    assert r4b.is_r4b_checkpoint(RConfig.from_pretrained(str(r4b_dir)))
    assert r4b.is_r4b_checkpoint({"architectures": ["RForConditionalGeneration"], "model_type": "llava_onevision"})
    assert r4b.is_r4b_checkpoint({"model_type": "rvl"})
    assert not r4b.is_r4b_checkpoint({"architectures": ["LlavaOnevisionForConditionalGeneration"],
                                      "model_type": "llava_onevision"})  # fmt: skip
    assert not r4b.is_r4b_checkpoint({"architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    with pytest.raises(FileNotFoundError, match="config"):
        r4b.is_r4b_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="config"):
        r4b.is_r4b_checkpoint(3)


def test_load_r4b_whatever_model_type_and_auto_map(tmp_path, model):
    # a config.json as R-4B's own code would carry it: another model_type and an auto_map to remote files
    path = r4b.write_tiny_r4b_checkpoint(tmp_path / "ckpt", seed=0, model_type="llava_onevision")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_r.RConfig", "AutoModel": "modeling_r.RForConditionalGeneration"}
    (path / "config.json").write_text(json.dumps(cfg))
    m = r4b.load_r4b(path)
    assert type(m) is RForConditionalGeneration and m.config.model_type == "rvl"
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())  # pre_norm loaded, not re-initialised
    (tmp_path / "plain").mkdir()
    plain = {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision"}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="not an R-4B checkpoint"):
        r4b.load_r4b(tmp_path / "plain")


def test_legacy_key_layout_loads(tmp_path, r4b_dir, weights, model):
    """The pre-4.52 layout (``language_model.model.*``, ``language_model.lm_head``, top-level ``vision_tower`` /
    ``multi_modal_projector`` / ``image_newline``) loads to the same weights, as LLaVA-OneVision's does."""
    legacy = {}
    for k, v in weights.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        else:
            k = k[len("model.") :]
        legacy[k] = v
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((r4b_dir / name).read_bytes())
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    m, info = RForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_chat_template_thinking_modes(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    base = f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    expected = {"long": base + "<think>\n", "short": base + "<think>\n\n</think>\n\n", "auto": base + "<think>"}
    for mode, text in expected.items():
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             thinking_mode=mode) == text  # fmt: skip
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected["auto"]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == base[: -len("<|im_start|>assistant\n")]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True, thinking_mode="short") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n"
    )
    with pytest.raises(Exception, match="thinking_mode"):
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, thinking_mode="medium")
    assert r4b.template_mode_prefixes(tokenizer) == {"long": "<think>\n", "short": "<think>\n\n</think>\n\n",
                                                     "auto": "<think>"}  # fmt: skip
    assert r4b.THINKING_MODE_OF == {r4b.Mode.THINK: "long", r4b.Mode.NO_THINK: "short", r4b.Mode.AUTO: "auto"}


def test_tokenizer_special_tokens_and_mode_prefix_tokens(tokenizer, model):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<image>"):
        assert len(ids(t)) == 1, t
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert len(ids("\n\n")) == 1 and len(ids("\n")) == 1  # "\n\n" merged, as Qwen's BPE does
    think, no_think = ids("<think>\n"), ids("<think>\n\n</think>\n\n")
    assert len(think) == 2 and len(no_think) == 4
    assert no_think[: len(think)] != think  # forced thinking is not the start of the non-thinking block
    text = "first cell: 3\n\n<think>\n3*5=15, 7*2=14\n</think>\n\n29 Ünïcode"
    assert tokenizer.decode(ids(text)) == text


def test_writer_is_seeded_and_validates(tmp_path, weights):
    a = read_safetensors(r4b.write_tiny_r4b_checkpoint(tmp_path / "a", seed=0) / "model.safetensors")
    b = read_safetensors(r4b.write_tiny_r4b_checkpoint(tmp_path / "b", seed=1) / "model.safetensors")
    assert all(torch.equal(a[k], weights[k]) for k in weights)
    assert not torch.equal(a["model.multi_modal_projector.pre_norm.weight"],
                           b["model.multi_modal_projector.pre_norm.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="hidden_size"):
        r4b.write_tiny_r4b_checkpoint(tmp_path / "c", hidden_size=0)
    with pytest.raises(ValueError, match="image_size"):
        r4b.write_tiny_r4b_checkpoint(tmp_path / "d", image_size=20, patch_size=8)
