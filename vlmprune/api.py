"""``patch`` / ``unpatch`` / ``patched`` and friends: resolve config -> adapter -> version gate -> install."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn

from ._versions import check_transformers
from .config import PruneConfig
from .errors import AlreadyPatchedError, ConfigError, NotPatchedError, UnsupportedModelError
from .methods import METHODS

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "last_stats",
    "list_methods",
    "list_supported_models",
    "get_config",
    "make_config",
]


def _adapters():  # noqa: ANN202 - imported lazily to keep `import vlmprune` cheap
    from .patches import ADAPTERS

    return ADAPTERS


def _state_attr() -> str:
    from .patches._base import STATE_ATTR

    return STATE_ATTR


def list_methods() -> list[str]:
    """Names accepted by ``patch(model, method=...)``, sorted."""
    return METHODS.names()


def list_supported_models() -> list[str]:
    """``config.model_type`` values ``patch`` supports, sorted."""
    return _adapters().names()


def make_config(method: str | PruneConfig, **options: Any) -> PruneConfig:
    """Resolve ``method`` (a name plus options, or a config object) into a validated config."""
    if isinstance(method, PruneConfig):
        if options:
            raise ConfigError(
                f"Got a {type(method).__name__} object and extra options {sorted(options)}; set them on the config "
                "object instead (or pass method='name' with options)."
            )
        config = copy.deepcopy(method)  # later edits of the caller's object must not bypass validation
        config.validate()
        return config
    if isinstance(method, str):
        cls = METHODS.get(method)
        return cls.from_kwargs(**options)
    if method is None:
        raise ConfigError(f"No method given. Pass method=<name> (one of {', '.join(list_methods())}) or a config.")
    raise ConfigError(f"method={method!r} is neither a method name nor a config object.")


def _unwrap(model: Any) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def _state(model: Any) -> Any:
    return _unwrap(model).__dict__.get(_state_attr())


def patch(model: Any, method: str | PruneConfig | None = None, *, replace: bool = False, **options: Any) -> Any:
    """Make ``model`` drop vision tokens before its language model, in place, and return it.

    Args:
        model: a loaded transformers VLM (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
            ``FastVlmForConditionalGeneration``; see
            :func:`list_supported_models`), possibly dispatched with a
            ``device_map`` or wrapped by PEFT.
        method: a method name (see :func:`list_methods`) or a config object such as ``UniformConfig(keep=64)``.
        replace: if the model is already patched, replace that patch instead of raising.
        **options: the method's options when ``method`` is a name, e.g. ``keep=0.25``, ``seed=0``.

    Returns:
        The same ``model`` object.

    Raises:
        UnknownMethodError, ConfigError, UnsupportedModelError, UnsupportedVersionError, AlreadyPatchedError.
    """
    config = make_config(method, **options)
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise UnsupportedModelError(
            "vlmprune.patch got a torch.compile'd model: its compiled graph would not see the patch's hooks. Patch "
            "the model first, then compile it: vlmprune.patch(model, ...); model = torch.compile(model)."
        )
    target = _unwrap(model)
    cfg = getattr(target, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if not isinstance(target, nn.Module) or model_type is None:
        raise UnsupportedModelError(
            f"vlmprune.patch needs a transformers model with a config; got {type(model).__name__}. Supported "
            f"model types: {', '.join(list_supported_models())}."
        )
    adapters = _adapters()
    if model_type not in adapters:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(target).__name__}) is not supported. Supported model types: "
            f"{', '.join(list_supported_models())}."
        )
    existing = _state(target)
    if existing is not None and not replace:
        raise AlreadyPatchedError(
            f"This model is already patched with {existing.config.name!r} (keep={existing.config.keep}); call "
            "vlmprune.unpatch(model) first, or pass replace=True."
        )
    check_transformers()
    adapter = adapters.get(model_type)()
    from .patches._base import PatchState

    state = PatchState(target, adapter, config, config.build())  # validates everything before touching the model
    if existing is not None:
        existing.remove()
    state.install()
    return model


def unpatch(model: Any) -> Any:
    """Remove every hook and attribute :func:`patch` added; the model behaves bit-identically to before.

    Raises:
        NotPatchedError: the model is not patched.
    """
    state = _state(model)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by vlmprune; nothing to undo.")
    state.remove()
    return model


def is_patched(model: Any) -> bool:
    """Whether ``model`` is currently patched by vlmprune."""
    return _state(model) is not None


def get_config(model: Any) -> PruneConfig:
    """The config a patched model runs with (a copy)."""
    state = _state(model)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by vlmprune.")
    return copy.deepcopy(state.config)


def last_stats(model: Any) -> dict[str, Any]:
    """What the last prefill with images did: per image ``tokens_in`` / ``tokens_out`` / grid, totals, sequence
    lengths per row before and after, and the selection wall time (``selection_s``). Empty before the first one.
    """
    state = _state(model)
    if state is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by vlmprune; no stats.")
    return copy.deepcopy(state.stats)


@contextlib.contextmanager
def patched(model: Any, method: str | PruneConfig | None = None, **options: Any) -> Iterator[Any]:
    """Context manager: ``with vlmprune.patched(model, method="random", keep=0.25): ...`` (restored in finally)."""
    patch(model, method, **options)
    try:
        yield model
    finally:
        if is_patched(model):
            unpatch(model)
