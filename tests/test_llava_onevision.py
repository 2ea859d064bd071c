"""LLaVA-OneVision: anyres images (with the model's interpolation of large grids), base-view-only images in
multi-image samples, and pooled videos (one item of ``(frames, h, w)`` plus a kept newline). The general invariants
run on this family in tests/test_conformance.py (images); videos are checked here. References come from the
model's own packing / pooling code and eager attention, not from vlmprune's."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for, valid_slots

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.methods.hiprune import hiprune_select
from vlmprune.testing import tiny_model

VIDEO_SPEC = [[3, ("video", 3), 2], [4, ("image", 112, 112), 2]]


def _side(model):
    return model.config.vision_config.image_size // model.config.vision_config.patch_size


def test_video_is_one_item_with_its_newline_kept():
    model = get_model("llava_onevision")
    inputs = inputs_for(model, VIDEO_SPEC)
    pooled = model.model.apply_pooling(torch.zeros(1, _side(model) ** 2, 1)).shape[1]
    n_video = 3 * pooled + 1
    assert int((inputs["input_ids"][0] == model.config.video_token_id).sum()) == n_video
    with LLMProbe(model) as ref, torch.no_grad():
        model(**inputs)
    with vlmprune.patched(model, method="uniform", keep=0.25), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    video = [i for i in stats["images"] if i["kind"] == "video"]
    assert len(video) == 1 and video[0]["tokens_in"] == n_video
    (part,) = video[0]["parts"]
    side = int(round(pooled**0.5))
    assert part["grid"] == [3, side, side] and part["tokens_out"] == resolve_budget(0.25, 3 * pooled)
    # what the LLM gets in row 0: its text, the budgeted frame tokens and the video's newline, last among them
    real = valid_slots(probe.calls[0])[0]
    n_text = int(inputs["attention_mask"][0].sum()) - n_video
    assert int(real.sum()) == n_text + part["tokens_out"] + 1
    got = probe.calls[0]["inputs_embeds"][0][real]
    is_nl = (got == model.model.image_newline).all(-1)
    assert int(is_nl.sum()) == 1
    vid_rows = (
        got[:, None] == ref.calls[0]["inputs_embeds"][0][inputs["input_ids"][0] == model.config.video_token_id]
    ).all(-1)
    assert int(vid_rows.any(-1).sum()) == part["tokens_out"] + 1 and bool(vid_rows[is_nl.nonzero()[0, 0], -1])


@pytest.mark.parametrize("method", ["uniform", "hiprune", "visionzip", "vqtoken", "fastv", "pool"])
def test_video_keep_all_is_identical_and_generate_runs(method):
    model = get_model("llava_onevision")
    inputs = inputs_for(model, VIDEO_SPEC)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vlmprune.patched(model, method=method, keep=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_ids)
    with vlmprune.patched(model, method=method, keep=0.25), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = vlmprune.last_stats(model)
    assert out.shape == ref_ids.shape and stats["vision_tokens_out"] < stats["vision_tokens_in"]


def test_multi_image_samples_use_base_views_and_large_grids_are_interpolated():
    model = get_model("llava_onevision")
    side = _side(model)
    inputs = inputs_for(model)  # [[.., 112 x 112 alone, ..], [.., 30 x 100, .., 48 x 80, ..]]
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    alone, *pair = stats["images"]
    base, crops = alone["parts"]
    # 2 x 2 crops of s x s, interpolated by anyres_max_2 to int(2s / r) per side, r = sqrt(4 s^2 / (2 s^2))
    shrunk = int(2 * side // (2**0.5))
    assert base["grid"] == [1, side, side] and crops["grid"] == [1, shrunk, shrunk]
    assert alone["tokens_in"] == side * side + shrunk * (shrunk + 1)
    for info in pair:  # a sample with two images: each its base view and one newline
        assert [p["part"] for p in info["parts"]] == ["base"] and info["tokens_in"] == side * side + 1


def _eager_received(eager, pixels):
    with torch.no_grad():
        att = eager.model.vision_tower(pixels, output_attentions=True).attentions[0]
    return att.float().mean(1).mean(1)  # (units, s*s): SigLIP has no CLS


def test_hiprune_scores_follow_interpolation_and_pooling():
    """Per tower input eager attention, packed / pooled by the model's own code: the patched model keeps, in every
    part, what the HiPrune selection keeps on those scores."""
    model = get_model("llava_onevision")
    eager = tiny_model("llava_onevision", seed=1, attn_implementation="eager")
    inputs = inputs_for(model, VIDEO_SPEC)
    side = _side(model)
    with vlmprune.patched(model, method="hiprune", keep=0.25, object_layer=1, deep_layer=0), torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
    image = next(i for i in stats["images"] if i["kind"] == "image")
    video = next(i for i in stats["images"] if i["kind"] == "video")
    # the image: 5 tower inputs (base + 2 x 2 crops), packed with interpolation; newlines marked by -1
    received = _eager_received(eager, inputs["pixel_values"][0][:5])
    packed, _ = model.model.pack_image_features(
        [received[..., None]],
        inputs["image_sizes"][:1],
        image_newline=torch.tensor([-1.0]),
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    tokens = packed[0][:, 0][packed[0][:, 0] >= 0]
    for part, ref in zip(image["parts"], (tokens[: side * side], tokens[side * side :]), strict=True):
        assert part["kept_indices"] == hiprune_select(ref, ref, part["tokens_out"], tuple(part["grid"])).tolist()
    # the video: 3 frames, pooled like the features
    frames = _eager_received(eager, inputs["pixel_values_videos"][0])
    ref = model.model.apply_pooling(frames[..., None]).reshape(-1)
    (part,) = video["parts"]
    assert part["kept_indices"] == hiprune_select(ref, ref, part["tokens_out"], tuple(part["grid"])).tolist()


def test_damro_defaults_to_received_attention_without_cls():
    model = get_model("llava_onevision")
    inputs = inputs_for(model, VIDEO_SPEC)
    with vlmprune.patched(model, method="damro"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = vlmprune.last_stats(model)
    assert stats["damro"]["score"] == "received" and out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(stats["damro"]["outliers"]) == 2
