"""R-4B's model classes for plain transformers (:class:`RConfig`, :class:`RMultiModalProjector`,
:class:`RForConditionalGeneration`), the published key names, the Auto-class registration (:func:`register`),
checkpoint detection (:func:`is_r4b_checkpoint`) and loading (:func:`load_r4b`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.activations import ACT2FN

R4B_ARCHITECTURE = "RForConditionalGeneration"
R4B_MODEL_TYPE = "rvl"
PRE_NORM_EPS = 1e-6

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

