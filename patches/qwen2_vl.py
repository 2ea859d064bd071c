"""Adapter for Qwen2-VL (``model_type="qwen2_vl"``); Qwen2.5-VL extends it.

Images and videos are pruned. Each one's tokens form the ``(t, h/m, w/m)`` grid after the ``m x m`` patch merger
(``image_grid_thw`` / ``video_grid_thw`` give ``(t, h, w)`` in patches). Kept tokens keep their original 3-D
M-RoPE positions (the only correct choice: the positions encode the grid) and decoding continues from the
original ``max position + 1``, exactly as the unpatched model does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import Adapter, VisionItem, _Call, content_key
from ._probes import QwenAttentionProbe

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    mrope = True
    provides = frozenset({"vit_attention"})

    def vit_depth(self, model: nn.Module) -> int:
        return len(model.model.visual.blocks)

    def feature_layer(self, model: nn.Module) -> int:
        return -1  # the merger reads the last block

    def attention_probe(self, model: nn.Module, layers: list[int]) -> QwenAttentionProbe:
        return QwenAttentionProbe(model, layers)

    def layer_capture(self, model: nn.Module, layer: int) -> QwenAttentionProbe:
        """Attention received and head-mean keys of one block, per LLM token of each image (no CLS here)."""
        return QwenAttentionProbe(model, [layer], with_keys=True)

    def _items(
        self, kind: str, grids: torch.Tensor, pixels: torch.Tensor | None, model: nn.Module
    ) -> list[VisionItem]:
        m = int(model.config.vision_config.spatial_merge_size)
        items, start = [], 0
        for t, h, w in grids.tolist():
            n_patches = t * h * w
            key = content_key(pixels[start : start + n_patches]) if pixels is not None else content_key(grids)
            start += n_patches
            grid = (int(t), int(h) // m, int(w) // m)
            items.append(VisionItem(kind, grid[0] * grid[1] * grid[2], grid, key))
        return items

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        grids = inputs.get(f"{kind}_grid_thw")
        pixels = inputs.get("pixel_values" if kind == "image" else "pixel_values_videos")
        if grids is None:
            return [super().fallback_item(kind, f, None, i, model) for i, f in enumerate(features)]
        return self._items(kind, grids, pixels, model)

    def fallback_item(self, kind: str, feature: torch.Tensor, call: _Call, index: int, model: nn.Module) -> VisionItem:
        grids = call.kwargs.get(f"{kind}_grid_thw") if call is not None else None
        if grids is not None and index < len(grids):
            item = self._items(kind, grids[index : index + 1], None, model)[0]
            if item.num_tokens == int(feature.shape[0]):
                item.key = content_key(feature)
                return item
        return super().fallback_item(kind, feature, call, index, model)
