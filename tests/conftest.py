"""Shared fixtures: tiny random models of every family (built once per session) and LLM-input probes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import vlmprune
from vlmprune.testing import FAMILIES, make_inputs, tiny_model

torch.set_num_threads(2)

# Sample specs per family: batch 2, different images per sample, a multi-image sample, padding.
SPECS: dict[str, list[list[Any]]] = {
    "llava": [[5, "image", 3], [2, "image", 4, "image", 1]],
    "qwen2_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
    "qwen2_5_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
}
MRoPE = {"qwen2_vl", "qwen2_5_vl"}

_MODELS: dict[str, torch.nn.Module] = {}


def get_model(family: str) -> torch.nn.Module:
    """A session-cached tiny model (tests must leave it unpatched)."""
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=1)
    model = _MODELS[family]
    assert not vlmprune.is_patched(model), "a previous test left the shared model patched"
    return model


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str):
    m = get_model(family)
    yield m
    if vlmprune.is_patched(m):
        vlmprune.unpatch(m)


def inputs_for(model: torch.nn.Module, spec: list[list[Any]] | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    return make_inputs(model, spec if spec is not None else SPECS[model.config.model_type], **kw)


class LLMProbe:
    """Records what the language model actually receives (independent of vlmprune's own counters)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lm = model.model.language_model
        self.handle = None

    def __enter__(self) -> LLMProbe:
        def hook(mod, args, kwargs):
            self.calls.append(
                {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            )

        # registered with prepend=False *after* vlmprune's pre-hook, so it sees the rewritten inputs
        self.handle = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def hook_snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Every module's hooks and instance attributes, to compare before patch / after unpatch."""
    snap = {}
    for name, mod in model.named_modules():
        snap[name] = (
            sorted(mod.__dict__.keys()),
            dict(mod._forward_pre_hooks),
            dict(mod._forward_hooks),
            copy.copy(getattr(mod, "_forward_hooks_with_kwargs", {})),
        )
    return snap
