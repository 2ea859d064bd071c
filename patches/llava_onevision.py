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

    def _side(self, model: nn.Module) -> int:
        vc = model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def _unit_rows(self, model: nn.Module, strategy: str) -> int:
        """Rows per tower input that reach the projector: ``"default"`` drops the tower's first token."""
        side = self._side(model)
        tower_tokens = side * side + (1 if self._tower_has_cls(model) else 0)
        return tower_tokens - (1 if strategy == "default" else 0)

    @staticmethod
    def _tower_has_cls(model: nn.Module) -> bool:
        tower = model.model.vision_tower
        emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        return getattr(emb, "class_embedding", None) is not None

    def image_layout(self, model: nn.Module, image_size: Any, strategy: str, aspect: str, anyres: bool) -> _Layout:
        """One image of ``image_size`` ``(H, W)``: anyres crops unless ``anyres`` is False (multi-image samples)."""
        hw = tuple(int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size))
        key = ("image", hw, strategy, aspect, anyres)
        if key not in self._cache:
            vlm, side = model.model, self._side(model)
            size = torch.tensor([hw])

            def packer(values: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
                return vlm.pack_image_features([values], size, image_newline=newline, vision_aspect_ratio=aspect)[0][0]

            n_units = self._n_crops(model, hw) if anyres else 1
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

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        strategy = self._strategy(inputs, model)
        if kind == "video":
            pixels = inputs.get("pixel_values_videos", inputs.get("pixel_values"))  # renamed after 5.0
            if pixels is None or pixels.ndim != 5:
                raise PatchBypassedError(
                    "LLaVA-OneVision encoded videos without (videos, frames, C, H, W) pixels in view; cannot lay "
                    "their tokens out. Run vlmprune.unpatch(model)."
                )
            frames = int(pixels.shape[1])
            layouts = [self.video_layout(model, frames, strategy) for _ in features]
            keys = [content_key(pixels[i]) for i in range(len(features))]
        else:
            sizes = inputs.get("image_sizes")
            pixels = inputs.get("pixel_values")
            aspect = inputs.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
            per_sample = inputs.get("batch_num_images")
            anyres = (
                [True] * len(features) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(n)]
            )
            if sizes is None or len(sizes) != len(features) or len(anyres) != len(features):
                raise PatchBypassedError(
                    f"LLaVA-OneVision: {len(features)} images encoded but image_sizes / batch_num_images describe "
                    "another count; cannot lay the tokens out. Build inputs with the model's processor."
                )
            layouts = [self.image_layout(model, sizes[i], strategy, aspect, anyres[i]) for i in range(len(features))]
            keys = [
                content_key(pixels[i][: lay.n_units] if pixels is not None and pixels.ndim == 5 else f)
                for i, (f, lay) in enumerate(zip(features, layouts, strict=True))
            ]
        items = []
        for i, (f, lay, key) in enumerate(zip(features, layouts, keys, strict=True)):
            if kind == "video" and lay.n == int(f.shape[0]) + 1:
                # transformers <= ~5.12 appends the video's newline in forward, after get_video_features: the
                # item still spans it (its placeholders do)
                items.append(self._item(kind, lay, lay.n, key))
                continue
            if lay.n != int(f.shape[0]):
                raise PatchBypassedError(
                    f"LLaVA-OneVision {kind} {i} has {int(f.shape[0])} tokens but its packed layout has {lay.n}; this "
                    "transformers release packs them differently. Run vlmprune.unpatch(model)."
                )
            items.append(self._item(kind, lay, int(f.shape[0]), key))
        self.last_layouts = layouts
        return items

    def fallback_item(self, kind: str, feature: torch.Tensor, call: Any, index: int, model: nn.Module) -> VisionItem:
        n = int(feature.shape[0])
        return VisionItem(kind, n, (1, 1, n), content_key(feature))  # pre-encoded: no layout, every token prunable

    def layer_capture(self, model: nn.Module, layer: int) -> Any:
        """VisionZip without CLS: received attention and head-mean keys of one block, per tower input."""
        side = self._side(model)
        return _PackedProbe(ClipAttentionProbe(model, [layer], side * side, with_keys=True), self)
