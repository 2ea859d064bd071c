"""Adapter for FastVLM (``model_type="fast_vlm"``, ``FastVlmForConditionalGeneration``).

FastVLM's encoder (FastViTHD, a hybrid conv / attention network loaded through ``timm``) already emits few tokens:
one per 64 x 64 pixels (256 for a 1024 px image), as a feature map that the model flattens in raster order. The
LLM (Qwen2) uses 1-D RoPE, so the LLaVA conventions apply (``position_mode="contiguous"`` by default). There is no
CLS token and no ViT attention this adapter reads, so methods that need the vision tower's attention (HiPrune,
VisionZip) are refused with a clear error; the baselines, VQToken, FastV and DAMRO (``score="norm"``) work. The
token grid is recovered from the image size and the token count (square strides only), else a 1-D sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._base import Adapter, VisionItem, _Call, content_key

__all__ = ["FastVlmAdapter"]


class FastVlmAdapter(Adapter):
    model_types = ("fast_vlm",)
    label = "FastVLM"
    hf_class = "FastVlmForConditionalGeneration"
    mrope = False
    provides = frozenset()

    @staticmethod
    def _grid(n: int, pixels: torch.Tensor | None) -> tuple[int, int, int]:
        """``(1, h, w)`` from the image's ``(H, W)`` when one square stride maps it to ``n`` tokens; else a square
        ``(1, s, s)`` when ``n`` is a square, else ``(1, 1, n)``."""
        if pixels is not None and pixels.ndim == 4 and n > 0:
            H, W = (int(v) for v in pixels.shape[-2:])
            stride = round(math.sqrt(H * W / n))
            if stride > 0 and H % stride == 0 and W % stride == 0 and (H // stride) * (W // stride) == n:
                return (1, H // stride, W // stride)
        side = math.isqrt(n)
        return (1, side, side) if side * side == n else (1, 1, n)

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        pixels = inputs.get("pixel_values")
        # keyed by the features' content (not the pixels'): generate() may hand back a repeated copy of the batched
        # features (beams, num_return_sequences), which the fallback below keys the same way
        return [
            VisionItem(kind, int(f.shape[0]), self._grid(int(f.shape[0]), pixels), content_key(f)) for f in features
        ]

    def fallback_item(self, kind: str, feature: torch.Tensor, call: _Call, index: int, model: nn.Module) -> VisionItem:
        n = int(feature.shape[0])
        return VisionItem(kind, n, self._grid(n, None), content_key(feature))
