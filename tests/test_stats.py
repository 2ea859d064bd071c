"""Analytic FLOPs (vlmprune.stats) against torch's FlopCounterMode, per component, eager and SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import get_model, inputs_for, tower_batches

import vlmprune
from vlmprune import stats
from vlmprune.testing import tiny_model

CASES = {
    "llava": ([[5, "image", 3, "image", 2]], None, 2),
    "llava_next": ([[5, "image", 3, ("image", 112, 112), 2]], None, 3 + 5),  # base views + crops: 1 x 2 and 2 x 2
    "qwen2_vl": ([[5, ("image", 8, 12), 3, ("image", 4, 8)]], [(1, 8, 12), (1, 4, 8)], 0),
    "qwen2_5_vl": ([[5, ("image", 8, 12), 3, ("image", 4, 8)]], [(1, 8, 12), (1, 4, 8)], 0),
    "qwen3_vl": ([[5, ("image", 8, 12), 3, ("image", 4, 8)]], [(1, 8, 12), (1, 4, 8)], 0),
}


def _close(counted, analytic, rel=0.0):
    assert abs(counted - analytic) <= rel * analytic, (counted, analytic)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_analytic_equals_counter(family, attn):
    spec, grids, n_images = CASES[family]
    model = tiny_model(family, seed=1, attn_implementation=attn)
    inputs = inputs_for(model, spec)
    counted = stats.count_flops(model, inputs, logits_to_keep=1)
    if family == "llava_next":
        assert sum(stats.anyres_crops(model.config, inputs["image_sizes"])) == n_images
    vision, projector = stats.vision_flops(model.config, n_images=n_images, grids=grids)
    llm, head, _ = stats.llm_flops(model.config.text_config, inputs["input_ids"].shape[1])
    assert counted["vision"] == vision and counted["projector"] == projector and counted["lm_head"] == head
    _close(counted["llm_prefill"], llm, rel=1e-3)  # transformers 5.0 also counts its RoPE-angle matmul
    assert counted["vision"] > 0 and counted["llm_prefill"] > 0


@pytest.mark.parametrize("family", sorted(CASES))
def test_pruned_llm_flops_follow_the_kept_tokens(family):
    spec, _, _ = CASES[family]
    model = get_model(family)
    inputs = inputs_for(model, spec)
    full = stats.count_flops(model, inputs, logits_to_keep=1)["llm_prefill"]
    with vlmprune.patched(model, method="uniform", keep=0.25):
        pruned = stats.count_flops(model, inputs, logits_to_keep=1)["llm_prefill"]
        n_kept = vlmprune.last_stats(model)["seq_len_out"][0]
    llm, _, _ = stats.llm_flops(model.config.text_config, n_kept)
    _close(pruned, llm, rel=1e-3)
    assert pruned < 0.6 * full


def test_decode_step_flops():
    model = get_model("llava")
    inputs = inputs_for(model, [[5, "image", 3]])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    step = {"input_ids": out.logits[:, -1:].argmax(-1), "past_key_values": out.past_key_values, "use_cache": True}
    counted = stats.count_flops(model, step)
    _, _, decode = stats.llm_flops(model.config.text_config, inputs["input_ids"].shape[1])
    _close(counted["llm_prefill"] + counted["lm_head"], decode, rel=1e-3)


def test_breakdown_totals():
    b = stats.FlopBreakdown(vision=1, projector=2, llm_prefill=3, lm_head=4, decode_per_token=5)
    assert b.prefill == 10 and b.to_dict()["prefill"] == 10


@pytest.mark.parametrize("family", sorted(CASES))
def test_fastv_flops_count_full_cost_for_the_first_layers(family):
    spec, _, _ = CASES[family]
    model = get_model(family)
    inputs = inputs_for(model, spec)
    with vlmprune.patched(model, method="fastv", keep=0.25, layer=2):
        counted = stats.count_flops(model, inputs, logits_to_keep=1)["llm_prefill"]
        n_kept = vlmprune.last_stats(model)["seq_len_out"][0]
    n = inputs["input_ids"].shape[1]
    llm, _, _ = stats.llm_flops_in_llm_pruning(model.config.text_config, n, n_kept, 2)
    # the ranking adds the last token's attention row in layer K-1 (+ its q/k projections): a small extra
    assert llm <= counted <= llm * 1.05
    assert llm < stats.llm_flops(model.config.text_config, n)[0]


def test_moe_llm_flops_count_router_and_routed_experts():
    """Qwen3-VL-MoE: FlopCounterMode sees the attention, the router and the head but not the experts' grouped
    matmuls; those are counted here from the routing itself (each routed (token, expert) pair runs gate/up and
    down projections: 6 d I), and the sum must equal the analytic LLM FLOPs."""
    spec = [[5, ("image", 8, 12), 3, ("image", 4, 8)]]
    model = tiny_model("qwen3_vl_moe", seed=1)
    inputs = inputs_for(model, spec)
    tc = model.config.text_config
    pairs = []

    def count(mod, args, kwargs):
        top_k = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        pairs.append(int(top_k.numel()))

    handles = [
        layer.mlp.experts.register_forward_pre_hook(count, with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        counted = stats.count_flops(model, inputs, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    n = inputs["input_ids"].shape[1]
    assert pairs == [n * tc.num_experts_per_tok] * tc.num_hidden_layers
    experts = sum(pairs) * 6 * tc.hidden_size * tc.moe_intermediate_size
    llm, head, _ = stats.llm_flops(tc, n)
    _close(counted["llm_prefill"] + experts, llm, rel=1e-3)
    vision, _ = stats.vision_flops(model.config, grids=[(1, 8, 12), (1, 4, 8)])
    assert counted["vision"] == vision and counted["lm_head"] == head


ONEVISION_CASES = {
    "one image, anyres crops": [[5, ("image", 112, 112), 2]],
    "two images, base views": [[5, "image", 3, ("image", 112, 112), 2]],
    "video": [[5, ("video", 3), 2]],
    "two rows": [[5, ("image", 56, 112), 2], [4, "image", 1, "image", 6]],
}


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("case", sorted(ONEVISION_CASES))
def test_onevision_analytic_equals_counter(case, head):
    """SigLIP tower (with and without its attention-pooling head) and projector, against FlopCounterMode; the
    tower inputs (crops, base views, frames) against what the tower actually received."""
    import transformers as tf

    from vlmprune.testing import LLAVA_SIZES

    vision = {k: v for k, v in LLAVA_SIZES["tiny"][0].items() if k != "projection_dim"}
    model = tiny_model("llava_onevision", seed=1, vision_config=tf.SiglipVisionConfig(**vision, vision_use_head=head))
    tower = model.model.vision_tower
    assert (getattr(getattr(tower, "vision_model", tower), "head", None) is not None) == head
    inputs = inputs_for(model, ONEVISION_CASES[case])
    with tower_batches(model) as seen:
        counted = stats.count_flops(model, inputs, logits_to_keep=1)
    frames = [int(v.shape[0]) for v in inputs.get("pixel_values_videos", [])]
    n = stats.onevision_tower_inputs(
        model.config, inputs.get("image_sizes"), inputs.get("batch_num_images"), video_frames=frames
    )
    assert n == sum(seen)
    vision, projector = stats.vision_flops(model.config, n_images=n)
    assert counted["vision"] == vision and counted["projector"] == projector
    assert vision > 0 and projector > 0
