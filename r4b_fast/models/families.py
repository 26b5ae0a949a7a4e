"""The model families the loops load, one small adapter each: the class, which RoPE, how images become features,
how a packed batch runs through the language model, and what the rollout engine calls.

=================  ============================================  =======  ==========================================
family             architectures (config.json)                   RoPE     vision features
=================  ============================================  =======  ==========================================
LLaVA-OneVision    LlavaOnevisionForConditionalGeneration        1-D      SigLIP + projector + AnyRes, ``<image>``
R-4B               RForConditionalGeneration (r4b_fast.models.r4b) 1-D    as LLaVA-OneVision, LayerNorm'd projector
Qwen2.5-VL         Qwen2_5_VLForConditionalGeneration            M-RoPE   window-attention ViT + merger,
                                                                          ``<|image_pad|>`` x (t*h*w / merge^2)
Qwen3-VL           Qwen3VLForConditionalGeneration               M-RoPE   ViT + merger + DeepStack features added to
                   (interleaved)                                          the first decoder layers' image positions
=================  ============================================  =======  ==========================================

Packed training forwards go through ``pack_multimodal`` (``rope="mrope"`` equals transformers' ``get_rope_index``
for images) and ``packed_forward``; the Qwen families run their language model directly (``model.model
.language_model``) with the packed M-RoPE positions, and Qwen3-VL's DeepStack features as the keyword arguments its
text model takes (``visual_pos_masks``, ``deepstack_visual_embeds``), so no version-specific ``rope_deltas`` or
``mm_token_type_ids`` logic of the full model is involved.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EncodedImages:
    """Vision features of a list of images, in order.

    features:   per image ``[n_i, D]`` (``n_i`` placeholders), differentiable.
    grid_thw:   ``[N, 3]`` int64 patch grid per image (Qwen families; None for LLaVA-OneVision / R-4B).
    deepstack:  Qwen3-VL: per DeepStack layer ``[sum n_i, D]`` (images concatenated in order); else None.
    """

    features: list[torch.Tensor]
    grid_thw: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None

    def select(self, index: list[int]) -> EncodedImages:
        """The images ``index`` (repeats allowed), in that order: e.g. one per rollout row."""
        feats = [self.features[i] for i in index]
        grid = None if self.grid_thw is None else self.grid_thw[torch.tensor(index, dtype=torch.long)]
        deep = None
        if self.deepstack is not None:
            offsets = [0]
            for f in self.features:
                offsets.append(offsets[-1] + f.shape[0])
            deep = [torch.cat([layer[offsets[i] : offsets[i + 1]] for i in index]) for layer in self.deepstack]
        return EncodedImages(feats, grid, deep)


@dataclass(frozen=True)
class Family:
    """One model family. ``name``: ``llava_onevision``, ``r4b``, ``qwen2_5_vl`` or ``qwen3_vl``."""

    name: str
    title: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    class_path: str  # "module:Class"
    rope: str  # "1d" | "mrope"
    deepstack: bool = False

    def model_class(self):
        module, cls = self.class_path.split(":")
        return getattr(importlib.import_module(module), cls)

    # -- config ---------------------------------------------------------------------------------------------------
    @staticmethod
    def image_token_id(config) -> int:
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    def spatial_merge_size(self, config) -> int:
        return int(config.vision_config.spatial_merge_size) if self.rope == "mrope" else 1

    # -- images ---------------------------------------------------------------------------------------------------
    def image_features(self, model, pixel_values, extra: torch.Tensor, *, feature_layer=None,
                       select_strategy=None) -> EncodedImages:  # fmt: skip
        """The model's own vision path. ``extra``: ``image_sizes [N, 2]`` (LLaVA-OneVision / R-4B, with
        ``pixel_values [N, crops, 3, S, S]``) or ``image_grid_thw [N, 3]`` (Qwen, with flattened patches)."""
        if self.rope == "1d":
            out = model.model.get_image_features(pixel_values, image_sizes=extra, vision_feature_layer=feature_layer,
                                                 vision_feature_select_strategy=select_strategy)  # fmt: skip
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            return EncodedImages(list(feats))
        out = model.model.get_image_features(pixel_values, extra)
        deep = None
        if hasattr(out, "pooler_output"):  # transformers 5.x: a model output
            feats = out.pooler_output
            deep = getattr(out, "deepstack_features", None)
        elif isinstance(out, tuple) and len(out) == 2 and self.deepstack:  # (features, deepstack) of older releases
            feats, deep = out
        else:
            feats = out
        if isinstance(feats, torch.Tensor):  # one tensor for all images: split per image
            sizes = (extra.prod(-1) // self.spatial_merge_size(model.config) ** 2).tolist()
            feats = torch.split(feats, sizes)
        if self.deepstack:
            if deep is None:
                raise RuntimeError(f"{self.title}: the vision tower returned no DeepStack features")
            deep = [torch.cat(list(layer)) if not isinstance(layer, torch.Tensor) else layer for layer in deep]
        else:
            deep = None
        return EncodedImages(list(feats), extra, deep)

    # -- training forward -----------------------------------------------------------------------------------------
    def packed_hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: EncodedImages, *,
                      text_embeds: torch.Tensor | None = None):  # fmt: skip
        """Last hidden states ``[T, D]`` of a padded batch (``input_ids`` / ``attention_mask`` ``[B, L]``, each row's
        image placeholders filled by ``images`` in batch order) run packed, and the ``PackedBatch``.
        ``text_embeds``: ``[B, L, D]`` instead of the embedding table (e.g. to keep a sampled placeholder id's own
        embedding: give ``input_ids`` with such ids replaced, and the embeddings of the real ones)."""
        from r4b_fast.ops.pack_multimodal import pack_multimodal
        from r4b_fast.packed_forward import packed_forward

        image_id = self.image_token_id(model.config)
        vision = torch.cat(images.features) if images.features else None
        table = {"text_embeds": text_embeds} if text_embeds is not None else {
            "embed_weight": model.get_input_embeddings().weight}  # fmt: skip
        if self.rope == "1d":
            packed = pack_multimodal(input_ids, attention_mask, vision_embeds=vision, image_token_id=image_id,
                                     rope="1d", **table)  # fmt: skip
            return packed_forward(model.model, packed).last_hidden_state[0], packed
        packed = pack_multimodal(input_ids, attention_mask, vision_embeds=vision, image_token_id=image_id,
                                 rope="mrope", image_grid_thw=images.grid_thw,
                                 spatial_merge_size=self.spatial_merge_size(model.config), **table)  # fmt: skip
        kwargs = {}
        if self.deepstack and images.deepstack is not None:
            kwargs = {"visual_pos_masks": (packed.pack(input_ids) == image_id)[None],
                      "deepstack_visual_embeds": images.deepstack}  # fmt: skip
        return packed_forward(model.model.language_model, packed, **kwargs).last_hidden_state[0], packed

    # -- generation -----------------------------------------------------------------------------------------------
    def generation_model(self, model):
        """What the rollout engine calls: the model itself (LLaVA-OneVision / R-4B), or for the Qwen families its
        language model + LM head, so that explicit M-RoPE positions and DeepStack features reach the text model."""
        return model if self.rope == "1d" else LanguageModelWithHead(model)

    def prompt_inputs(self, model, prompt_ids: list[list[int]], images: EncodedImages):
        """Per prompt ``(embeds [L_p, D], positions [L_p] | [3, L_p] | None, deepstack [K, L_p, D] | None)``: the
        token embeddings with the image features written over the placeholders, the M-RoPE positions, and the
        DeepStack features at the image positions (zero elsewhere)."""
        device = next(model.parameters()).device
        embed = model.get_input_embeddings()
        image_id = self.image_token_id(model.config)
        if self.rope == "1d":  # the project's original path, kept exactly
            out = []
            for p, ids in enumerate(prompt_ids):
                ids_t = torch.tensor(ids, device=device)
                e = embed(ids_t).clone()
                e[ids_t == image_id] = images.features[p].to(e.dtype)
                out.append((e, None, None))
            return out
        from r4b_fast.ops.pack_multimodal import pack_multimodal

        lens = [len(ids) for ids in prompt_ids]
        ids = torch.zeros(len(prompt_ids), max(lens), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for p, row in enumerate(prompt_ids):
            ids[p, : len(row)] = torch.tensor(row)
            mask[p, : len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        packed = pack_multimodal(ids, mask, embed.weight, torch.cat(images.features), image_token_id=image_id,
                                 rope="mrope", image_grid_thw=images.grid_thw,
                                 spatial_merge_size=self.spatial_merge_size(model.config))  # fmt: skip
        embeds = packed.inputs_embeds.split(lens)
        positions = packed.position_ids.split(lens, dim=-1)
        deep = [None] * len(lens)
        if self.deepstack and images.deepstack is not None:
            is_img = packed.pack(ids) == image_id
            full = []
            for layer in images.deepstack:
                dense = layer.new_zeros(is_img.shape[0], layer.shape[-1])
                dense[is_img] = layer.to(dense.dtype)
                full.append(dense)
            deep = list(torch.stack(full).split(lens, dim=1))
        return list(zip(embeds, positions, deep))


class LanguageModelWithHead(torch.nn.Module):
    """A Qwen-VL model seen as a text causal LM: ``language_model`` then ``lm_head``, with the keyword arguments
    the rollout engine passes (``inputs_embeds`` / ``input_ids``, ``attention_mask``, ``position_ids`` 1-D or
    M-RoPE, the KV cache, ``logits_to_keep``, DeepStack's ``visual_pos_masks`` / ``deepstack_visual_embeds``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=True, logits_to_keep: int = 0, **kwargs):  # fmt: skip
        import inspect
        from types import SimpleNamespace

        lm = self.model.model.language_model
        cache_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        out = lm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=position_ids, use_cache=use_cache, **{cache_name: cache}, **kwargs)  # fmt: skip
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.model.lm_head(hidden))


LLAVA_ONEVISION = Family("llava_onevision", "LLaVA-OneVision", ("LlavaOnevisionForConditionalGeneration",),
                         ("llava_onevision",), "transformers:LlavaOnevisionForConditionalGeneration", "1d")
# "rvl": r4b_fast.models.r4b.R4B_MODEL_TYPE (not imported here: that module imports transformers)
R4B = Family("r4b", "R-4B", ("RForConditionalGeneration",), ("rvl",), "r4b_fast.models.r4b:RForConditionalGeneration",
             "1d")
QWEN2_5_VL = Family("qwen2_5_vl", "Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl",),
                    "transformers:Qwen2_5_VLForConditionalGeneration", "mrope")
QWEN3_VL = Family("qwen3_vl", "Qwen3-VL", ("Qwen3VLForConditionalGeneration",), ("qwen3_vl",),
                  "transformers:Qwen3VLForConditionalGeneration", "mrope", deepstack=True)
FAMILIES = (R4B, LLAVA_ONEVISION, QWEN2_5_VL, QWEN3_VL)  # R-4B first: its config may also say llava_onevision


def supported() -> str:
    return ", ".join(f"{f.title} ({f.architectures[0]})" for f in FAMILIES)


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    return {"architectures": getattr(config, "architectures", None), "model_type": getattr(config, "model_type", None)}


def detect_family(config) -> Family:
    """The family of a model from its config (a ``PretrainedConfig``, a config dict, a model folder or its
    ``config.json``): by ``architectures``, else ``model_type``. An unsupported one raises ``ValueError`` naming
    what was found and the supported list.

    Example: ``detect_family("runs/annealing/model").name`` -> ``"llava_onevision"``.
    """
    cfg = _as_dict(config)
    archs = list(cfg.get("architectures") or [])
    model_type = cfg.get("model_type")
    for family in FAMILIES:
        if any(a in family.architectures for a in archs):
            return family
    if not archs:
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    raise ValueError(f"--model: unsupported architecture {archs or None} (model_type {model_type!r}); supported: "
                     f"{supported()}")  # fmt: skip


def family_of(model) -> Family:
    """The family of a loaded model (by its class first: a model built in memory has no ``architectures``)."""
    for family in FAMILIES:
        if type(model).__name__ in family.architectures:
            return family
    return detect_family(model.config)


def load_pretrained(path, device, dtype=torch.float32):
    """``(model, tokenizer, family)`` from a model folder (or a hub id) of a supported family, fp32 master weights
    on ``device`` (the loops autocast the compute). R-4B folders load through ``r4b_fast.models.r4b`` (no remote
    code)."""
    from transformers import AutoTokenizer, PretrainedConfig

    local = Path(path)
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"--model: {path} has no config.json")
    if local.exists():
        family = detect_family(local)
    else:
        # the raw config.json: AutoConfig would ask for remote code on R-4B's published config (it has an auto_map)
        family = detect_family(PretrainedConfig.get_config_dict(str(path))[0])
    if family is R4B:  # its own loader: any model_type / auto_map the published config.json carries, no remote code
        from r4b_fast.models.r4b import load_r4b

        model = load_r4b(str(path), dtype=dtype, device=device)
    else:
        model = family.model_class().from_pretrained(str(path), dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(str(path)), family
