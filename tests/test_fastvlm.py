"""``fastvlm`` (FastVLM-style compression, training-free): the pure functions against slow references, and the
strategies end to end — the encoder really runs on fewer tokens, and Qwen's LLM sees exactly what the unpatched
model sees when prompted with the smaller image (embeddings, M-RoPE positions, decoding)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LLMProbe, deep_clip_model, pool_4x4_by_hand, valid_slots

import vlmprune
from vlmprune.errors import ConfigError, UnsupportedModelError
from vlmprune.methods.fastvlm import (
    best_covered,
    cell_map,
    patchify_qwen,
    pool_patch_tokens,
    resize_frames,
    target_side,
    unpatchify_qwen,
    unpool_index,
)
from vlmprune.testing import make_inputs, tiny_model

STRATEGIES = {"llava": ["resolution", "encoder_pool", "pool"], "qwen2_vl": ["resolution", "pool"]}
STRATEGIES["qwen2_5_vl"] = STRATEGIES["qwen3_vl"] = STRATEGIES["qwen2_vl"]


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("n,k", [(24, 12), (24, 8), (7, 3), (5, 5), (4, 1)])
def test_cell_map_partitions_an_axis(n, k):
    assign, centre = cell_map(n, k)
    assert assign.tolist() == sorted(assign.tolist()) and set(assign.tolist()) == set(range(k))
    for j in range(k):
        run = (assign == j).nonzero().squeeze(-1).tolist()
        assert run == list(range(run[0], run[-1] + 1))  # contiguous
        assert centre[j] == run[(len(run) - 1) // 2]


def test_unpool_index_places_each_token_at_its_cell_centre():
    src, reps = unpool_index((6, 9), (3, 4))
    assert src.shape == (54,) and reps.shape == (12,)
    assert bool((reps[1:] > reps[:-1]).all())
    assert src[reps].tolist() == list(range(12))  # the centre slot carries its own reduced token


@pytest.mark.parametrize("h,w", [(24, 24), (7, 11), (3, 2), (48, 30)])
def test_target_side_is_the_largest_grid_within_the_budget(h, w):
    for budget in [1, 2, 3, 5, 16, 64, 144, h * w - 1, h * w, h * w + 5]:
        h2, w2 = target_side(h, w, budget)
        assert 1 <= h2 <= h and 1 <= w2 <= w and h2 * w2 <= max(1, budget)
    assert target_side(24, 24, 144) == (12, 12) and target_side(24, 24, 64) == (8, 8)
    assert target_side(h, w, h * w) == (h, w)


def test_qwen_patch_layout_matches_a_slow_reference():
    """Rows in the image processor's order: merge units of m x m patches, features (channel, time, py, px)."""
    t, T, C, p, m, h, w = 2, 2, 3, 2, 2, 4, 6
    frames = torch.randn(t * T, C, h * p, w * p)
    rows = patchify_qwen(frames, T, p, m)
    ref = []
    for ti in range(t):
        for bh in range(h // m):
            for bw in range(w // m):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        patch = frames[ti * T : (ti + 1) * T, :, y : y + p, x : x + p]  # (T, C, p, p)
                        ref.append(patch.permute(1, 0, 2, 3).reshape(-1))
    assert torch.equal(rows, torch.stack(ref))
    assert torch.equal(unpatchify_qwen(rows, (t, h, w), C, T, p, m), frames)


def test_pool_patch_tokens_matches_hand_averages():
    hidden = torch.randn(2, 1 + 16, 5)
    out = pool_patch_tokens(hidden, (4, 4), (2, 2), prefix=1)
    assert torch.equal(out[:, 0], hidden[:, 0])  # CLS untouched
    grid = hidden[:, 1:].reshape(2, 4, 4, 5)
    for i in range(2):
        for j in range(2):
            want = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 4, 5).mean(1)
            torch.testing.assert_close(out[:, 1 + i * 2 + j], want)


@pytest.mark.parametrize("seed", range(20))
def test_best_covered_keeps_the_better_and_spreads_the_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    cover = torch.randint(1, 4, (n,), generator=g)
    for k in range(n + 1):
        got = best_covered(cover, k)
        assert got.tolist() == sorted(set(got.tolist())) and got.numel() == k
        if 0 < k < n:
            cut = cover.sort(descending=True).values[k - 1]
            assert set((cover > cut).nonzero().squeeze(-1).tolist()) <= set(got.tolist())
            assert bool((cover[got] >= cut).all())
            ties = (cover == cut).nonzero().squeeze(-1).tolist()
            picked = [i for i in got.tolist() if cover[i] == cut]
            # spread: every run of ties between two picks (and before the first / after the last) is about as long
            # as ceil(len(ties) / len(picked)): nothing like "keep the first m, drop the tail"
            slots = [ties.index(i) for i in picked]
            gaps = [b - a - 1 for a, b in zip([-1, *slots], [*slots, len(ties)], strict=True)]
            assert max(gaps) <= -(-(len(ties) - len(picked)) // len(picked)) + 1, (cover.tolist(), k, got.tolist())


def test_best_covered_drops_evenly_on_an_uncut_grid():
    # 320 equally covered cells, 317 places: the three dropped cells are spread, not the last three
    got = best_covered(torch.ones(320, dtype=torch.long), 317)
    dropped = sorted(set(range(320)) - set(got.tolist()))
    assert (
        len(dropped) == 3
        and dropped[-1] < 319
        and dropped[0] > 0
        and min(b - a for a, b in zip(dropped, dropped[1:], strict=False)) > 80
    )


def test_config_validation():
    with pytest.raises(ConfigError, match="strategy"):
        vlmprune.make_config("fastvlm", strategy="crop")
    with pytest.raises(ConfigError, match="encoder_pool"):
        vlmprune.make_config("fastvlm", strategy="resolution", layer=3)
    with pytest.raises(ConfigError, match="layer"):
        vlmprune.make_config("fastvlm", strategy="encoder_pool", layer=-1)
    cfg = vlmprune.FastVLMConfig(keep=0.25, strategy="encoder_pool", layer=5)
    assert cfg.to_dict() == {"method": "fastvlm", "keep": 0.25, "seed": 0, "position_mode": "auto",
                             "strategy": "encoder_pool", "layer": 5}  # fmt: skip


# ------------------------------------------------------------------------------------------------ on models
def _families():
    return [(f, s) for f, ss in STRATEGIES.items() for s in ss]


@pytest.mark.parametrize("family,strategy", _families())
def test_keep_one_is_unpatched_and_budgets_hold(family, strategy):
    model = deep_clip_model() if family == "llava" else tiny_model(family, seed=1)
    spec = [[5, "image", 3], [2, "image", 4, "image", 1]]
    if family != "llava":
        spec = [[5, ("image", 8, 12), 3], [2, ("image", 8, 8), 4, ("image", 4, 8), 1]]
    inputs = make_inputs(model, spec)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmprune.patched(model, "fastvlm", keep=1.0, strategy=strategy):
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_ids)
        with vlmprune.patched(model, "fastvlm", keep=0.25, strategy=strategy):
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            st = vlmprune.last_stats(model)
    assert out.shape[0] == 2
    for img in st["images"]:
        t, h, w = img["grid"]
        h2, w2 = target_side(h, w, math.ceil(0.25 * t * h * w) // t)
        assert img["tokens_out"] == t * h2 * w2 <= math.ceil(0.25 * img["tokens_in"])


def test_llava_resolution_runs_the_tower_on_the_resized_image():
    model = deep_clip_model()
    inputs = make_inputs(model, [[3, "image", 2]])
    with vlmprune.patched(model, "fastvlm", keep=0.25, strategy="resolution"), LLMProbe(model) as probe:
        with torch.no_grad():
            model(**inputs)
    got = probe.calls[0]["inputs_embeds"][0, 3:7]  # 3 text tokens, then the 2x2 reduced image
    assert probe.calls[0]["inputs_embeds"].shape[1] == 3 + 4 + 2
    with torch.no_grad():
        small = resize_frames(inputs["pixel_values"], (28, 28))  # 4x4 patches of 14 px -> 2x2
        out = model.model.vision_tower(small, output_hidden_states=True, interpolate_pos_encoding=True)
        want = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layer", [0, 1])
def test_encoder_pool_equals_a_hand_pooled_tower(layer):
    """Pooled after block ``layer`` by hand (explicit 2x2 means in a hook on the unpatched tower), the later blocks
    on 4 tokens: the LLM gets exactly those tokens, projected."""
    model = deep_clip_model()
    inputs = make_inputs(model, [[3, "image", 2]])
    with vlmprune.patched(model, "fastvlm", keep=0.25, strategy="encoder_pool", layer=layer), LLMProbe(model) as pr:
        with torch.no_grad():
            model(**inputs)
    got = pr.calls[0]["inputs_embeds"][0, 3:7]

    tower = model.model.vision_tower
    handle = getattr(tower, "vision_model", tower).encoder.layers[layer].register_forward_hook(pool_4x4_by_hand)
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_hidden_states=True)
            want = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])[0]
    finally:
        handle.remove()
    assert out.hidden_states[-2].shape[1] == 1 + 4  # block 2 (LLaVA's feature layer) ran on the pooled grid
    torch.testing.assert_close(got, want)


def test_encoder_pool_layer_must_precede_the_feature_layer():
    model = deep_clip_model()
    with pytest.raises(ConfigError, match="before block 2"):
        vlmprune.patch(model, "fastvlm", keep=0.25, strategy="encoder_pool", layer=2)
    assert not vlmprune.is_patched(model)


def _smaller_prompt(model, inputs, keep):
    """The unpatched model's inputs for the same prompt with every image resized to fastvlm's reduced grid."""
    vc = model.config.vision_config
    m, p, T = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
    tok = model.config.image_token_id
    rows, grids, start = [], [], 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        part = inputs["pixel_values"][start : start + t * h * w]
        start += t * h * w
        h2, w2 = target_side(h // m, w // m, math.ceil(keep * t * (h // m) * (w // m)) // t)
        frames = resize_frames(unpatchify_qwen(part, (t, h, w), 3, T, p, m), (h2 * m * p, w2 * m * p))
        rows.append(patchify_qwen(frames, T, p, m))
        grids.append((t, h2 * m, w2 * m))
    new_grid = iter(grids)
    ids = []
    for row in inputs["input_ids"].tolist():
        out, i = [], 0
        while i < len(row):
            if row[i] == tok:
                t, h, w = next(new_grid)
                j = i
                while j < len(row) and row[j] == tok:
                    j += 1
                out += [tok] * (t * h * w // m**2)
                i = j
            else:
                out.append(row[i])
                i += 1
        ids.append(out)
    assert len(ids) == 1, "one row: no padding to rebuild"
    ids = torch.tensor(ids)
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.cat(rows),
        "image_grid_thw": torch.tensor(grids),
    }
    if "mm_token_type_ids" in inputs:  # transformers >= ~5.8 reads the image runs from it
        out["mm_token_type_ids"] = (ids == tok).long()
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_resolution_is_the_model_prompted_with_the_smaller_images(family):
    """Two images of different shapes in one prompt: the LLM input (embeddings and M-RoPE positions, including
    the text after each image; Qwen3-VL: DeepStack rows and mask), the decode steps' positions and the generated
    tokens equal the unpatched model's on the same prompt built for the resized images."""
    model = tiny_model(family, seed=1)
    inputs = make_inputs(model, [[4, ("image", 8, 12), 3, ("image", 12, 8), 5]])
    small = _smaller_prompt(model, inputs, 0.25)
    with torch.no_grad(), LLMProbe(model) as ref:
        ref_ids = model.generate(**small, max_new_tokens=4, do_sample=False)
    with vlmprune.patched(model, "fastvlm", keep=0.25, strategy="resolution"), LLMProbe(model) as got:
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids[:, inputs["input_ids"].shape[1] :], ref_ids[:, small["input_ids"].shape[1] :])
    g0, r0 = got.calls[0], ref.calls[0]
    valid = valid_slots(g0)[0]
    torch.testing.assert_close(g0["inputs_embeds"][0, valid], r0["inputs_embeds"][0])
    assert torch.equal(g0["position_ids"][-3:, 0][:, valid], r0["position_ids"][-3:, 0])
    if family == "qwen3_vl":
        assert torch.equal(g0["visual_pos_masks"][:, valid], r0["visual_pos_masks"])
        for a, b in zip(g0["deepstack_visual_embeds"], r0["deepstack_visual_embeds"], strict=True):
            torch.testing.assert_close(a, b)
    for step in (1, 2, 3):  # decoding continues after the smaller images, like the reference
        assert torch.equal(got.calls[step]["position_ids"][-3:], ref.calls[step]["position_ids"][-3:])


def test_refusals_name_the_strategy_that_works():
    with pytest.raises(UnsupportedModelError, match="resolution"):
        vlmprune.patch(tiny_model("qwen2_vl"), "fastvlm", keep=0.25, strategy="encoder_pool")
    with pytest.raises(UnsupportedModelError, match="resolution"):
        vlmprune.patch(tiny_model("qwen3_vl"), "fastvlm", keep=0.25, strategy="encoder_pool")
    fast = tiny_model("fast_vlm")
    with pytest.raises(UnsupportedModelError):
        vlmprune.patch(fast, "fastvlm", keep=0.25, strategy="resolution")
    with vlmprune.patched(fast, "fastvlm", keep=0.25, strategy="pool"):  # stacking on FastVLM's own compression
        with torch.no_grad():
            fast(**make_inputs(fast, [[3, "image", 2]]))
        assert vlmprune.last_stats(fast)["vision_tokens_out"] == 4


@pytest.mark.parametrize(
    "family,strategy",
    [("llava", "resolution"), ("llava", "encoder_pool"), ("llava", "pool"), ("qwen2_vl", "resolution"),
     ("qwen2_5_vl", "resolution"), ("llava_next", "resolution"), ("llava_next", "encoder_pool")],
)  # fmt: skip
def test_encoder_flops_fall_and_match_the_counter(family, strategy):
    """The analytic vision / projector / LLM FLOPs of each strategy equal FlopCounterMode's on the patched model,
    and the encoder's own FLOPs fall for resolution and encoder_pool (not for pool). LLaVA-NeXT: every crop."""
    from vlmprune import stats

    clip = family in ("llava", "llava_next")
    model = deep_clip_model(family) if clip else tiny_model(family, seed=1)
    spec = [[5, "image", 3, "image", 2]] if clip else [[5, ("image", 8, 12), 3, ("image", 8, 8)]]
    if family == "llava_next":
        spec = [[5, "image", 3, ("image", 112, 112), 2]]  # 48 x 80: base + 1 x 2 crops; 112 x 112: base + 2 x 2
    inputs = make_inputs(model, spec)
    grids = None if clip else [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    n_images = {"llava": 2, "llava_next": 3 + 5}.get(family, 0)
    full = stats.count_flops(model, inputs, logits_to_keep=1)
    config = vlmprune.make_config("fastvlm", keep=0.25, strategy=strategy)
    with vlmprune.patched(model, config):
        counted = stats.count_flops(model, inputs, logits_to_keep=1)
        st = vlmprune.last_stats(model)
    n_in, n_out = st["vision_tokens_in"], st["vision_tokens_out"]
    want = stats.prefill_flops(
        model.config, n_text=inputs["input_ids"].shape[1] - n_in, vision_in=n_in, vision_out=n_out, config=config,
        n_images=n_images, grids=grids,
    )  # fmt: skip
    assert counted["vision"] == pytest.approx(want.vision, rel=1e-9)
    assert counted["projector"] == pytest.approx(want.projector, rel=1e-9)
    assert counted["llm_prefill"] == pytest.approx(want.llm_prefill, rel=1e-3)
    if strategy == "pool":
        assert counted["vision"] == full["vision"]
    elif strategy == "resolution":  # every block, and the patch embedding, on a quarter of the patches
        assert counted["vision"] < 0.35 * full["vision"]
    else:  # the blocks after the middle one on a quarter of the patches
        assert counted["vision"] < 0.8 * full["vision"]


@pytest.mark.parametrize("strategy", ["resolution", "encoder_pool"])
def test_llava_full_feature_strategy_keeps_cls(strategy):
    """With vision_feature_select_strategy="full" the CLS token reaches the LLM too: kept, before the grid."""
    model = deep_clip_model("llava", vision_feature_select_strategy="full")
    inputs = make_inputs(model, [[3, "image", 2]])
    with vlmprune.patched(model, "fastvlm", keep=0.25, strategy=strategy), torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        st = vlmprune.last_stats(model)
    (img,) = st["images"]
    assert (img["tokens_in"], img["tokens_out"]) == (17, 1 + 4)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 2


def test_qwen_video_frames_shrink_and_keep_their_positions():
    """A video's frames are resampled like images, but keep their cells' original M-RoPE positions (the text after
    a video is numbered differently across releases); a budget below the frame count is refused."""
    model = tiny_model("qwen2_vl", seed=1)
    inputs = make_inputs(model, [[3, ("video", 4, 8, 8), 2]])
    with torch.no_grad(), LLMProbe(model) as ref:
        model(**inputs)
    with vlmprune.patched(model, "fastvlm", keep=0.25), LLMProbe(model) as got, torch.no_grad():
        model(**inputs)
        st = vlmprune.last_stats(model)
    (vid,) = st["images"]
    t = vid["grid"][0]
    assert vid["kind"] == "video" and t > 1 and vid["tokens_in"] == t * 16 and vid["tokens_out"] == t * 4
    valid = valid_slots(got.calls[0])[0]
    orig = {tuple(c) for c in ref.calls[0]["position_ids"][-3:, 0].T.tolist()}
    kept = [tuple(c) for c in got.calls[0]["position_ids"][-3:, 0][:, valid].T.tolist()]
    assert set(kept) <= orig and len(set(kept)) == len(kept)
    with vlmprune.patched(model, "fastvlm", keep=1), pytest.raises(vlmprune.UnsupportedInputError, match="frames"):
        with torch.no_grad():
            model(**inputs)


def test_features_encoded_before_patching_are_refused():
    """resolution / encoder_pool act inside the encoder: features the unpatched model encoded are refused rather
    than given the smaller grid's positions."""
    import inspect

    model = tiny_model("qwen2_vl", seed=1)
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers release takes no pre-encoded vision features")
    inputs = make_inputs(model, [[3, ("image", 8, 8), 2]])
    with torch.no_grad():
        enc = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    kw = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with vlmprune.patched(model, "fastvlm", keep=0.25), pytest.raises(vlmprune.UnsupportedInputError, match="pool"):
        with torch.no_grad():
            model(**kw, mm_encoder_outputs={"image": enc})
