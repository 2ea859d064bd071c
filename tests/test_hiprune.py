"""HiPrune: the selection against a slow step-by-step reference of the official algorithm, the recomputed
attention against eager attention, and the patched model's choices against scores computed independently."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import get_model, inputs_for

import vlmprune
from vlmprune.methods.hiprune import HiPruneConfig, HiPruneMethod, hiprune_select
from vlmprune.testing import tiny_model


def reference_select(obj, deep, k, width, alpha):
    """The official algorithm, step by step on Python lists (flat neighbours, clamping, the "-1" mask)."""
    n = len(obj)
    n_anchor = round(k * alpha / 5)
    order = sorted(range(n), key=lambda j: (-obj[j], j))
    anchors = order[:n_anchor]
    chosen = []
    for a in anchors:
        for d in (0, -1, 1, -width, width):
            j = min(max(a + d, 0), n - 1)
            if j not in chosen:
                chosen.append(j)
    masked = [deep[j] - 1 if j in chosen else deep[j] for j in range(n)]
    n_reg = k - len(chosen)
    registers = sorted(range(n), key=lambda j: (-masked[j], j))[:n_reg]
    return sorted(set(chosen) | set(registers)), len(chosen) + len(registers)


def reference_grid_buffer(anchors, h, w):
    out = set()
    for a in anchors:
        r, c = divmod(a, w)
        for dr, dc in ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0)):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                out.add((r + dr) * w + c + dc)
    return out


@pytest.mark.parametrize("grid", [(1, 24, 24), (1, 6, 9), (1, 5, 5), (1, 12, 8)])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_selection_matches_reference(grid, alpha):
    n = grid[1] * grid[2]
    gen = torch.Generator().manual_seed(n + int(alpha * 10))
    for trial in range(6):
        # attention-like scores: softmax columns averaged over queries lie in (0, 1)
        obj = torch.softmax(torch.randn(n, generator=gen) * 3, 0)
        deep = torch.softmax(torch.randn(n, generator=gen) * 3, 0)
        if trial == 0:  # anchors at the grid's corners and edges exercise wrap-around and clamping
            obj[0] = obj[n - 1] = obj[grid[2] - 1] = obj[grid[2]] = 1.0
        for k in sorted({1, 5, 9, n // 9 or 1, n // 4 or 1, n // 3, n - 1, n}):
            got = hiprune_select(obj, deep, k, grid, alpha)
            want, count = reference_select(obj.tolist(), deep.tolist(), k, grid[2], alpha)
            if count == k:  # the official algorithm returns exactly k here: we must match it token for token
                assert got.tolist() == want, (k, alpha)
            assert got.numel() == k and (got[1:] > got[:-1]).all()


def test_exactly_k_where_the_official_minus_one_fails():
    """Qwen's official scores sum over queries and can exceed 1: the "-1" then fails to exclude a chosen token."""
    n, w, k = 16, 4, 6
    obj = torch.zeros(n)
    obj[5] = 1.0  # one anchor (alpha=1 -> round(6/5) = 1) with its cross 1, 4, 6, 9
    deep = torch.full((n,), 0.1)
    deep[5] = 5.0  # a sink: 5 - 1 = 4 still beats everything
    want, count = reference_select(obj.tolist(), deep.tolist(), k, w, 1.0)
    assert count == k and len(want) < k  # the official code returns a duplicate, i.e. fewer tokens
    got = hiprune_select(obj, deep, k, (1, 4, 4), 1.0)
    assert got.numel() == k and set(want) <= set(got.tolist())


def test_grid_buffer_is_the_2d_cross():
    h, w = 5, 7
    obj = torch.zeros(h * w)
    for a in (0, 6, 7, 34, 17):
        obj[a] = 1.0 + a
    got = hiprune_select(obj, torch.zeros(h * w), 25, (1, h, w), alpha=1.0, buffer="grid")
    cross = reference_grid_buffer([34, 17, 7, 6, 0], h, w)
    assert cross <= set(got.tolist())
    flat = hiprune_select(obj, torch.zeros(h * w), 25, (1, h, w), alpha=1.0, buffer="flat")
    assert 5 in flat.tolist() and 6 in flat.tolist()  # flat: 6 - 1 = 5 and 7 - 1 = 6 wrap across rows


def test_default_layers_follow_the_official_code():
    m = HiPruneMethod(HiPruneConfig())
    assert m.resolve_layers("llava", 24, -2) == (8, 22)  # object layer 9 (1-based), deep = feature layer -2
    assert m.resolve_layers("qwen2_5_vl", 32, -1) == (15, 31)
    assert m.resolve_layers("qwen2_vl", 32, -1) == (15, 31)
    assert m.resolve_layers("llava", 6, -2) == (1, 4)  # other depths: scaled
    with pytest.raises(vlmprune.ConfigError, match="do not exist"):
        HiPruneMethod(HiPruneConfig(object_layer=30)).resolve_layers("llava", 24, -2)


@pytest.mark.parametrize(
    "bad", [dict(alpha=1.5), dict(alpha=True), dict(object_layer=0), dict(buffer="square"), dict(deep_layer=1.5)]
)
def test_config_validation(bad):
    with pytest.raises(vlmprune.ConfigError):
        HiPruneConfig(**bad)


# ---- recomputed attention vs eager, and end-to-end choices ---------------------------------------------------


def _eager_received_clip(family, inputs, layers):
    eager = tiny_model(family, seed=1, attn_implementation="eager")
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    return {i: att[i].float().mean(1).mean(1)[:, 1:] for i in layers}  # (n_img, N)


def _eager_received_qwen(family, inputs, layer):
    """Per image: attention received per LLM token, from eager attention weights of one full-attention block."""
    from vlmprune.patches._probes import QwenAttentionProbe

    eager = tiny_model(family, seed=1, attn_implementation="eager")
    visual = eager.model.visual
    mod = sys.modules[type(visual.blocks[0].attn).__module__]
    chunks = []
    original = mod.eager_attention_forward

    def spy(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if module is visual.blocks[layer].attn:
            chunks.append(out[1][0].float())  # (H, n, n): one image (a full-attention block splits by image)
        return out

    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            eager.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        mod.eager_attention_forward = original
    m2 = visual.spatial_merge_size**2
    per_patch = torch.cat([c.mean(0).mean(0) for c in chunks])  # in the tower's (maybe window-permuted) order
    if hasattr(visual, "fullatt_block_indexes"):
        undo = torch.argsort(QwenAttentionProbe._window_index(visual, inputs["image_grid_thw"]))
        per_patch = per_patch.view(-1, m2)[undo].reshape(-1)
    sizes = (inputs["image_grid_thw"].prod(-1)).tolist()
    return [p.view(-1, m2).mean(-1) for p in per_patch.split(sizes)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_probe_equals_eager_attention(family):
    model = get_model(family)
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="hiprune", keep=0.25, object_layer=2, deep_layer=1):
        with torch.no_grad():
            model(**inputs)
        got = model._vlmprune_state.method.probe.scores[1]
        stats = vlmprune.last_stats(model)
    ref = _eager_received_qwen(family, inputs, 1)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    for r, info in zip(ref, stats["images"], strict=True):
        grid = tuple(info["grid"])
        want = hiprune_select(r, r, info["tokens_out"], grid)
        assert info["kept_indices"] == want.tolist()


def test_clip_probe_equals_eager_attention():
    model = get_model("llava")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="hiprune", keep=4, object_layer=1, deep_layer=-2):
        state = model._vlmprune_state
        with torch.no_grad():
            model(**inputs)
        layers = state.method.layers
        got = torch.stack(state.method.probe.scores[0])
        stats = vlmprune.last_stats(model)
    assert layers == (0, 0)  # a 2-block tower: object layer 1, deep layer -2
    ref = _eager_received_clip("llava", inputs, [0])[0]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # the patched model kept exactly what the official selection picks on the eager scores
    for img, info in enumerate(stats["images"]):
        want = hiprune_select(ref[img], ref[img], 4, (1, 4, 4))
        assert info["kept_indices"] == want.tolist()


def test_hiprune_layers_are_read_only_where_needed():
    """Only the two chosen attention modules (and their qkv projections) get hooks; everything keeps SDPA."""
    model = get_model("qwen2_5_vl")
    before = {n for n, m in model.named_modules() if m._forward_pre_hooks}
    with vlmprune.patched(model, method="hiprune", keep=0.25):
        hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks} - before
        impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert hooked == {
        "",
        "model",
        "model.language_model",
        "model.visual",
        "model.visual.blocks.0.attn",
        "model.visual.blocks.1.attn",
    }
    assert impls == {"sdpa"}
