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
    label = "Qwen2-VL"
    hf_class = "Qwen2VLForConditionalGeneration"
    inputs = ("images", "multi-image", "video")
    positions = "original 3-D M-RoPE (the only correct choice)"
    mrope = True
    provides = frozenset({"vit_attention", "encoder_resize"})

    def vit_depth(self, model: nn.Module) -> int:
        return len(model.model.visual.blocks)

    def feature_layer(self, model: nn.Module) -> int:
        return -1  # the merger reads the last block

    def attention_probe(self, model: nn.Module, layers: list[int]) -> QwenAttentionProbe:
        return QwenAttentionProbe(model, layers)

    def layer_capture(self, model: nn.Module, layer: int) -> QwenAttentionProbe:
        """Attention received and head-mean keys of one block, per LLM token of each image (no CLS here)."""
        return QwenAttentionProbe(model, [layer], with_keys=True)

    def install_encoder_reduction(self, ctx: Any, method: Any) -> None:
        """``fastvlm``'s ``resolution``: each image's (video's) patches are turned back into frames, resized to the
        reduced grid (a multiple of the merge size, as the processor's dynamic resolution would produce) and
        re-patched, and the vision tower runs natively on that grid; its merged tokens are then spread back over
        the original grid (nearest cell), so the placeholders still match and each reduced token sits at its
        cell's centre slot, the one ``method.select`` keeps and gives the smaller grid's M-RoPE positions (Qwen3-VL:
        its DeepStack features are spread the same way, so each kept token carries its own rows)."""
        from vlmprune.methods.fastvlm import patchify_qwen, resize_frames, unpatchify_qwen, unpool_index

        model = ctx.model
        vc = model.config.vision_config
        m, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        temporal, channels = int(vc.temporal_patch_size), int(getattr(vc, "in_channels", 3))
        visual = model.model.visual
        pending: list[list[Any]] = []

        def smaller_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            pixels = args[0] if args else kwargs["hidden_states"]
            grids = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            rows, new_grids, plan, start = [], [], [], 0
            for t, h, w in grids.tolist():
                n = t * h * w
                part = pixels[start : start + n]
                start += n
                h2, w2 = method.reduced_grid(h // m, w // m, t)
                plan.append(((t, h // m, w // m), (h2, w2)))
                if (h2, w2) == (h // m, w // m):  # the budget leaves this one whole
                    rows.append(part)
                    new_grids.append((t, h, w))
                    continue
                frames = unpatchify_qwen(part, (t, h, w), channels, temporal, patch, m)
                frames = resize_frames(frames, (h2 * m * patch, w2 * m * patch))
                rows.append(patchify_qwen(frames, temporal, patch, m))
                new_grids.append((t, h2 * m, w2 * m))
            whole = all(old[1:] == new for old, new in plan)
            pending.append(None if whole else plan)
            if whole:
                return None
            method.reduced_now = True
            new_pixels = torch.cat(rows)
            new_grid = torch.tensor(new_grids, dtype=grids.dtype, device=grids.device)
            args = (new_pixels, *args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = new_pixels
            if "grid_thw" in kwargs:
                kwargs["grid_thw"] = new_grid
            else:
                args = (args[0], new_grid, *args[2:])
            return args, kwargs

        def spread(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            plan = pending.pop() if pending else None
            if plan is None or output is None:  # nothing reduced, or the tower raised
                return None

            def spread_rows(merged: torch.Tensor) -> torch.Tensor:
                parts, start = [], 0
                for (t, h, w), (h2, w2) in plan:
                    n = t * h2 * w2
                    src, _ = unpool_index((h, w), (h2, w2))
                    frames = merged[start : start + n].reshape(t, h2 * w2, -1)
                    parts.append(frames[:, src.to(merged.device)].reshape(t * h * w, -1))
                    start += n
                return torch.cat(parts)

            if not hasattr(output, "pooler_output"):
                return spread_rows(output)
            output.pooler_output = spread_rows(output.pooler_output)
            if getattr(output, "deepstack_features", None):  # Qwen3-VL: one row per merged token too
                output.deepstack_features = [spread_rows(f) for f in output.deepstack_features]
            return output

        ctx.register(visual.register_forward_pre_hook(smaller_input, with_kwargs=True))
        ctx.register(visual.register_forward_hook(spread, with_kwargs=True, always_call=True))

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
