"""Each family's processor without torchvision: its tokenizer, chat template and a PIL-only image processor.

transformers 5.25's ``AutoProcessor`` for these families also builds a video processor, which imports torchvision
(the registry's torchvision is a CUDA build that breaks on a CPU machine). The families' image processors have slow
PIL twins that import without it (``Qwen2VLImageProcessorPil`` for Qwen2.5-VL / Qwen3-VL,
``LlavaOnevisionImageProcessorPil`` for LLaVA-OneVision / R-4B). :func:`processor_for` builds the family's own
processor class (``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``, ``LlavaOnevisionProcessor``) with no video processor
(images only), so placeholder expansion, ``pixel_values``, ``image_grid_thw`` / ``image_sizes`` and
``mm_token_type_ids`` are the family's own code. The result is a ``transformers.ProcessorMixin``, which TRL takes
as ``processing_class`` (its chat template renders image items; ``apply_chat_template(..., tokenize=True)`` loads
the images from the messages). Video inputs are refused by the processor (it has no ``video_processor``).

Example:
    >>> from r4b_fast.models import processor_for
    >>> processor = processor_for("runs/qwen25vl")              # doctest: +SKIP
    >>> processor(images=[[img]], text=[prompt], return_tensors="pt")["image_grid_thw"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                    "llava_onevision": "LlavaOnevisionProcessor", "r4b": "LlavaOnevisionProcessor"}  # fmt: skip


@cache
def pil_processor_class(name: str) -> type:
    """``transformers.<name>`` without its ``video_processor`` attribute (so no torchvision is needed): the same
    class otherwise, named ``<name>Pil``."""
    import transformers

    base = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"{name}Pil", (base,), {"__init__": __init__, "__module__": __name__,
                                        "__doc__": f"{name} with images only (PIL image processor, no video)."})


def _get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _vision(config):
    return _get(config, "vision_config") or {}


def pil_image_processor(config, family):
    """The family's PIL image processor with the sizes ``config`` implies (patch / merge / temporal patch for the
    Qwen families, the crop size and AnyRes grid for LLaVA-OneVision / R-4B); other settings at the class
    defaults, as the published ``preprocessor_config.json`` files leave them."""
    vision = _vision(config)
    if family.rope == "mrope":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=_get(vision, "patch_size"),
                                        merge_size=_get(vision, "spatial_merge_size"),
                                        temporal_patch_size=_get(vision, "temporal_patch_size"))  # fmt: skip
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    s = int(_get(vision, "image_size"))
    return LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                           image_grid_pinpoints=_get(config, "image_grid_pinpoints"))  # fmt: skip


def _load_image_processor(folder: Path, family):
    if family.rope == "mrope":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    else:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as cls,
        )
    return cls.from_pretrained(str(folder))


def _resolve(model_dir_or_config):
    """``(config, folder | None, family)`` of a model folder, a config (object or dict) or a model."""
    from r4b_fast.models.families import detect_family, family_of

    if isinstance(model_dir_or_config, (str, Path)):
        folder = Path(model_dir_or_config)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model_dir_or_config: {folder} has no config.json")
        config = json.loads((folder / "config.json").read_text())
        return config, folder, detect_family(config)
    if hasattr(model_dir_or_config, "config") and hasattr(model_dir_or_config, "forward"):  # a model
        return model_dir_or_config.config, None, family_of(model_dir_or_config)
    return model_dir_or_config, None, detect_family(model_dir_or_config)


def processor_for(model_dir_or_config, tokenizer=None, *, image_processor=None, chat_template: str | None = None,
                  padding_side: str = "left"):  # fmt: skip
    """The family's processor (a ``ProcessorMixin``) built without torchvision.

    Args:
        model_dir_or_config: a model folder (``config.json``; its tokenizer and ``preprocessor_config.json`` are
            loaded when present), a config (``PretrainedConfig`` or dict) or a model.
        tokenizer: the model's tokenizer (default: the folder's). Its ``padding_side`` is set to ``padding_side``
            (left: as TRL pads prompts, TRL #5785).
        image_processor: a PIL image processor (default: the folder's ``preprocessor_config.json`` loaded into the
            family's PIL class, else :func:`pil_image_processor` from the config).
        chat_template: default the tokenizer's.

    Returns:
        ``Qwen2_5_VLProcessorPil`` / ``Qwen3VLProcessorPil`` / ``LlavaOnevisionProcessorPil`` (R-4B too: its
        placeholder ``<image>``, LLaVA-OneVision's AnyRes expansion).

    Example:
        >>> proc = processor_for(model.config, tokenizer=tok, image_processor=image_processor)  # doctest: +SKIP
        >>> trainer = BPOTrainer(model=model, processing_class=proc, ...)                     # doctest: +SKIP
    """
    config, folder, family = _resolve(model_dir_or_config)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if tokenizer is None:
        if folder is None:
            raise ValueError("tokenizer: required when model_dir_or_config is a config or a model (no folder)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = padding_side
    if image_processor is None:
        if folder is not None and (folder / "preprocessor_config.json").exists():
            image_processor = _load_image_processor(folder, family)
        else:
            image_processor = pil_image_processor(config, family)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    cls = pil_processor_class(_PROCESSOR_CLASS[family.name])
    if family.rope == "mrope":
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    image_id = family.image_token_id(config if not isinstance(config, dict) else _Namespace(config))
    vision = _vision(config)
    per_crop = (int(_get(vision, "image_size")) // int(_get(vision, "patch_size"))) ** 2
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
               num_image_tokens=per_crop, image_token=tokenizer.convert_ids_to_tokens(image_id),
               vision_feature_select_strategy=_get(config, "vision_feature_select_strategy", "full"),
               vision_aspect_ratio=_get(config, "vision_aspect_ratio", "anyres_max_9"))  # fmt: skip


class _Namespace:
    def __init__(self, d: dict):
        self.__dict__.update(d)
