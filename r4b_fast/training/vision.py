"""Images -> what a model needs: pixel inputs, vision features, placeholder counts, for every family the loops load
(``r4b_fast.models``: LLaVA-OneVision, R-4B, Qwen2.5-VL, Qwen3-VL).

One object serves both loops, so that prompts and features always agree. LLaVA-OneVision / R-4B:

- Without an image processor (the embedded tiny model, whose folder has none): each image is resized to the vision
  tower's input size and given as the base view plus one identical grid crop (the tiny model's only AnyRes grid).
- With the checkpoint's image processor (``preprocessor_config.json`` beside the weights, loaded with
  ``AutoImageProcessor``): its own resizing, AnyRes tiling and normalisation, at each image's native size.

The number of ``<image>`` placeholders an image needs is the number of feature rows the model's own path
(``get_image_features``) produces for it: measured once per image size and remembered, never re-derived.

Qwen2.5-VL / Qwen3-VL: the checkpoint's image processor is required (``Qwen2VLImageProcessor``; without torchvision
``AutoImageProcessor`` gives its PIL twin, and no video processor is loaded: ``AutoProcessor`` would need
torchvision). An image of patch grid ``(t, h, w)`` needs ``t * h * w / merge_size**2`` ``<|image_pad|>``
placeholders, read from the processor's grid (no model pass).
"""

from __future__ import annotations

from pathlib import Path

import torch


class ImageEncoder:
    """Example: ``enc = ImageEncoder.for_model(model, path)``; ``enc.encode(model, [img]).features[0]`` is
    ``[enc.count(model, item), D]``."""

    def __init__(self, model, image_processor=None):
        from r4b_fast.models import family_of

        self.family = family_of(model)
        self.image_processor = image_processor
        config = model.config
        self._counts: dict[tuple, int] = {}  # image-size key -> placeholders
        if self.family.rope == "mrope":
            if image_processor is None:
                raise ValueError(f"{self.family.title} needs its checkpoint's image processor "
                                 "(preprocessor_config.json beside the weights)")  # fmt: skip
            self.merge_size = self.family.spatial_merge_size(config)
            self.feature_layer = self.select_strategy = None
            return
        self.image_size = int(config.vision_config.image_size)
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy

    @classmethod
    def for_model(cls, model, path: Path | str | None = None) -> ImageEncoder:
        """The encoder for ``model``, with the image processor saved in ``path`` when there is one."""
        if path is not None and (Path(path) / "preprocessor_config.json").exists():
            from transformers import AutoImageProcessor

            return cls(model, AutoImageProcessor.from_pretrained(str(path)))
        return cls(model)

    def _key(self, image: torch.Tensor) -> tuple:
        # without a processor every image is resized to one size: one count for all
        return ("fixed",) if self.image_processor is None else tuple(image.shape[-2:])

    def pixel_inputs(self, images: list[torch.Tensor], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: ``[3, H, W]`` float tensors in [0, 1] (any sizes) -> ``(pixel_values [N, crops, 3, S, S],
        image_sizes [N, 2])`` on ``device``; Qwen families: ``(pixel_values [patches, C*T*P*P], image_grid_thw
        [N, 3])``."""
        if self.family.rope == "mrope":
            out = self.image_processor([img.float().cpu() for img in images], return_tensors="pt", do_rescale=False)
            return out["pixel_values"].to(device=device, dtype=dtype), out["image_grid_thw"].to(device)
        if self.image_processor is None:
            from r4b_fast.training.tiny_model import pixel_inputs

            s = self.image_size
            resized = [
                img if tuple(img.shape[-2:]) == (s, s) else torch.nn.functional.interpolate(
                    img[None].float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
                for img in images
            ]  # fmt: skip
            pixel_values, image_sizes = pixel_inputs(torch.stack(resized))
        else:
            out = self.image_processor([img.float().cpu() for img in images], return_tensors="pt", do_rescale=False)
            pixel_values, image_sizes = out["pixel_values"], out["image_sizes"]
        return pixel_values.to(device=device, dtype=dtype), image_sizes.to(device)

    def encode(self, model, images: list[torch.Tensor]):
        """The images' :class:`~r4b_fast.models.EncodedImages` through the model's own vision path (tower +
        projector + AnyRes layout, or the Qwen ViT + merger with its grid and DeepStack features), differentiable."""
        param = next(model.parameters())
        pixel_values, extra = self.pixel_inputs(images, param.device, param.dtype)
        encoded = self.family.image_features(model, pixel_values, extra, feature_layer=self.feature_layer,
                                             select_strategy=self.select_strategy)  # fmt: skip
        for img, f in zip(images, encoded.features):
            self._counts[self._key(img)] = f.shape[0]
        return encoded

    def features(self, model, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image its ``[n_i, D]`` vision features (:meth:`encode`'s ``features``), differentiable."""
        return self.encode(model, images).features

    def count(self, model, item) -> int:
        """``<image>`` placeholders the image of ``item`` (anything with ``image()``, and ``size`` ``(H, W)`` when it
        knows it) needs. A new image size costs one no-grad feature pass of ``model`` on a blank image of that size
        (so ``model`` must then be a plain, unsharded copy: measure every size before sharding)."""
        if self.image_processor is None:
            size = (self.image_size, self.image_size)
        else:
            size = getattr(item, "size", None) or tuple(item.image().shape[-2:])
        blank = torch.zeros(3, *size)
        key = self._key(blank)
        if key not in self._counts and self.family.rope == "mrope":  # the processor's grid says it: no model pass
            _, grid = self.pixel_inputs([blank], "cpu", torch.float32)
            self._counts[key] = int(grid[0].prod()) // self.merge_size**2
        if key not in self._counts:
            with torch.no_grad():
                self.features(model, [blank])
        return self._counts[key]
