"""Adapter for Qwen2.5-VL (``model_type="qwen2_5_vl"``): the Qwen2-VL cut and grids apply unchanged (its
window attention lives inside the vision tower, which runs unpruned)."""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen25VLAdapter"]


class Qwen25VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen2_5_vl",)
    label = "Qwen2.5-VL"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
