"""Model families the loops load: one small adapter each (how to embed images, which RoPE, the mode prefixes).

``detect_family(config)`` / ``family_of(model)`` -> :class:`Family` (LLaVA-OneVision, R-4B, Qwen2.5-VL, Qwen3-VL);
``load_pretrained(path, device)`` -> ``(model, tokenizer, family)``; :class:`ChatFormat` builds prompts and the
three mode prefixes from a tokenizer's chat template (the project's format when it has none), :class:`ModeIds`
tokenizes them once; ``processor_for(model_dir_or_config, tokenizer=...)`` builds each family's processor without
torchvision (PIL image processors, no video). transformers is imported on use only.
"""

from r4b_fast.models.chat import ChatFormat, ModeIds
from r4b_fast.models.families import (
    FAMILIES,
    LLAVA_ONEVISION,
    QWEN2_5_VL,
    QWEN3_VL,
    R4B,
    EncodedImages,
    Family,
    LanguageModelWithHead,
    detect_family,
    family_of,
    load_pretrained,
    supported,
)
from r4b_fast.models.processors import pil_image_processor, processor_for

__all__ = ["FAMILIES", "LLAVA_ONEVISION", "QWEN2_5_VL", "QWEN3_VL", "R4B", "ChatFormat", "EncodedImages", "Family",
           "LanguageModelWithHead", "ModeIds", "detect_family", "family_of", "load_pretrained", "pil_image_processor",
           "processor_for", "supported"]
