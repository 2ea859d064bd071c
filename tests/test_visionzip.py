"""VisionZip: grouping and merging against slow references, and the patched LLaVA's LLM input against an
independent computation from eager attention, hidden states and keys of the unpatched tower."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune
from vlmprune.methods.visionzip import contextual_groups, merge_contextual, visionzip_split


def reference_groups(keys, remaining, c):
    r = len(remaining)
    step = max(1, r // c)
    slots = list(range(0, r, step))[:c]
    targets = [remaining[i] for i in slots]
    members = [remaining[i] for i in range(r) if i not in slots]
    assign = []
    for mbr in members:
        sims = [float(torch.dot(keys[mbr], keys[t]) / (keys[mbr].norm() * keys[t].norm())) for t in targets]
        assign.append(max(range(len(targets)), key=lambda j: (sims[j], -j)))
    return targets, members, assign


@pytest.mark.parametrize("n,c", [(20, 3), (50, 10), (9, 9), (12, 1)])
def test_groups_and_merge_match_reference(n, c):
    gen = torch.Generator().manual_seed(n * 10 + c)
    keys = torch.randn(n + 5, 8, generator=gen)
    hidden = torch.randn(n + 5, 6, generator=gen)
    remaining = torch.arange(5, n + 5)
    targets, members, assign = contextual_groups(keys, remaining, c)
    rt, rm, ra = reference_groups(keys, remaining.tolist(), c)
    assert targets.tolist() == rt and members.tolist() == rm and assign.tolist() == ra
    merged = merge_contextual(hidden, targets, members, assign, "add")
    for j, t in enumerate(rt):
        group = [m for m, a in zip(rm, ra, strict=True) if a == j]
        extra = torch.stack([hidden[m] for m in group]).mean(0) if group else torch.zeros(6)
        torch.testing.assert_close(merged[j], hidden[t] + extra)
    mean = merge_contextual(hidden, targets, members, assign, "mean")
    for j, t in enumerate(rt):
        group = [hidden[t]] + [hidden[m] for m, a in zip(rm, ra, strict=True) if a == j]
        torch.testing.assert_close(mean[j], torch.stack(group).mean(0))


def test_paper_split():
    assert visionzip_split(64, 54 / 64, True) == (53, 10)  # official dominant=54 (incl. CLS), contextual=10
    assert visionzip_split(128, 54 / 64, True) == (107, 20)
    assert visionzip_split(192, 54 / 64, False) == (162, 30)
    assert visionzip_split(1, 54 / 64, True) == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [dict(dominant_ratio=0), dict(dominant_ratio=1.5), dict(feed_cls=1), dict(contextual="sum"), dict(layer="x")],
)
def test_config_validation(bad):
    with pytest.raises(vlmprune.ConfigError):
        vlmprune.VisionZipConfig(**bad)


def test_llava_llm_input_matches_independent_computation():
    from vlmprune.testing import tiny_model

    model = get_model("llava")
    inputs = inputs_for(model, [[3, "image", 2]])
    k = 8  # 16 patches -> round(8 * 54/64) = 7 dominant incl. CLS (6 patches), 1 contextual
    with vlmprune.patched(model, method="visionzip", keep=k), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    got = probe.calls[0]["inputs_embeds"][0, 3 : 3 + k]

    eager = tiny_model("llava", seed=1, attn_implementation="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        f = len(out.attentions) - 2  # the feature layer -2
        cls_attn = out.attentions[f][0, :, 0, 1:].sum(0)
        tower = eager.model.vision_tower
        block = getattr(tower, "vision_model", tower).encoder.layers[f]  # 5.0 still wraps .vision_model
        x = block.layer_norm1(out.hidden_states[f])
        keys = block.self_attn.k_proj(x)[0].view(17, 4, -1).mean(1)[1:]
        hidden = out.hidden_states[f + 1][0]
        proj = eager.model.multi_modal_projector
        dom = sorted(torch.sort(cls_attn, descending=True, stable=True).indices[:6].tolist())
        remaining = [i for i in range(16) if i not in dom]
        rt, rm, ra = reference_groups(keys, remaining, 1)
        ctx = hidden[1:][rt[0]] + torch.stack([hidden[1:][m] for m in rm]).mean(0)
        want = torch.cat([proj(hidden[:1]), proj(hidden[1:][dom]), proj(ctx[None])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tokens_stay_on_their_positions(family):
    model = get_model(family)
    inputs = inputs_for(model, [[3, ("image", 8, 8), 2]])
    with LLMProbe(model) as ref_probe, torch.no_grad():
        model(**inputs)
    with vlmprune.patched(model, method="visionzip", keep=6), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
        info = vlmprune.last_stats(model)["images"][0]
    dominant, targets = info["dominant"], info["contextual_targets"]
    assert len(dominant) == 5 and len(targets) == 1 and info["kept_indices"] == sorted(dominant + targets)
    ref_emb, emb = ref_probe.calls[0]["inputs_embeds"][0], probe.calls[0]["inputs_embeds"][0]
    first = 4  # 3 text tokens + vision_start
    for slot, idx in enumerate(info["kept_indices"]):
        if idx in dominant:  # unchanged token on its own position
            assert torch.equal(emb[first + slot], ref_emb[first + idx])
        assert torch.equal(
            probe.calls[0]["position_ids"][:, 0, first + slot], ref_probe.calls[0]["position_ids"][:, 0, first + idx]
        )


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_visionzip_reads_one_layer_and_keeps_sdpa(family):
    """Only the one ViT block VisionZip reads (its attention / q-k projections) gets hooks besides the patch's own
    entry points; every module keeps SDPA."""
    model = get_model(family)
    before = {n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks}
    with vlmprune.patched(model, method="visionzip", keep=0.25):
        hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks} - before
        impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    vision = {n for n in hooked if ".vision_tower." in n or ".visual." in n}
    blocks = {
        n.split(".layers.")[-1].split(".blocks.")[-1].split(".")[0] for n in vision if "layers." in n or "blocks." in n
    }
    assert len(blocks) == 1, sorted(vision)
    assert impls == {"sdpa"}
