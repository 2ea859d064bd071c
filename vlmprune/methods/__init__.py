"""Token-selection methods: one module per method (config dataclass + pure tensor functions).

Methods are registered lazily by name; :func:`vlmprune.list_methods` lists them without importing any.
"""

from __future__ import annotations

from ..errors import UnknownMethodError
from ..registry import Registry

__all__ = ["METHODS", "register_method"]

METHODS: Registry = Registry("method", UnknownMethodError)
METHODS.register("random", "vlmprune.methods.random:RandomConfig")
METHODS.register("uniform", "vlmprune.methods.uniform:UniformConfig")
METHODS.register("pool", "vlmprune.methods.pool:PoolConfig")
METHODS.register("hiprune", "vlmprune.methods.hiprune:HiPruneConfig")
METHODS.register("visionzip", "vlmprune.methods.visionzip:VisionZipConfig")
METHODS.register("fastv", "vlmprune.methods.fastv:FastVConfig")
METHODS.register("vqtoken", "vlmprune.methods.vqtoken:VQTokenConfig")
METHODS.register("damro", "vlmprune.methods.damro:DamroConfig")
METHODS.register("fastvlm", "vlmprune.methods.fastvlm:FastVLMConfig")


def register_method(name: str, config_cls: str | type, *, replace: bool = False) -> None:
    """Register a method's config class (or ``"module:Class"``) under ``name`` (third-party methods)."""
    METHODS.register(name, config_cls, replace=replace)
