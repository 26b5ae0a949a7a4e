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

Files: ``r4b_template.py`` (tokens, chat template, mode prefixes), ``r4b_modeling.py`` (classes, registration,
detection, loading), ``r4b_tiny.py`` (the tiny checkpoint). This module re-exports them and registers the classes.
"""

# ruff: noqa: F401  (re-exports)
from r4b_fast.models.r4b_modeling import (
    PRE_NORM_EPS,
    PUBLISHED_PREFIXES,
    R4B_ARCHITECTURE,
    R4B_MODEL_TYPE,
    RConfig,
    RForConditionalGeneration,
    RMultiModalProjector,
    _config_dict,
    is_r4b_checkpoint,
    load_r4b,
    published_state_dict,
    register,
)
from r4b_fast.models.r4b_template import (
    ASSISTANT_HEADER,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    R4B_CHAT_TEMPLATE,
    THINK_CLOSE,
    THINK_CLOSE_SEQUENCE,
    THINK_OPEN,
    THINKING_MODE_OF,
    THINKING_MODE_PREFIX,
    THINKING_MODES,
    template_mode_prefixes,
)
from r4b_fast.models.r4b_tiny import _tiny_config, build_r4b_tokenizer, write_tiny_r4b_checkpoint
from r4b_fast.modes import Mode

register()
