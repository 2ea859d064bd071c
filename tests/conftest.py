"""Shared fixtures: tiny random models of every family (built once per session) and LLM-input probes."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import vlmprune
from vlmprune.testing import FAMILIES, make_inputs, tiny_model

torch.set_num_threads(2)

# Sample specs per family: batch 2, different images per sample, a multi-image sample, padding.
SPECS: dict[str, list[list[Any]]] = {
    "llava": [[5, "image", 3], [2, "image", 4, "image", 1]],
    # the default 48 x 80 image: base view + 1 x 2 crops; 30 x 100: unpadded to 2 of 4 rows; 112 x 112: 2 x 2 crops
    "llava_next": [[5, "image", 3], [2, ("image", 30, 100), 4, ("image", 112, 112), 1]],
    # 112 x 112 alone: 2 x 2 crops interpolated to 5 x 5 (anyres_max_2); two images in a sample: base views only
    "llava_onevision": [[5, ("image", 112, 112), 3], [2, ("image", 30, 100), 4, "image", 1]],
    "qwen2_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
    "qwen2_5_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
    "qwen3_vl": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],
    "qwen3_vl_moe": [[5, "image", 3], [2, ("image", 8, 12), 4, ("image", 4, 8), 1]],  # not in FAMILIES: test_qwen3_vl
    "fast_vlm": [[5, "image", 3], [2, "image", 4, "image", 1]],
}
MRoPE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}

_MODELS: dict[str, torch.nn.Module] = {}


ANYRES = {"llava_next", "llava_onevision"}


def beam_spec(model: torch.nn.Module) -> list[list[Any]]:
    """Samples for beam search / num_return_sequences: the family's specs, but one image per sample for the anyres
    families. transformers < ~5.20 (no ``mm_encoder_outputs``) repeats per-image tensors (``pixel_values``,
    ``image_sizes``) once per beam, which hands a multi-image sample's beams the wrong images even unpatched; with
    LLaVA-NeXT's image-dependent token counts the patch then refuses the call (PlaceholderMismatchError)."""
    if model.config.model_type in ANYRES:
        return [[5, "image", 3], [2, ("image", 30, 100), 4]]
    return SPECS[model.config.model_type]


def expands_images_per_beam(model: torch.nn.Module) -> bool:
    """Whether this transformers release has the per-image beam expansion described in :func:`beam_spec`."""
    import inspect

    return "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters


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


def fixed_counts(model: torch.nn.Module, inputs: dict[str, Any], per_row: list[list[int]]) -> list[list[int]]:
    """Per row, per image (``per_row``: the images' placeholder counts, in order): the tokens every method keeps
    outside the budget, i.e. LLaVA-NeXT's / OneVision's image-newline tokens, found as the rows of the unpatched LLM
    input that equal the model's ``image_newline`` (0 for other families). Call on an unpatched model."""
    if model.config.model_type not in ANYRES:
        return [[0] * len(row) for row in per_row]
    assert not vlmprune.is_patched(model)
    with LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    emb, newline = probe.calls[0]["inputs_embeds"], model.model.image_newline
    out = []
    for b, row in enumerate(per_row):
        pos = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(-1)
        is_nl = (emb[b, pos] == newline).all(-1).long()
        out.append([int(c.sum()) for c in is_nl.split(row)])
    return out


def deep_clip_model(family: str = "llava", patch: int = 14, **over: Any) -> torch.nn.Module:
    """A tiny LLaVA (or LLaVA-NeXT) whose CLIP tower has 4 blocks (LLaVA reads block 2's output), so a block can be
    pooled; ``patch=7`` gives 8 x 8 patches per 56 px input instead of 4 x 4; ``over``: more top-level config."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=56,
        patch_size=patch, projection_dim=32,
    )  # fmt: skip
    return tiny_model(family, seed=3, vision_config=vision, **over)


def pool_4x4_by_hand(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook for a CLIP block: its ``(B, 1 + 4*4, D)`` output pooled to ``(B, 1 + 2*2, D)`` by explicit
    2 x 2 means in raster order, CLS kept (a reference for fastvlm's ``encoder_pool``)."""
    hidden = output[0] if isinstance(output, tuple) else output
    cells = []
    for i in range(2):
        for j in range(2):
            idx = [1 + (2 * i + di) * 4 + (2 * j + dj) for di in range(2) for dj in range(2)]
            cells.append(hidden[:, idx].mean(1))
    pooled = torch.cat([hidden[:, :1], torch.stack(cells, 1)], 1)
    return (pooled, *output[1:]) if isinstance(output, tuple) else pooled


def reference_layout(model: torch.nn.Module, inputs: dict[str, Any], img: int) -> tuple[torch.Tensor, int]:
    """LLaVA-NeXT, from the model's own ``pack_image_features`` (not vlmprune's layout code): per token of image
    ``img``, its ``crop * s*s + patch`` index (crop 0 = the base view), -1 at newlines; and the number of crops."""
    import sys

    vlm = model.model
    mod = sys.modules[type(vlm).__module__]
    cfg, vc = model.config, model.config.vision_config
    size = inputs["image_sizes"][img]
    n_crops = mod.image_size_to_num_patches(size, cfg.image_grid_pinpoints, vc.image_size)
    cells = (vc.image_size // vc.patch_size) ** 2
    index = torch.arange(n_crops * cells, dtype=torch.float64).view(n_crops, cells, 1)
    packed, _ = vlm.pack_image_features([index], size[None], "default", image_newline=torch.tensor([-1.0]).double())
    return packed[0][:, 0].long(), n_crops


def fastvlm_anyres_kept(model: torch.nn.Module, inputs: dict[str, Any], img: int, keep: float) -> torch.Tensor:
    """LLaVA-NeXT + ``fastvlm``'s encoder strategies, worked out from the model's packing: the item-relative tokens
    of image ``img`` that reach the LLM. Every crop's ``s x s`` grid shrinks to the reduced grid of one CLIP input
    (cell of patch ``(r, c)``: ``(r * h2 // s, c * w2 // s)``); per part (base view, crops), one token per reduced
    cell that survives the unpadding (its centre ``((n-1)//2)`` of each run, else its first token); a part whose
    share of the image's budget is smaller keeps its best-covered cells (equals at the cut: evenly spaced); newlines
    always."""
    from vlmprune.patches._base import split_budget

    from vlmprune.config import resolve_budget
    from vlmprune.methods.fastvlm import target_side

    index, _ = reference_layout(model, inputs, img)
    vc = model.config.vision_config
    s = vc.image_size // vc.patch_size
    h2, w2 = target_side(s, s, resolve_budget(keep, s * s))
    crop, patch = index // (s * s), index % (s * s)
    r, c = patch // s, patch % s
    cell = crop * (h2 * w2) + (r * h2 // s) * w2 + (c * w2 // s)

    def centre(i: torch.Tensor, n: int, n2: int) -> torch.Tensor:  # is cell i the middle of its run?
        run = [j for j in range(n) if j * n2 // n == i * n2 // n]
        return torch.tensor(i == run[(len(run) - 1) // 2])

    is_centre = torch.stack([centre(int(a), s, h2) & centre(int(b), s, w2) for a, b in zip(r, c, strict=True)])
    newline = index < 0
    parts = [(~newline & (crop == 0)).nonzero().squeeze(-1), (~newline & (crop > 0)).nonzero().squeeze(-1)]
    sizes = [int(p.numel()) for p in parts]
    shares = split_budget(resolve_budget(keep, sum(sizes)), sizes)
    kept = [newline.nonzero().squeeze(-1)]
    for rows, share in zip(parts, shares, strict=True):
        reps = []
        for g in cell[rows].unique().tolist():
            members = rows[cell[rows] == g]
            mid = members[is_centre[members]]
            reps.append((-int(members.numel()), int(mid[0] if mid.numel() else members[0])))
        reps.sort()  # most covered first, token order among equals
        if share >= len(reps):
            chosen = [t for _, t in reps]
        elif share == 0:
            chosen = []
        else:  # strictly better covered than the share-th cell, then the tie at the cut evenly spaced
            cut = reps[share - 1][0]
            chosen = [t for cov, t in reps if cov < cut]
            ties = [t for cov, t in reps if cov == cut]
            m = share - len(chosen)
            chosen += [ties[int((i + 0.5) * len(ties) / m)] for i in range(m)]
        kept.append(torch.tensor(sorted(chosen), dtype=torch.long))
    return torch.cat(kept).sort().values


@contextlib.contextmanager
def tower_batches(model: torch.nn.Module) -> Iterator[list[int]]:
    """Within the block, the batch size of every call of ``model.model.vision_tower`` (what it actually encoded:
    crops, base views, frames), appended to the yielded list."""
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    handle = model.model.vision_tower.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


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
