"""A tiny random R-4B checkpoint for tests and demos: a byte-level BPE tokenizer with R-4B's added tokens and chat
template (:func:`build_r4b_tokenizer`) and :func:`write_tiny_r4b_checkpoint` (a folder laid out as a user's download
of ``YannQi/R-4B``: published key names, config.json, tokenizer files, image processor)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r4b_fast.models.r4b_modeling import (
    PUBLISHED_PREFIXES,
    R4B_ARCHITECTURE,
    R4B_MODEL_TYPE,
    RConfig,
    RForConditionalGeneration,
    published_state_dict,
)
from r4b_fast.models.r4b_template import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    R4B_CHAT_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
)

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

