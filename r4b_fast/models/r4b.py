"""R-4B's own checkpoint (``YannQi/R-4B``) with plain transformers: no ``trust_remote_code``.

The published checkpoint is LLaVA-OneVision's layout (SigLIP2-so400m vision tower at 384 px, patch 14, 729 tokens
per crop, LLaVA-NeXT AnyRes, Qwen3-4B language model) except its projector, which normalises the vision features
first: ``pre_norm`` (LayerNorm over the vision hidden size, eps 1e-6) -> ``linear_1`` -> GELU -> ``linear_2`` (as
vLLM's ``RForConditionalGeneration`` does). Its ``config.json`` names ``architectures: ["RForConditionalGeneration"]``.

Public names:

- :class:`RConfig` (``model_type = "rvl"``, LLaVA-OneVision's fields) and :class:`RForConditionalGeneration`
  (a ``LlavaOnevisionForConditionalGeneration`` whose projector is :class:`RMultiModalProjector`).
- :func:`register` (idempotent; also run on import): ``AutoConfig`` / ``AutoModel`` /
  ``AutoModelForImageTextToText`` resolve ``"rvl"`` to these classes.
- :func:`is_r4b_checkpoint`: whether a folder / config / dict is an R-4B checkpoint (by ``architectures``, then by
  ``model_type``); :func:`load_r4b`: the model from such a folder, whatever ``model_type`` its config.json carries.
- The chat template's thinking switch: ``apply_chat_template(..., thinking_mode="auto" | "long" | "short")``;
  :data:`R4B_CHAT_TEMPLATE`, :data:`THINKING_MODE_PREFIX`, :data:`THINKING_MODE_OF`, :func:`template_mode_prefixes`.
- :func:`write_tiny_r4b_checkpoint`: a tiny random R-4B folder as a user's download would look (for tests).

Key names on disk are the published ones: ``model.language_model.*``, ``model.vision_tower.vision_model.*``,
``model.multi_modal_projector.{pre_norm,linear_1,linear_2}.*``, ``model.image_newline``, ``lm_head.weight``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.activations import ACT2FN

from r4b_fast.modes import Mode

R4B_ARCHITECTURE = "RForConditionalGeneration"
R4B_MODEL_TYPE = "rvl"
PRE_NORM_EPS = 1e-6

IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE = "<image>", "<think>", "</think>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"

# What R-4B's template puts after the assistant header for each ``thinking_mode`` (R-4B's documented strings).
THINKING_MODE_PREFIX = {
    "long": f"{THINK_OPEN}\n",  # thinking: the model writes its steps, then "\n</think>\n\n" and the answer
    "short": f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n",  # non-thinking: an empty think block, then the answer
    "auto": THINK_OPEN,  # the model decides: "\n" (think) or "\n\n</think>\n\n" (answer at once)
}
THINKING_MODES = tuple(THINKING_MODE_PREFIX)
THINKING_MODE_OF = {Mode.THINK: "long", Mode.NO_THINK: "short", Mode.AUTO: "auto"}
THINK_CLOSE_SEQUENCE = f"\n{THINK_CLOSE}\n\n"

# Written from R-4B's documented behaviour (the published file was not reachable here): Qwen3's ChatML turns,
# images as "<image>" placeholders (one per image item, expanded to the crop's tokens by the caller), and the
# generation prompt ends with the prefix of ``thinking_mode`` (default "auto"); an unknown mode is an error.
R4B_CHAT_TEMPLATE = (
    "{%- set mode = thinking_mode if thinking_mode is defined else 'auto' -%}"
    "{%- if mode not in ['auto', 'long', 'short'] -%}"
    "{{- raise_exception('thinking_mode must be auto, long or short, got ' ~ mode) -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if mode == 'long' -%}{{- '<think>\\n' -}}"
    "{%- elif mode == 'short' -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Module prefixes of the published state dict (everything else is foreign).
PUBLISHED_PREFIXES = (
    "model.language_model.",
    "model.vision_tower.vision_model.",
    "model.multi_modal_projector.",
    "model.image_newline",
    "lm_head.",
)


class RConfig(LlavaOnevisionConfig):
    """LLaVA-OneVision's config under R-4B's ``model_type``; the projector's shape follows from it.

    Example:
        >>> cfg = RConfig(text_config={"model_type": "qwen3", "hidden_size": 32}, vision_config={"hidden_size": 16})
        >>> cfg.model_type, cfg.architectures
        ('rvl', ['RForConditionalGeneration'])
    """

    model_type = R4B_MODEL_TYPE

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.architectures:
            self.architectures = [R4B_ARCHITECTURE]


class RMultiModalProjector(nn.Module):
    """R-4B's projector: ``LayerNorm(eps=1e-6) -> linear_1 -> act -> linear_2``.

    ``[..., F]`` vision features (``F`` the vision hidden size, times the number of selected layers when
    ``vision_feature_layer`` is a list) -> ``[..., D]`` (the text hidden size), in the weights' dtype.
    """

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        layers = config.vision_feature_layer
        in_features = config.vision_config.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
        out_features = config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(in_features, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(in_features, out_features, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


class RForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """R-4B: LLaVA-OneVision with :class:`RMultiModalProjector`; loads the published checkpoint without remote code
    and saves the published key names.

    Example:
        >>> model = RForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)   # doctest: +SKIP
        >>> model.save_pretrained(out)   # model.multi_modal_projector.pre_norm.weight, ... as published
    """

    config_class = RConfig

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__(config)
        projector = RMultiModalProjector(config)
        # from_pretrained builds on the meta device: the new module must live where the replaced one did
        ref = self.model.multi_modal_projector.linear_1.weight
        self.model.multi_modal_projector = projector.to(device=ref.device, dtype=ref.dtype)
        for module in projector.modules():
            self._init_weights(module)

    def save_pretrained(self, save_directory, *args, state_dict=None, save_original_format: bool = True, **kwargs):
        """``save_pretrained`` writing the published key names (see the module docstring) whatever transformers
        version runs; ``save_original_format=False`` writes this version's in-memory names instead."""
        if save_original_format:
            state_dict = published_state_dict(self, self.state_dict() if state_dict is None else state_dict)
        # the published names replace transformers' reverse mapping (which would write the pre-4.52 layout)
        return super().save_pretrained(
            save_directory, *args, state_dict=state_dict, save_original_format=False, **kwargs
        )


def published_state_dict(model: RForConditionalGeneration, state_dict: dict) -> dict:
    """In-memory state-dict names -> the published ones. transformers 5.x keeps the SigLIP tower's modules at the
    top of ``vision_tower`` (it strips ``vision_model.`` when loading), the checkpoint has them under
    ``vision_tower.vision_model.``; a version whose tower still has ``vision_model`` needs no renaming."""
    if hasattr(model.model.vision_tower, "vision_model"):
        return dict(state_dict)
    prefix = "model.vision_tower."
    return {
        (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()
    }


_REGISTERED = False


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModel`` / ``AutoModelForImageTextToText`` resolve ``model_type="rvl"`` to
    :class:`RConfig` / :class:`RForConditionalGeneration` (``AutoModel`` too: R-4B's own code maps it to the
    generation class), and load the pre-4.52 key layout (``language_model.model.*``) as LLaVA-OneVision does.
    Idempotent; importing this module calls it.

    Example:
        >>> register(); register()
        >>> AutoModelForImageTextToText.from_pretrained(folder)   # doctest: +SKIP  (an RForConditionalGeneration)
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    AutoConfig.register(R4B_MODEL_TYPE, RConfig, exist_ok=True)
    AutoModel.register(RConfig, RForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(RConfig, RForConditionalGeneration, exist_ok=True)
    # our root class is "custom code" to transformers: it gets LLaVA-OneVision's renamings only when registered
    legacy = get_checkpoint_conversion_mapping("llava_onevision")
    if legacy is not None:
        register_checkpoint_conversion_mapping(R4B_MODEL_TYPE, legacy, overwrite=True)
    _REGISTERED = True


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"config: {config} has no config.json")
        with open(path) as f:
            return json.load(f)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config: expected a folder, a config.json path, a dict or a PretrainedConfig, got {type(config)}")


def is_r4b_checkpoint(config) -> bool:
    """Whether ``config`` (a folder, its config.json, a dict or a config object) is an R-4B checkpoint: its
    ``architectures`` name ``RForConditionalGeneration``, or, without ``architectures``, its ``model_type`` is
    ``"rvl"``. A folder without config.json raises ``FileNotFoundError``.

    Example:
        >>> is_r4b_checkpoint({"architectures": ["RForConditionalGeneration"], "model_type": "rvl"})
        True
        >>> is_r4b_checkpoint({"architectures": ["LlavaOnevisionForConditionalGeneration"]})
        False
    """
    d = _config_dict(config)
    architectures = d.get("architectures") or []
    if architectures:
        return R4B_ARCHITECTURE in architectures
    return d.get("model_type") == R4B_MODEL_TYPE


def load_r4b(path, *, dtype: torch.dtype = torch.float32, device=None) -> RForConditionalGeneration:
    """The R-4B model in ``path`` through :class:`RForConditionalGeneration` directly (not the Auto classes), so a
    config.json whose ``model_type`` is not ``"rvl"`` or that carries an ``auto_map`` loads all the same.

    Args:
        path: a folder with config.json and safetensors weights.
        dtype: the parameters' dtype (fp32 master weights for training whatever the checkpoint's dtype).
        device: where to move the model (default: stay on CPU).

    Example:
        >>> model = load_r4b("R-4B", dtype=torch.float32, device="cuda")   # doctest: +SKIP
    """
    if not is_r4b_checkpoint(path):
        raise ValueError(f"path: {path} is not an R-4B checkpoint (architectures / model_type)")
    config = RConfig.from_dict({k: v for k, v in _config_dict(path).items() if k not in ("auto_map", "model_type")})
    model = RForConditionalGeneration.from_pretrained(str(path), config=config, dtype=dtype)
    return model.to(device) if device is not None else model


def template_mode_prefixes(tokenizer) -> dict[str, str]:
    """What the tokenizer's chat template writes after the assistant header for each ``thinking_mode``:
    ``{"auto": ..., "long": ..., "short": ...}``, rendered from the template itself (not hard-coded).

    Example:
        >>> template_mode_prefixes(tok)["short"]   # doctest: +SKIP
        '<think>\\n\\n</think>\\n\\n'
    """
    probe = [{"role": "user", "content": "x"}]
    base = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    out = {}
    for mode in THINKING_MODES:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, thinking_mode=mode)
        head = base + ASSISTANT_HEADER
        if not text.startswith(head):
            raise ValueError(f"tokenizer: its chat template does not open the assistant turn with {head!r}")
        out[mode] = text[len(head) :]
    return out


# Qwen2/Qwen3's pre-tokenizer split: letters, single digits, punctuation runs, newline runs ("\n\n" one piece).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    f"{IM_START}user\n{IMAGE_TOKEN}\nWhat is the sum of the row products?{IM_END}\n{IM_START}assistant\n"
    f"{THINK_OPEN}\n3*5=15, 7*2=14, 15+14=29\n{THINK_CLOSE}\n\n29{IM_END}\n",
    f"{IM_START}user\nWhat is the first digit?{IM_END}\n{IM_START}assistant\n{THINK_OPEN}\n\n{THINK_CLOSE}\n\n7",
    "The image shows four coloured cells.\n\nEach cell encodes a digit; the answer is a number.\n\n",
    "first cell: 3\n\nsecond cell, third cell, fourth cell. Describe this image.\n\n",
]


def build_r4b_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here on a small in-code corpus with Qwen's pre-tokenizer split, plus
    R-4B's added tokens (``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<think>``,
    ``</think>``, ``<image>``) and :data:`R4B_CHAT_TEMPLATE`. As Qwen's BPE, it merges ``"\\n\\n"`` into one token.

    Example:
        >>> tok = build_r4b_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("<think>\\n\\n</think>\\n\\n")["input_ids"])
        ['<think>', 'ĊĊ', '</think>', 'ĊĊ']
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    # the markup is trained as text too (as in Qwen's data); the added tokens below take precedence anyway
    core.train_from_iterator(_CORPUS * 4, trainer)
    specials = [ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN]
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Qwen3 adds the think tags as non-special tokens: decoding with skip_special_tokens keeps them
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT, additional_special_tokens=[IM_START, IMAGE_TOKEN]
    )
    tok.chat_template = R4B_CHAT_TEMPLATE
    return tok


def _tiny_config(tokenizer, *, hidden_size: int, layers: int, vision_hidden_size: int, image_size: int,
                 patch_size: int) -> RConfig:  # fmt: skip
    from transformers import Qwen3Config, SiglipVisionConfig

    text = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=1,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size, num_channels=3, vision_use_head=False,
    )  # fmt: skip
    s = image_size
    return RConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False, projector_hidden_act="gelu",
    )  # fmt: skip


def write_tiny_r4b_checkpoint(folder, *, seed: int = 0, hidden_size: int = 32, layers: int = 1,
                              vision_hidden_size: int = 16, image_size: int = 16, patch_size: int = 8,
                              model_type: str = R4B_MODEL_TYPE) -> Path:  # fmt: skip
    """Write a tiny random R-4B folder as a user's download of ``YannQi/R-4B`` would look: ``config.json``
    (``architectures: ["RForConditionalGeneration"]``, ``model_type``), ``model.safetensors`` written here with
    the published key names (projector ``pre_norm`` included, with a non-trivial affine), the tokenizer files with
    the chat template (:func:`build_r4b_tokenizer`) and ``preprocessor_config.json`` for LLaVA-OneVision's image
    processor (AnyRes over ``image_size`` crops). ``(image_size // patch_size) ** 2`` tokens per crop.

    Args:
        folder: created if missing; existing files of the same names are replaced.
        seed: all weights are a function of it.
        model_type: what config.json says (R-4B's is taken to be ``"rvl"``; loaders must not depend on it).

    Returns:
        ``Path(folder)``.

    Example:
        >>> path = write_tiny_r4b_checkpoint(tmp_path / "r4b", seed=0)    # doctest: +SKIP
        >>> RForConditionalGeneration.from_pretrained(path, dtype=torch.float32)   # doctest: +SKIP
    """
    from safetensors.torch import save_file
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    for name, value in (("hidden_size", hidden_size), ("layers", layers), ("vision_hidden_size", vision_hidden_size),
                        ("image_size", image_size), ("patch_size", patch_size)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if hidden_size % 2 or vision_hidden_size % 2:
        raise ValueError(f"hidden_size / vision_hidden_size: must be even (2 heads), got {hidden_size}, "
                         f"{vision_hidden_size}")  # fmt: skip
    if image_size % patch_size:
        raise ValueError(f"image_size: must be a multiple of patch_size ({patch_size}), got {image_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_r4b_tokenizer()
    config = _tiny_config(tok, hidden_size=hidden_size, layers=layers, vision_hidden_size=vision_hidden_size,
                          image_size=image_size, patch_size=patch_size)  # fmt: skip
    torch.manual_seed(seed)
    model = RForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # every tensor random, LayerNorm affines around 1 / 0 (a skipped or moved pre_norm changes the output)
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.1 * noise)
    state = {k: v.contiguous() for k, v in published_state_dict(model, model.state_dict()).items()}
    foreign = [k for k in state if not k.startswith(PUBLISHED_PREFIXES)]
    if foreign:  # the file must be the published layout, not whatever this transformers version keeps in memory
        raise RuntimeError(f"unexpected keys for the published layout: {foreign[:5]}")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = [R4B_ARCHITECTURE]
    cfg["model_type"] = model_type
    cfg["dtype"] = "float32"
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    tok.save_pretrained(folder)
    s = image_size
    LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)  # fmt: skip
    return folder


register()
