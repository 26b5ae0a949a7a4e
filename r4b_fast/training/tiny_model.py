"""A tiny R-4B-architecture model built from transformers config classes (nothing downloaded).

LLaVA-OneVision layout as R-4B: a SigLIP-style vision tower (AnyRes), a 2-layer MLP projector and a Qwen3-style
language model. Sized for CPU training in minutes: 16x16 images in 8x8 patches; the model's own AnyRes feature path
gives ``num_image_tokens`` ``<image>`` placeholders per image.
"""

from __future__ import annotations

import torch

from r4b_fast.training.task import CELL, IMAGE_SIZE, IMAGE_TOKEN


def build_tiny_r4b(tokenizer, *, hidden_size: int = 128, layers: int = 4, seed: int = 0):
    """Return a randomly initialised ``LlavaOnevisionForConditionalGeneration`` sized for the embedded task."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen3Config,
        SiglipVisionConfig,
    )

    text = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=CELL, num_channels=3,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]], vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config)


def pixel_inputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 3, H, W]`` images -> LLaVA-OneVision AnyRes inputs: ``pixel_values [B, 2, 3, H, W]`` (base view and the
    single grid crop, equal at this size) and ``image_sizes [B, 2]``."""
    b, _, h, w = images.shape
    return images.unsqueeze(1).expand(b, 2, 3, h, w).contiguous(), torch.tensor([[h, w]] * b, device=images.device)


def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector + AnyRes layout through the model's own path: ``[B * num_image_tokens, D]``."""
    pixel_values, image_sizes = pixel_inputs(images.to(model.dtype))
    out = model.model.get_image_features(
        pixel_values, image_sizes=image_sizes, vision_feature_layer=-1, vision_feature_select_strategy="full"
    )
    return torch.cat(list(out.pooler_output), 0)


def num_image_tokens(model) -> int:
    """Placeholders per image, measured on the model's own feature path."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return image_embeddings(model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)).shape[0]


# parameter-name markers of the projector (LLaVA-OneVision / R-4B, then the Qwen-VL mergers) and the vision tower
PROJECTOR_MARKERS = ("multi_modal_projector", "visual.merger", "visual.deepstack_merger")
VISION_MARKERS = ("vision_tower", "visual.")


def parameter_groups(model, lr_vision: float, lr_projector: float, lr_llm: float, weight_decay: float = 0.0):
    """AdamW groups with R-4B's three learning rates: vision tower, projector, language model (+ head). The Qwen-VL
    families' patch mergers (and Qwen3-VL's DeepStack mergers) count as the projector, the rest of ``visual`` as
    the vision tower. Example: ``torch.optim.AdamW(parameter_groups(model, 1e-5, 1e-4, 1e-5))``."""
    groups = {"vision": [], "projector": [], "llm": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(m in name for m in PROJECTOR_MARKERS):
            key = "projector"
        elif any(m in name for m in VISION_MARKERS):
            key = "vision"
        else:
            key = "llm"
        groups[key].append(p)
    lrs = {"vision": lr_vision, "projector": lr_projector, "llm": lr_llm}
    return [{"params": ps, "lr": lrs[k], "weight_decay": weight_decay, "name": k} for k, ps in groups.items() if ps]
