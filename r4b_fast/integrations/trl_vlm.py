"""Vision-language models in :class:`~r4b_fast.integrations.trl.BPOTrainer`: which families, what is refused when the
trainer is built, and the per-token multimodal fields kept aligned with the prompt ids TRL trains on.

Part of :mod:`r4b_fast.integrations.trl` (import from there).

TRL 1.16 tokenizes each prompt with the processor's chat template (per-token ``mm_token_type_ids`` come back as
unpadded lists) for generation, then calls the processor a second time on the rendered prompts (``padding=True``,
the processor's own padding side, no mode prefix) for the training forward's ``pixel_values`` / ``image_grid_thw``
/ ``mm_token_type_ids``, which it pads with zeros for the completion. Two ways that goes wrong here:

- the mode prefix appended to ``prompt_ids`` is not in the second call's text, so its token types are shorter than
  the ids and would be misaligned by the prefix length;
- a processor that pads on the right (TRL #5785) gives token types padded on the opposite side of TRL's left-padded
  ``prompt_ids``: the image positions (and the M-RoPE positions computed from them) move by the padding.

So the token types of the training forward are rebuilt from the very ids that are trained on
(:func:`token_types`: ``1`` at an image placeholder, ``2`` at a video one, in the prompt part of real tokens, ``0``
elsewhere, the completion included: a sampled placeholder id is text), which is what the processors compute
(``ProcessorMixin.create_mm_token_type_ids``) and cannot be misaligned by construction. For generation, the mode
prefix extends each prompt's token types with zeros (text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
_VIDEO_COLUMNS = ("video", "videos")


@dataclass(frozen=True)
class VisionInputs:
    """How one VLM's per-token fields are built: the family, its placeholder ids and the key its forward reads."""

    family: object  # r4b_fast.models.Family
    image_token_id: int
    video_token_id: int | None
    key: str | None  # "mm_token_type_ids" (Qwen families' M-RoPE) or None (LLaVA-OneVision / R-4B: 1-D RoPE)

    def types(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return token_types(ids, mask, prompt_width, self.image_token_id, self.video_token_id)


def token_types(ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, image_token_id: int,
                video_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[B, L]`` int64 modality per position of ``ids`` (``[B, L]``, any padding side, ``mask`` 1 on real tokens):
    1 image placeholder, 2 video placeholder, 0 text, only within the first ``prompt_width`` columns (the prompt;
    the completion is text whatever its ids).

    Example:
        >>> token_types(torch.tensor([[0, 7, 9, 7]]), torch.tensor([[0, 1, 1, 1]]), 3, 7).tolist()
        [[0, 1, 0, 0]]
    """
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :prompt_width] = True
    real = prompt & mask.bool()
    out = torch.zeros_like(ids, dtype=torch.long)
    out[real & (ids == image_token_id)] = 1
    if video_token_id is not None:
        out[real & (ids == video_token_id)] = 2
    return out


def extend_token_types(fields: dict, prefix_lengths: list[int]) -> dict:
    """TRL's per-prompt multimodal fields with each per-token field (unpadded lists, one per prompt) extended by
    the row's mode prefix: zeros (text)."""
    out = dict(fields)
    for key in TOKEN_TYPE_KEYS:
        if key not in fields:
            continue
        rows = fields[key]
        if isinstance(rows, torch.Tensor) or len(rows) != len(prefix_lengths):
            raise RuntimeError(f"BPOTrainer: {key} from the processor is not one unpadded list per prompt "
                               f"({type(rows).__name__} of {len(rows)} for {len(prefix_lengths)} prompts)")  # fmt: skip
        out[key] = [list(r) + [0] * n for r, n in zip(rows, prefix_lengths)]
    return out


def _config_id(config, *names) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _columns(dataset) -> set[str]:
    if dataset is None:
        return set()
    if isinstance(dataset, dict):  # several datasets by name
        return set().union(*(_columns(d) for d in dataset.values()))
    return set(getattr(dataset, "column_names", None) or [])


def check_vision(model, processing_class, datasets: list) -> VisionInputs | None:
    """Refuse, before any forward, what BPOTrainer cannot train with images; the :class:`VisionInputs` of a
    supported VLM with a processor, None for a text model with a tokenizer."""
    from transformers import ProcessorMixin

    from r4b_fast.models import family_of, supported

    try:
        family = family_of(model)
    except ValueError:
        family = None
    is_processor = isinstance(processing_class, ProcessorMixin)
    columns = set().union(*(_columns(d) for d in datasets))
    if columns & set(_VIDEO_COLUMNS):
        raise ValueError(f"train_dataset: video columns {sorted(columns & set(_VIDEO_COLUMNS))} are not supported "
                         "by BPOTrainer (images only: an 'image' or 'images' column)")  # fmt: skip
    has_images = bool(columns & {"image", "images"})
    if not is_processor:
        if has_images:
            raise ValueError("processing_class: the dataset has images, which need the model's processor, got a "
                             f"{type(processing_class).__name__}; build one with r4b_fast.models.processor_for(model"
                             ".config, tokenizer=...)")  # fmt: skip
        return None
    if family is None:
        raise ValueError(f"model: {type(model).__name__} is not a vision-language family BPOTrainer supports with a "
                         f"processor ({supported()})")  # fmt: skip
    config = model.config
    image_id = family.image_token_id(config)
    proc_id = getattr(processing_class, "image_token_id", None)
    if proc_id is None and getattr(processing_class, "image_token", None) is not None:
        proc_id = processing_class.tokenizer.convert_tokens_to_ids(processing_class.image_token)
    if proc_id is None or int(proc_id) != image_id:
        raise ValueError(f"processing_class.image_token_id: {proc_id} is not the model's image placeholder "
                         f"{image_id} (config.image_token_id): the placeholders would not receive the image "
                         "features; use the model's own tokenizer")  # fmt: skip
    video_id = _config_id(config, "video_token_id", "video_token_index")
    key = "mm_token_type_ids" if family.rope == "mrope" else None
    return VisionInputs(family, image_id, video_id, key)
