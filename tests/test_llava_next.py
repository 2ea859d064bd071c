"""LLaVA-NeXT (anyres): the base view and the high-resolution crops are pruned as two parts of one image's budget,
image-newline tokens stay where the model put them, and ViT signals (captured per crop) line up with the packed,
unpadded tokens. The general invariants (keep=1.0, budgets, batch == singles, unpatch, generate) run on this
family in tests/test_conformance.py; references here come from the model's own packing code, not vlmprune's."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LLMProbe,
    deep_clip_model,
    fastvlm_anyres_kept,
    get_model,
    inputs_for,
    pool_4x4_by_hand,
    reference_layout,
    valid_slots,
)
from vlmprune.patches._base import split_budget

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.errors import ConfigError, UnsupportedModelError
from vlmprune.methods.hiprune import hiprune_select
from vlmprune.testing import tiny_model


@pytest.mark.parametrize(
    ("k", "sizes"), [(10, [16, 64]), (1, [16, 24]), (3, [16, 24]), (2, [16, 2304]), (79, [16, 64]), (7, [16, 0])]
)
def test_split_budget_is_proportional_and_exact(k, sizes):
    out = split_budget(k, sizes)
    total = sum(sizes)
    assert sum(out) == min(k, total)
    assert all(0 <= o <= n for o, n in zip(out, sizes, strict=True))
    nonempty = [n for n in sizes if n]
    if k >= len(nonempty):  # every part keeps something while the budget allows
        assert all(o >= 1 for o, n in zip(out, sizes, strict=True) if n)
    if k >= 2 * len(nonempty):  # otherwise within one token of the exact share
        assert all(abs(o - k * n / total) < 1 for o, n in zip(out, sizes, strict=True))


def test_newlines_are_kept_in_place_and_order_is_preserved():
    model = get_model("llava_next")
    inputs = inputs_for(model)
    tok = model.config.image_token_id
    with LLMProbe(model) as ref, torch.no_grad():
        model(**inputs)
    with vlmprune.patched(model, method="hiprune", keep=0.25), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    newline = model.model.image_newline
    for b in range(inputs["input_ids"].shape[0]):
        full = ref.calls[0]["inputs_embeds"][b][inputs["attention_mask"][b].bool()]
        got = probe.calls[0]["inputs_embeds"][b][valid_slots(probe.calls[0])[b]]
        # the pruned row is a subsequence of the original one (pruning, no merging) ...
        ptr = []
        j = 0
        for row in got:
            while not torch.equal(full[j], row):
                j += 1
            ptr.append(j)
            j += 1
        # ... that keeps every newline token (all of them, so each stays after its row's kept tokens)
        vision = (inputs["input_ids"][b][inputs["attention_mask"][b].bool()] == tok).nonzero().squeeze(-1)
        is_nl = (full[vision] == newline).all(-1)
        assert int(is_nl.sum()) > 0
        assert set(vision[is_nl].tolist()) <= set(ptr)
        assert int((got == newline).all(-1).sum()) == int(is_nl.sum())


def test_budget_is_split_between_base_and_crops():
    model = get_model("llava_next")
    inputs = inputs_for(model)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    assert len(stats["images"]) == 3
    for img, info in enumerate(stats["images"]):
        src, n_crops = reference_layout(model, inputs, img)
        n_newline = int((src < 0).sum())
        crops = int((src >= side * side).sum())
        assert n_crops > 1 and info["tokens_in"] == src.numel()
        base, high = info["parts"]
        assert (base["part"], base["tokens_in"], base["grid"]) == ("base", side * side, [1, side, side])
        assert (high["part"], high["tokens_in"]) == ("crops", crops)
        assert high["grid"] == [1, n_newline, crops // n_newline]  # one newline closes each row of the grid
        k = resolve_budget(0.25, side * side + crops)
        assert [base["tokens_out"], high["tokens_out"]] == split_budget(k, [side * side, crops])
        assert info["tokens_out"] == k + n_newline


def test_hiprune_scores_are_packed_like_the_tokens():
    """Per crop eager attention, packed by the model's own pack_image_features: the patched model picks, in each
    part, exactly what the HiPrune selection picks on those scores."""
    model = get_model("llava_next")
    inputs = inputs_for(model)
    eager = tiny_model("llava_next", seed=1, attn_implementation="eager")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with vlmprune.patched(model, method="hiprune", keep=0.25, object_layer=1, deep_layer=-2), torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    for img, info in enumerate(stats["images"]):
        src, n_crops = reference_layout(model, inputs, img)
        crops = inputs["pixel_values"][img][:n_crops]
        with torch.no_grad():
            att = eager.model.vision_tower(crops, output_attentions=True).attentions[0]
        received = att.float().mean(1).mean(1)[:, 1:]  # (n_crops, s*s), CLS dropped
        packed, _ = model.model.pack_image_features(
            [received[..., None]], inputs["image_sizes"][img][None], "default", image_newline=torch.tensor([-1.0])
        )
        packed = packed[0][:, 0]
        tokens = packed[src >= 0]
        for part, ref in zip(info["parts"], (tokens[: side * side], tokens[side * side :]), strict=True):
            want = hiprune_select(ref, ref, part["tokens_out"], tuple(part["grid"]))
            assert part["kept_indices"] == want.tolist()


@pytest.mark.parametrize(("method", "score"), [("visionzip", None), ("damro", "cls_merged"), ("damro", "received")])
def test_tower_signals_run_per_crop(method, score):
    model = get_model("llava_next")
    inputs = inputs_for(model)
    opts = {"keep": 0.25} if method == "visionzip" else {"score": score}
    with vlmprune.patched(model, method=method, **opts), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = vlmprune.last_stats(model)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    if method == "damro":  # the branch sees the base view's outliers only (the official LLaVA-NeXT code)
        side2 = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        outliers = stats["damro"]["outliers"]
        assert len(outliers) == 3 and all(max(o["indices"]) < side2 for o in outliers)


# ------------------------------------------------------------------------------ fastvlm's encoder strategies
def _by_hand(model, inputs, keep, tower) -> torch.Tensor:
    """The LLM's tokens for image 0 of ``inputs`` under fastvlm's encoder strategies, from the model's own parts:
    ``tower(crops, (h2, w2))`` gives every crop's hidden states at LLaVA's feature layer on the reduced grid
    (``(crops, 1 + h2*w2, D)``); projected, spread back over the full grid by the cell rule, packed by the model's
    ``pack_image_features`` (newlines included), and the kept tokens of :func:`conftest.fastvlm_anyres_kept`."""
    from vlmprune.methods.fastvlm import target_side

    vc = model.config.vision_config
    s = vc.image_size // vc.patch_size
    new = target_side(s, s, resolve_budget(keep, s * s))
    _, n_crops = reference_layout(model, inputs, 0)
    hidden = tower(inputs["pixel_values"][0][:n_crops], new)
    assert hidden.shape[1] == 1 + new[0] * new[1]
    projected = model.model.multi_modal_projector(hidden[:, 1:])  # "default": CLS dropped
    r = torch.arange(s)
    cell = ((r[:, None] * new[0] // s) * new[1] + r[None, :] * new[1] // s).reshape(-1)
    packed, _ = model.model.pack_image_features(
        [projected[:, cell]], inputs["image_sizes"][:1], "default", image_newline=model.model.image_newline
    )
    return packed[0][fastvlm_anyres_kept(model, inputs, 0, keep)]


def _patched_image_tokens(model, inputs, n_before, n_after, **config) -> torch.Tensor:
    """Image 0's tokens at the LLM input, patched; its kept tokens (as the stats name them) checked against
    :func:`conftest.fastvlm_anyres_kept`, which also decides which token stands for a reduced cell."""
    with vlmprune.patched(model, "fastvlm", **config), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
        (image,) = vlmprune.last_stats(model)["images"]
    index, _ = reference_layout(model, inputs, 0)
    cells = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    part_rows = [((index >= 0) & (index < cells)).nonzero().squeeze(-1), (index >= cells).nonzero().squeeze(-1)]
    kept = [(index < 0).nonzero().squeeze(-1)]
    kept += [rows[torch.tensor(p["kept_indices"])] for rows, p in zip(part_rows, image["parts"], strict=True)]
    assert torch.equal(torch.cat(kept).sort().values, fastvlm_anyres_kept(model, inputs, 0, config["keep"]))
    emb = probe.calls[0]["inputs_embeds"][0]
    return emb[n_before : emb.shape[0] - n_after]


@pytest.mark.parametrize("size", [(112, 112), (30, 100), (48, 80)])
@pytest.mark.parametrize(("keep", "patch"), [(0.25, 14), (0.5, 14), (0.11, 7), (0.3, 7)])
def test_fastvlm_resolution_runs_every_crop_smaller(size, keep, patch):
    """Every tower input (base view and crops) resized to the reduced grid, CLIP's positions interpolated; the
    unpadded layout keeps one token per surviving reduced cell, within each part's share of the budget."""
    model = get_model("llava_next") if patch == 14 else deep_clip_model("llava_next", patch)
    inputs = inputs_for(model, [[3, ("image", *size), 2]])
    got = _patched_image_tokens(model, inputs, 3, 2, keep=keep, strategy="resolution")
    p = model.config.vision_config.patch_size

    def tower(crops, new):
        small = torch.nn.functional.interpolate(
            crops.float(), size=(new[0] * p, new[1] * p), mode="bilinear", align_corners=False, antialias=True
        )
        out = model.model.vision_tower(small, output_hidden_states=True, interpolate_pos_encoding=True)
        return out.hidden_states[model.config.vision_feature_layer]

    with torch.no_grad():
        want = _by_hand(model, inputs, keep, tower)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("size", [(112, 112), (30, 100)])
def test_fastvlm_encoder_pool_pools_every_crop(layer, size):
    """Pooled after block ``layer`` by hand (explicit 2x2 means, CLS kept) on every crop: the later blocks run on
    4 patches per crop, and the LLM gets those tokens, spread, packed and kept as for ``resolution``."""
    model = deep_clip_model("llava_next")
    inputs = inputs_for(model, [[3, ("image", *size), 2]])
    got = _patched_image_tokens(model, inputs, 3, 2, keep=0.25, strategy="encoder_pool", layer=layer)

    def tower(crops, new):
        assert new == (2, 2)
        vt = model.model.vision_tower
        handle = getattr(vt, "vision_model", vt).encoder.layers[layer].register_forward_hook(pool_4x4_by_hand)
        try:
            return vt(crops, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        finally:
            handle.remove()

    with torch.no_grad():
        want = _by_hand(model, inputs, 0.25, tower)
    torch.testing.assert_close(got, want)


def test_fastvlm_encoder_budget_and_refusals():
    """keep=1.0 changes nothing; an int keep is refused with the remedy (every crop shrinks alike); the per-image
    stats say how many reduced cells survived; OneVision (SigLIP, interpolated grids) stays pool-only."""
    model = get_model("llava_next")
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmprune.patched(model, "fastvlm", keep=1.0, strategy="resolution"):
            assert torch.equal(model(**inputs).logits, ref)
    with pytest.raises(ConfigError, match="fraction"):
        vlmprune.patch(model, method="fastvlm", keep=64, strategy="resolution")
    assert not vlmprune.is_patched(model)
    with vlmprune.patched(model, "uniform", keep=0.25):  # refused before the current patch is replaced
        with pytest.raises(ConfigError, match="fraction"):
            vlmprune.patch(model, method="fastvlm", keep=64, strategy="encoder_pool", replace=True)
        assert vlmprune.get_config(model).name == "uniform"
    with vlmprune.patched(model, "fastvlm", keep=0.25), torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    for im in stats["images"]:
        n = im["tokens_in"] - im["always_kept"]
        assert im["always_kept"] < im["tokens_out"] <= resolve_budget(0.25, n) + im["always_kept"]
        for part in im["parts"]:
            assert part["reduced_grid"] == [1, 2, 2] and part["tokens_out"] <= part["reduced_cells"]
    onevision = get_model("llava_onevision")
    with pytest.raises(UnsupportedModelError, match="pool"):
        vlmprune.patch(onevision, method="fastvlm", keep=0.25, strategy="resolution")
    with vlmprune.patched(model, method="fastvlm", keep=0.25, strategy="pool"), torch.no_grad():
        model(**inputs)
        assert vlmprune.last_stats(model)["vision_tokens_out"] < vlmprune.last_stats(model)["vision_tokens_in"]
