"""Adapter for Qwen3-VL-MoE (``model_type="qwen3_vl_moe"``, ``Qwen3VLMoeForConditionalGeneration``).

The same vision tower, DeepStack injection, M-RoPE and LLM-entry cut as Qwen3-VL (see
:mod:`vlmprune.patches.qwen3_vl`); only the LLM's feed-forward blocks are sparse mixtures of experts, which the cut
never touches. Pruned tokens are simply never routed.
"""

from __future__ import annotations

from .qwen3_vl import Qwen3VLAdapter

__all__ = ["Qwen3VLMoeAdapter"]


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_types = ("qwen3_vl_moe",)
    label = "Qwen3-VL-MoE"
    hf_class = "Qwen3VLMoeForConditionalGeneration"
