"""Model adapters, one per ``config.model_type`` (installed as ``vlmprune.patches``).

Adapters are registered lazily; :func:`vlmprune.list_supported_models` lists them without importing any.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..registry import Registry

__all__ = ["ADAPTERS", "register_adapter", "supported_models_table"]

ADAPTERS: Registry = Registry("model_type", UnsupportedModelError)
ADAPTERS.register("llava", "vlmprune.patches.llava:LlavaAdapter")
ADAPTERS.register("llava_next", "vlmprune.patches.llava_next:LlavaNextAdapter")
ADAPTERS.register("llava_onevision", "vlmprune.patches.llava_onevision:LlavaOnevisionAdapter")
ADAPTERS.register("qwen2_vl", "vlmprune.patches.qwen2_vl:Qwen2VLAdapter")
ADAPTERS.register("qwen2_5_vl", "vlmprune.patches.qwen2_5_vl:Qwen25VLAdapter")
ADAPTERS.register("qwen3_vl", "vlmprune.patches.qwen3_vl:Qwen3VLAdapter")
ADAPTERS.register("qwen3_vl_moe", "vlmprune.patches.qwen3_vl_moe:Qwen3VLMoeAdapter")
ADAPTERS.register("fast_vlm", "vlmprune.patches.fast_vlm:FastVlmAdapter")


def register_adapter(model_type: str, adapter_cls: str | type, *, replace: bool = False) -> None:
    """Register an adapter class (or ``"module:Class"``) for ``model_type``."""
    ADAPTERS.register(model_type, adapter_cls, replace=replace)


def _method_variants() -> list[tuple[str, str | None, object]]:
    """``(name, strategy, method object)`` for every registered method with its defaults; a method with several
    ``strategy`` choices (module-level ``STRATEGIES``) once per strategy (else ``strategy`` is ``None``)."""
    import dataclasses
    import sys

    from ..methods import METHODS

    out: list[tuple[str, str | None, object]] = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        strategies = getattr(sys.modules[cls.__module__], "STRATEGIES", None)
        if strategies and "strategy" in {f.name for f in dataclasses.fields(cls)}:
            out += [(name, s, cls(strategy=s).build()) for s in strategies]
        else:
            out.append((name, None, cls().build()))
    return out


def supported_models_table() -> str:
    """The README's supported-models table (Markdown), generated from the registered adapters and methods: a
    method is listed as unavailable on a family whose adapter cannot provide the vision-tower signal it needs
    (``patch()`` refuses it there with the reason). ``python -m vlmprune.patches`` prints it."""
    variants = _method_variants()
    rows = [
        "| `config.model_type` | class | images | multi-image | video | positions of kept tokens | not available |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        marks = ["✔" if kind in cls.inputs else "–" for kind in ("images", "multi-image", "video")]
        refused: dict[str, list[str]] = {}
        for method_name, strategy, method in variants:
            if not set(method.requires) <= set(cls.provides):
                refused.setdefault(method_name, []).extend([f"`{strategy}`"] if strategy else [])
        cell = ", ".join(f"{m} ({', '.join(s)})" if s else m for m, s in refused.items()) or "–"
        label = f"`{name}` ({cls.label})" if cls.label else f"`{name}`"
        rows.append(f"| {label} | `{cls.hf_class}` | {' | '.join(marks)} | {cls.positions} | {cell} |")
    return "\n".join(rows) + "\n"
