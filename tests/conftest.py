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
    "qwen3_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
    "fast_vlm": [[5, "image", 3], [2, "image", 4, "image", 1]],
}
MRoPE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}

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


def supports(model: torch.nn.Module, method: str) -> bool:
    """Whether ``model``'s adapter provides the vision-tower signals ``method`` needs (FastVLM has no ViT
    attention for HiPrune / VisionZip; tests/test_api.py checks the refusal)."""
    from vlmprune.patches import ADAPTERS

    needs = vlmprune.make_config(method).build().requires
    return set(needs) <= set(ADAPTERS.get(model.config.model_type).provides)


def require(model: torch.nn.Module, method: str) -> None:
    """Skip a test of ``method`` on a model whose adapter cannot provide what it needs (refused, not run)."""
    if not supports(model, method):
        pytest.skip(f"{method} needs a ViT signal the {model.config.model_type} adapter does not provide")


def inputs_for(model: torch.nn.Module, spec: list[list[Any]] | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    return make_inputs(model, spec if spec is not None else SPECS[model.config.model_type], **kw)


class LLMProbe:
    """Records what a module actually receives (default: the language model), independent of vlmprune's own
    counters. ``at_cut=True`` probes where the pruned sequence enters on a patched model: the LLM input, or
    decoder layer K for methods that prune inside the LLM (FastV)."""

    def __init__(self, model: torch.nn.Module, at_cut: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.model = model
        self.at_cut = at_cut
        self.handle = None

    def __enter__(self) -> LLMProbe:
        def hook(mod, args, kwargs):
            rec = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            if args and isinstance(args[0], torch.Tensor):
                rec["hidden_states"] = args[0].detach().clone()
            self.calls.append(rec)

        module = cut_module(self.model) if self.at_cut else self.model.model.language_model
        # registered after vlmprune's pre-hooks, so it sees the rewritten inputs
        self.handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def cut_module(model: torch.nn.Module) -> torch.nn.Module:
    lm = model.model.language_model
    if vlmprune.is_patched(model) and vlmprune.get_config(model).name == "fastv":
        return lm.layers[vlmprune.get_config(model).layer]
    return lm


def sequence(call: dict[str, Any]) -> torch.Tensor:
    """The token sequence a probed call received ``(B, L, D)``."""
    return call["inputs_embeds"] if call.get("inputs_embeds") is not None else call["hidden_states"]


def valid_slots(call: dict[str, Any]) -> torch.Tensor:
    """``(B, L)`` bool: which positions of a probed call are real tokens (2-D mask, or the last query row of a
    4-D mask: bool = allowed, float = 0 where allowed; no mask = all)."""
    seq = sequence(call)
    mask = call.get("attention_mask")
    if mask is None:
        return torch.ones(seq.shape[:2], dtype=torch.bool)
    if mask.ndim == 2:
        return mask.bool()
    row = mask[:, 0, -1, :]
    return row if row.dtype == torch.bool else row == 0


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
