"""Model adapters, one per ``config.model_type`` (installed as ``vlmprune.patches``).

Adapters are registered lazily; :func:`vlmprune.list_supported_models` lists them without importing any.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..registry import Registry

__all__ = ["ADAPTERS", "register_adapter"]

ADAPTERS: Registry = Registry("model_type", UnsupportedModelError)
ADAPTERS.register("llava", "vlmprune.patches.llava:LlavaAdapter")
ADAPTERS.register("qwen2_vl", "vlmprune.patches.qwen2_vl:Qwen2VLAdapter")
ADAPTERS.register("qwen2_5_vl", "vlmprune.patches.qwen2_5_vl:Qwen25VLAdapter")
ADAPTERS.register("qwen3_vl", "vlmprune.patches.qwen3_vl:Qwen3VLAdapter")
ADAPTERS.register("fast_vlm", "vlmprune.patches.fast_vlm:FastVlmAdapter")


def register_adapter(model_type: str, adapter_cls: str | type, *, replace: bool = False) -> None:
    """Register an adapter class (or ``"module:Class"``) for ``model_type``."""
    ADAPTERS.register(model_type, adapter_cls, replace=replace)
