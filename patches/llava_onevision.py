"""Adapter for LLaVA-OneVision (``model_type="llava_onevision"``, ``LlavaOnevisionForConditionalGeneration``):
anyres images, multi-image samples and videos.

Images are laid out as in LLaVA-NeXT (see :mod:`vlmprune.patches.llava_next`: a base view, then the unpadded
high-resolution grid with a newline token after every row; pruned as two parts of one budget, newlines always
kept), with two OneVision differences, both followed by computing the layout with the model's own packing code:
a grid larger than ``vision_aspect_ratio`` allows (``anyres_max_9``: 9 crops' worth) is shrunk by bilinear
interpolation, so its tokens (and the ViT scores packed with them) are interpolated too; and in a sample with
several images (``batch_num_images > 1``) each image is its base view only, plus one newline.

A video is one item: every frame's ``s x s`` grid pooled 2x2 (bilinear) by the model, frames in order, one newline
token after the last frame. It is pruned as one ``(frames, h, w)`` grid with the item's budget (the newline kept);
ViT scores are captured per frame and pooled like the features.

OneVision's SigLIP tower has no CLS token: HiPrune and DAMRO read the attention every patch *receives*
(DAMRO ``score="received"``, its ``"auto"`` choice here), VisionZip picks dominant tokens by received attention and
merges the rest by head-mean keys in the LLM's space (as on Qwen-VL). The LLM (Qwen2) uses 1-D RoPE:
``position_mode="contiguous"`` (default) or ``"original"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PatchBypassedError
from ..stats import anyres_crops, onevision_lone_images
from ._base import VisionItem, content_key
from ._probes import ClipAttentionProbe
from .llava_next import LlavaNextAdapter, _Layout, _PackedProbe

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    label = "LLaVA-OneVision"
    hf_class = "LlavaOnevisionForConditionalGeneration"
    inputs = ("images", "multi-image", "video")
    positions = "`contiguous` (default) or `original`; newline tokens always kept"
    mrope = False
    provides = frozenset({"vit_attention"})  # SigLIP: no CLS token

    def image_layout(self, model: nn.Module, image_size: Any, strategy: str, aspect: str, anyres: bool) -> _Layout:
        """One image of ``image_size`` ``(H, W)``: anyres crops unless ``anyres`` is False (multi-image samples)."""
        hw = self._hw(image_size)
        key = ("image", hw, strategy, aspect, anyres)
        if key not in self._cache:
            vlm, side = model.model, self._side(model)
            size = torch.tensor([hw])

            def packer(values: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
                return vlm.pack_image_features([values], size, image_newline=newline, vision_aspect_ratio=aspect)[0][0]

            n_units = anyres_crops(model.config, [hw])[0] if anyres else 1
            unit_rows = self._unit_rows(model, strategy)
            self._cache[key] = _Layout(packer, n_units, unit_rows, side * side, side)
        return self._cache[key]

    def video_layout(self, model: nn.Module, frames: int, strategy: str) -> _Layout:
        key = ("video", frames, strategy)
        if key not in self._cache:
            vlm, side = model.model, self._side(model)

            def packer(values: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
                pooled = vlm.apply_pooling(values).reshape(-1, values.shape[-1])  # (frames * h * w, C)
                return torch.cat([pooled, newline[None].to(pooled)])

            unit_rows = self._unit_rows(model, strategy)
            pooled_side = vlm.apply_pooling(torch.zeros(1, side * side, 1)).shape[1]
            h = w = int(round(pooled_side**0.5))
            self._cache[key] = _Layout(packer, frames, unit_rows, side * side, side, video_grid=(frames, h, w))
        return self._cache[key]

    def item_layouts(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> tuple[list[_Layout], torch.Tensor | None]:
        strategy = self._strategy(inputs, model)
        if kind == "video":
            pixels = inputs.get("pixel_values_videos", inputs.get("pixel_values"))  # renamed after 5.0
            if pixels is None or pixels.ndim != 5:
                raise PatchBypassedError(
                    "LLaVA-OneVision encoded videos without (videos, frames, C, H, W) pixels in view; cannot lay "
                    "their tokens out. Run vlmprune.unpatch(model)."
                )
            return [self.video_layout(model, int(pixels.shape[1]), strategy) for _ in features], pixels
        sizes = inputs.get("image_sizes")
        aspect = inputs.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        anyres = onevision_lone_images(inputs.get("batch_num_images"), len(features))
        if sizes is None or len(sizes) != len(features) or len(anyres) != len(features):
            raise PatchBypassedError(
                f"LLaVA-OneVision: {len(features)} images encoded but image_sizes / batch_num_images describe "
                "another count; cannot lay the tokens out. Build inputs with the model's processor."
            )
        layouts = [
            self.image_layout(model, hw, strategy, aspect, multi) for hw, multi in zip(sizes, anyres, strict=True)
        ]
        return layouts, inputs.get("pixel_values")

    def fallback_item(self, kind: str, feature: torch.Tensor, call: Any, index: int, model: nn.Module) -> VisionItem:
        n = int(feature.shape[0])
        return VisionItem(kind, n, (1, 1, n), content_key(feature))  # pre-encoded: no layout, every token prunable

    def layer_capture(self, model: nn.Module, layer: int) -> Any:
        """VisionZip without CLS: received attention and head-mean keys of one block, per tower input."""
        side = self._side(model)
        return _PackedProbe(ClipAttentionProbe(model, [layer], side * side, with_keys=True), self)
