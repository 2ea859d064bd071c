"""LLaVA-NeXT (anyres): the base view and the high-resolution crops are pruned as two parts of one image's budget,
image-newline tokens stay where the model put them, and ViT signals (captured per crop) line up with the packed,
unpadded tokens. The general invariants (keep=1.0, budgets, batch == singles, unpatch, generate) run on this
family in tests/test_conformance.py; references here come from the model's own packing code, not vlmprune's."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for, valid_slots
from vlmprune.patches._base import split_budget

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.errors import UnsupportedModelError
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


def _reference_layout(model, inputs, img):
    """From the model's own ``pack_image_features``: per token of image ``img``, its (crop, patch) index, -1 at
    newlines; and the number of crops."""
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
        src, n_crops = _reference_layout(model, inputs, img)
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
        src, n_crops = _reference_layout(model, inputs, img)
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


def test_fastvlm_encoder_strategies_are_refused_with_the_alternative():
    model = get_model("llava_next")
    with pytest.raises(UnsupportedModelError, match="pool"):
        vlmprune.patch(model, method="fastvlm", keep=0.25, strategy="resolution")
    assert not vlmprune.is_patched(model)
    with vlmprune.patched(model, method="fastvlm", keep=0.25, strategy="pool"), torch.no_grad():
        model(**inputs_for(model))
        assert vlmprune.last_stats(model)["vision_tokens_out"] < vlmprune.last_stats(model)["vision_tokens_in"]
