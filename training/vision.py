"""Images -> what a LLaVA-OneVision (R-4B) model needs: pixel inputs, vision features, placeholder counts.

One object serves both loops, so that prompts and features always agree:

- Without an image processor (the embedded tiny model, whose folder has none): each image is resized to the vision
  tower's input size and given as the base view plus one identical grid crop (the tiny model's only AnyRes grid).
- With the checkpoint's image processor (``preprocessor_config.json`` beside the weights, loaded with
  ``AutoImageProcessor``): its own resizing, AnyRes tiling and normalisation, at each image's native size.

The number of ``<image>`` placeholders an image needs is the number of feature rows the model's own path
(``get_image_features``) produces for it: measured once per image size and remembered, never re-derived.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ImageEncoder:
    def __init__(self, model, image_processor=None):
        self.image_processor = image_processor
        config = model.config
        self.image_size = int(config.vision_config.image_size)
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        self._counts: dict[tuple, int] = {}  # image-size key -> placeholders

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
        image_sizes [N, 2])`` on ``device``."""
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

    def features(self, model, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image its ``[n_i, D]`` vision features (tower + projector + AnyRes layout), differentiable."""
        param = next(model.parameters())
        pixel_values, image_sizes = self.pixel_inputs(images, param.device, param.dtype)
        out = model.model.get_image_features(pixel_values, image_sizes=image_sizes,
                                             vision_feature_layer=self.feature_layer,
                                             vision_feature_select_strategy=self.select_strategy)  # fmt: skip
        feats = list(out.pooler_output)
        for img, f in zip(images, feats):
            self._counts[self._key(img)] = f.shape[0]
        return feats

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
        if key not in self._counts:
            with torch.no_grad():
                self.features(model, [blank])
        return self._counts[key]
