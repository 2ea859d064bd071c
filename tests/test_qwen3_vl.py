"""Qwen3-VL's DeepStack under pruning: the language model's visual_pos_masks and DeepStack rows follow the kept
tokens, so a patched prefill equals the unpatched language model run by hand on the kept tokens only."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune


@pytest.mark.parametrize("method", ["uniform", "hiprune", "pool"])
def test_deepstack_follows_the_kept_tokens(method):
    model = get_model("qwen3_vl")
    inputs = inputs_for(model, [[3, ("image", 8, 12), 4, ("image", 8, 8), 2]])
    with LLMProbe(model) as ref, torch.no_grad():
        model(**inputs)
    full = ref.calls[0]
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(-1)
    assert torch.equal(full["visual_pos_masks"][0].nonzero().squeeze(-1), img)  # rows = image positions, in order
    with vlmprune.patched(model, method=method, keep=0.25):
        with LLMProbe(model) as probe, torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        stats = vlmprune.last_stats(model)
    got = probe.calls[0]
    # kept image tokens (positions in the original sequence), from the method's own report
    kept, start = [], 0
    for im in stats["images"]:
        n = im["tokens_in"]
        kept += [int(img[start + i]) for i in im["kept_indices"]]
        start += n
    keep = sorted(set(range(len(ids))) - set(img.tolist()) | set(kept))
    rows = [img.tolist().index(p) for p in kept]  # DeepStack row of each kept (or representative) token
    assert torch.equal(got["visual_pos_masks"][0].nonzero().squeeze(-1), torch.tensor([keep.index(p) for p in kept]))
    for d_got, d_full in zip(got["deepstack_visual_embeds"], full["deepstack_visual_embeds"], strict=True):
        assert torch.equal(d_got, d_full[rows])
    # the unpatched LLM on the kept tokens by hand (merged values where the method merged), with their DeepStack rows
    lm = model.model.language_model
    emb = got["inputs_embeds"]
    assert torch.equal(
        emb[0, [keep.index(p) for p in range(len(ids)) if p in keep and p not in img]],
        full["inputs_embeds"][0, [p for p in keep if p not in img.tolist()]],
    )
    with torch.no_grad():
        out = lm(
            inputs_embeds=emb,
            position_ids=full["position_ids"][..., keep],
            visual_pos_masks=got["visual_pos_masks"],
            deepstack_visual_embeds=[d[rows] for d in full["deepstack_visual_embeds"]],
        )
    torch.testing.assert_close(model.lm_head(out.last_hidden_state[0, -1]), logits, atol=1e-5, rtol=1e-5)


def test_fastv_prunes_deepstack_after_layer_k():
    """FastV (K=2) with DeepStack on LLM layers 0-2: layer 2's injection lands on the pruned sequence."""
    model = get_model("qwen3_vl")
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="fastv", keep=0.25), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert vlmprune.last_stats(model)["vision_tokens_out"] < vlmprune.last_stats(model)["vision_tokens_in"]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
