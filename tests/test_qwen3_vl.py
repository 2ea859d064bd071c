"""Qwen3-VL's DeepStack under pruning: the language model's visual_pos_masks and DeepStack rows follow the kept
tokens, so a patched prefill equals the unpatched language model run by hand on the kept tokens only. Qwen3-VL-MoE
(same cut, sparse LLM) runs these checks and the core invariants of tests/test_conformance.py here (it is kept out
of testing.FAMILIES to hold the suite's run time)."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("method", ["uniform", "hiprune", "pool"])
def test_deepstack_follows_the_kept_tokens(family, method):
    model = get_model(family)
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


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("text_len", [40, 6])
def test_fastv_prunes_deepstack_after_layer_k(family, text_len):
    """FastV (K=2) with DeepStack on LLM layers 0-2 (and a layer 3 that reads the result): layer 2's injection lands
    on the pruned sequence. A batch with a text-only row equals the image row alone, also when the text row is the
    longest (the pruned length then equals the original one) and when it is not."""
    from test_conformance import _take_last

    model = get_model(family)
    spec = [[text_len], [2, ("image", 8, 8), 3]]
    batch = inputs_for(model, spec)
    single = _take_last(inputs_for(model, [[], spec[1]]), 1, model)
    with vlmprune.patched(model, method="fastv", keep=0.25), torch.no_grad():
        out_b = model(**batch).logits[1, -1]
        out_s = model(**single).logits[0, -1]
        gen_b = model.generate(**batch, max_new_tokens=3, do_sample=False)
        gen_s = model.generate(**single, max_new_tokens=3, do_sample=False)
        assert vlmprune.last_stats(model)["vision_tokens_out"] < vlmprune.last_stats(model)["vision_tokens_in"]
    torch.testing.assert_close(out_b, out_s, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen_b[1, batch["input_ids"].shape[1] :], gen_s[0, single["input_ids"].shape[1] :])


@pytest.mark.parametrize("method", [m for m in vlmprune.list_methods() if m != "damro"])
def test_moe_core_invariants(method):
    """keep=1.0 bit-identical, exactly the budget at the LLM, batch == singles, unpatch restores (the conformance
    suite's checks, on the MoE family)."""
    import test_conformance as conf

    model = get_model("qwen3_vl_moe")
    checks = [
        lambda: conf.test_keep_all_is_bit_identical(model, method, "left"),
        lambda: conf.test_llm_receives_exactly_the_budget(model, method, 0.25),
        lambda: conf.test_batch_equals_singles(model, method, "left"),
        lambda: conf.test_unpatch_restores_everything(model, method),
    ]
    for check in checks:
        try:
            check()
        finally:
            if vlmprune.is_patched(model):
                vlmprune.unpatch(model)
