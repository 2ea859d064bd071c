"""Adapter for Qwen3-VL (``model_type="qwen3_vl"``): the Qwen2-VL cut, plus DeepStack.

Qwen3-VL adds, in its first LLM layers, features from intermediate ViT blocks ("DeepStack") to the hidden states
at the vision positions: the language model receives ``visual_pos_masks`` ``(B, L)`` and, per DeepStack layer, one
row per vision token (in the order of ``hidden_states[visual_pos_masks]``). When tokens are pruned both are
gathered with the same index as the sequence, so every kept token keeps its own DeepStack rows; a merged token
(pool, VisionZip, VQToken) carries the rows of the token whose position it takes (its representative). Videos are
laid out one frame per ``<timestamp> <vision_start> frame <vision_end>`` group; a video is still one item (its
``(t, h/2, w/2)`` grid) whose placeholders span those groups. The ViT has no windowed blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen3VLAdapter"]


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen3_vl",)
    label = "Qwen3-VL"
    hf_class = "Qwen3VLForConditionalGeneration"
    positions = "original 3-D M-RoPE; DeepStack rows follow their tokens"

    def gather_extra(self, kwargs: dict[str, Any], idx: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Prune ``visual_pos_masks`` / ``deepstack_visual_embeds`` like the sequence (``idx`` ``(B, L')`` gathers
        the original positions, ``slot_valid`` marks real slots)."""
        mask = kwargs.get("visual_pos_masks")
        stacks = kwargs.get("deepstack_visual_embeds")
        if mask is None:
            return
        mask = mask.to(idx.device).bool()
        # row of every vision position in the DeepStack tensors (row-major over the batch, as boolean indexing)
        rank = (mask.reshape(-1).long().cumsum(0) - 1).view_as(mask)
        new_mask = mask.gather(1, idx) & slot_valid
        kwargs["visual_pos_masks"] = new_mask
        if stacks is not None:
            rows = rank.gather(1, idx)[new_mask]
            kwargs["deepstack_visual_embeds"] = [s[rows.to(s.device)] for s in stacks]
