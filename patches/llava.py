"""Adapter for LLaVA-1.5 (``model_type="llava"``, ``LlavaForConditionalGeneration``).

Every image gives the same number of tokens: the CLIP patch grid (24x24 = 576 for CLIP-L/336), plus the CLS
token when ``vision_feature_select_strategy="full"`` (then CLS is always kept and the budget applies to the
grid). LLaVA's LLM uses 1-D RoPE: ``position_mode="contiguous"`` (default) renumbers the kept tokens, which
equals feeding the unpatched model only the kept tokens; ``"original"`` keeps the original positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import Adapter, VisionItem, _Call, content_key
from ._probes import ClipAttentionProbe, ClipClsProbe, ClipLayerCapture

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    label = "LLaVA-1.5"
    hf_class = "LlavaForConditionalGeneration"
    mrope = False
    provides = frozenset({"vit_attention", "vit_cls_attention", "encoder_resize", "encoder_pool"})

    @staticmethod
    def _blocks(model: nn.Module) -> nn.ModuleList:
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel lost .vision_model in 5.x

    def vit_depth(self, model: nn.Module) -> int:
        return len(self._blocks(model))

    def feature_layer(self, model: nn.Module) -> int:
        layer = model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        # hidden_states[i] is the output of block i - 1 (index 0 = embeddings)
        return layer - 1 if layer >= 0 else layer

    @staticmethod
    def first_read_block(config: Any) -> int:
        """The earliest CLIP block whose output LLaVA reads (``config.vision_feature_layer`` may list several)."""
        layers = config.vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        depth = config.vision_config.num_hidden_layers
        return min((layer - 1 if layer >= 0 else layer) % depth for layer in layers)

    @classmethod
    def encoder_pool_layer(cls, config: Any, layer: int | None) -> int:
        """The block after which ``fastvlm``'s ``encoder_pool`` pools: ``layer``, or by default half way to the
        first block LLaVA reads (also what :func:`vlmprune.stats.vision_flops` counts)."""
        return layer if layer is not None else cls.first_read_block(config) // 2

    def layer_capture(self, model: nn.Module, layer: int) -> ClipLayerCapture:
        """CLS-row attention, head-mean keys and output hidden states of one block, per image."""
        vc = model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return ClipLayerCapture(model, layer, side * side)

    def cls_probe(self, model: nn.Module, layer: int, mode: str) -> ClipClsProbe:
        """DAMRO's CLS-to-patch attention of one block, per image."""
        vc = model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return ClipClsProbe(model, layer, side * side, mode)

    def project(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vision hidden states ``(..., D_vision)`` -> LLM tokens ``(..., D_text)`` (LLaVA's projector)."""
        return model.model.multi_modal_projector(hidden)

    def attention_probe(self, model: nn.Module, layers: list[int]) -> ClipAttentionProbe:
        vc = model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return ClipAttentionProbe(model, layers, side * side)

    def install_encoder_reduction(self, ctx: Any, method: Any) -> None:
        """``fastvlm``'s encoder side: a smaller CLIP input (``resolution``: resized pixels, interpolated position
        embeddings) or a pooled patch grid after one block (``encoder_pool``: the later blocks run on fewer
        tokens); either way the projector's output is spread back over the full grid (nearest cell), so LLaVA's
        placeholders still match and each reduced token sits at its cell's centre slot, the one
        ``method.select`` keeps. Nothing is installed when the budget keeps the whole grid."""
        from vlmprune.errors import ConfigError
        from vlmprune.methods.fastvlm import pool_patch_tokens, resize_frames, unpool_index

        model = ctx.model
        vc = model.config.vision_config
        patch = int(vc.patch_size)
        side = int(vc.image_size) // patch
        h2, w2 = method.reduced_grid(side, side)
        if (h2, w2) == (side, side):
            return
        src, _ = unpool_index((side, side), (h2, w2))
        prefix = 1 if model.config.vision_feature_select_strategy == "full" else 0
        tower = model.model.vision_tower
        if method.config.strategy == "resolution":

            def smaller_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                method.reduced_now = True
                if args:
                    args = (resize_frames(args[0], (h2 * patch, w2 * patch)), *args[1:])
                else:
                    kwargs["pixel_values"] = resize_frames(kwargs["pixel_values"], (h2 * patch, w2 * patch))
                kwargs["interpolate_pos_encoding"] = True
                return args, kwargs

            ctx.register(tower.register_forward_pre_hook(smaller_input, with_kwargs=True))
        else:
            blocks = self._blocks(model)
            read = self.first_read_block(model.config)
            layer = self.encoder_pool_layer(model.config, method.config.layer)
            if layer >= read:
                choice = f"pick a layer in [0, {read - 1}]" if read else "this tower is too shallow to pool inside"
                raise ConfigError(
                    f"layer={layer}: encoder_pool must pool before block {read}, whose output LLaVA reads "
                    f"(vision_feature_layer={model.config.vision_feature_layer}); {choice}."
                )

            def pool_after(module: nn.Module, args: tuple, output: Any) -> Any:
                method.reduced_now = True
                hidden = output[0] if isinstance(output, tuple) else output
                pooled = pool_patch_tokens(hidden, (side, side), (h2, w2), prefix=1)  # CLS is first in the tower
                return (pooled, *output[1:]) if isinstance(output, tuple) else pooled

            ctx.register(blocks[layer].register_forward_hook(pool_after))

        def spread(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if output.shape[-2] != prefix + h2 * w2:
                return None
            idx = src.to(output.device)
            return torch.cat([output[..., :prefix, :], output[..., prefix:, :][..., idx, :]], dim=-2)

        # after the projector, so it too runs on the reduced tokens only
        ctx.register(model.model.multi_modal_projector.register_forward_hook(spread))

    def _grid(self, n: int, model: nn.Module) -> tuple[tuple[int, int, int], int]:
        vc = model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        if n == side * side:
            return (1, side, side), 0
        if n == side * side + 1:  # vision_feature_select_strategy="full": CLS first, always kept
            return (1, side, side), 1
        return (1, 1, n), 0  # unusual geometry: a 1-D sequence

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        pixels = inputs.get("pixel_values")
        items = []
        for i, f in enumerate(features):
            grid, prefix = self._grid(int(f.shape[0]), model)
            key = content_key(pixels[i]) if pixels is not None and len(pixels) == len(features) else content_key(f)
            items.append(VisionItem(kind, int(f.shape[0]), grid, key, prefix))
        return items

    def fallback_item(self, kind: str, feature: torch.Tensor, call: _Call, index: int, model: nn.Module) -> VisionItem:
        grid, prefix = self._grid(int(feature.shape[0]), model)
        return VisionItem(kind, int(feature.shape[0]), grid, content_key(feature), prefix)
