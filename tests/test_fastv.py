"""FastV against a step-by-step reference: ranking from eager attention of layer K-1 (the last token's row,
head mean), then layers >= K run by hand on the kept tokens with their original positions."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune
from vlmprune.testing import FAMILIES as FAMILIES_ALL
from vlmprune.testing import tiny_model


def _layer(layer, h, pos, pe):
    out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reference_logits(model, emb, kept, K):
    """Unpatched LLaVA LLM, layer by layer: all tokens for layers < K, then only ``kept`` (original positions)."""
    lm = model.model.language_model
    L = emb.shape[1]
    pos = torch.arange(L)[None]
    h = emb
    pe = lm.rotary_emb(h, position_ids=pos)
    for layer in lm.layers[:K]:
        h = _layer(layer, h, pos, pe)
    h, pos = h[:, kept], pos[:, kept]
    pe = lm.rotary_emb(h, position_ids=pos)
    for layer in lm.layers[K:]:
        h = _layer(layer, h, pos, pe)
    return model.lm_head(lm.norm(h[:, -1]))


@pytest.mark.parametrize("keep", [0.25, 5])
def test_llava_prefill_and_decode_match_reference(keep):
    model = get_model("llava")
    inputs = inputs_for(model, [[4, "image", 3]])
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(-1)
    K = 2
    # ranking: eager attention of layer K-1, last token's row, mean over heads
    eager = tiny_model("llava", seed=1, attn_implementation="eager")
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[K - 1][0, :, -1, :].mean(0)
    k = vlmprune.make_config("fastv", keep=keep).budget(img.numel())
    top = torch.sort(att[img], descending=True, stable=True).indices[:k].sort().values
    kept = sorted(set(range(len(ids))) - set(img.tolist()) | set(img[top].tolist()))

    with LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    emb = probe.calls[0]["inputs_embeds"]
    with vlmprune.patched(model, method="fastv", keep=keep, layer=K), torch.no_grad():
        logits = model(**inputs).logits
        assert vlmprune.last_stats(model)["images"][0]["kept_indices"] == top.tolist()
        out = model.generate(
            **inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert logits.shape[1] == len(kept)
    torch.testing.assert_close(logits[:, -1], reference_logits(model, emb, kept, K), atol=1e-5, rtol=1e-5)
    # decode step 2: the first new token attends to the kept prompt tokens in layers >= K, to all in layers < K
    new = out.sequences[:, -2:-1]
    emb2 = torch.cat([emb, model.get_input_embeddings()(new)], 1)
    ref2 = reference_logits(model, emb2, kept + [len(ids)], K)
    torch.testing.assert_close(out.logits[1], ref2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_kept_tokens_keep_their_rotary_positions(family):
    model = get_model(family)
    inputs = inputs_for(model, [[3, ("image", 8, 8), 2]])
    ids = inputs["input_ids"][0]
    layer = model.model.language_model.layers[2]
    seen = []

    def probe():  # registered after vlmprune's hooks, so it sees what layer K really gets
        return layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_embeddings"]), with_kwargs=True
        )

    handle = probe()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    with vlmprune.patched(model, method="fastv", keep=0.25), torch.no_grad():
        handle = probe()
        try:
            model(**inputs)
        finally:
            handle.remove()
        top = vlmprune.last_stats(model)["images"][0]["kept_indices"]
    img = (ids == model.config.image_token_id).nonzero().squeeze(-1)
    kept = sorted(set(range(len(ids))) - set(img.tolist()) | set(img[top].tolist()))
    (cos_ref, sin_ref), (cos, sin) = seen
    assert cos.shape[-2] == len(kept)
    assert torch.equal(cos[..., :, :], cos_ref[..., kept, :]) and torch.equal(sin, sin_ref[..., kept, :])


def test_static_cache_and_bad_layers_are_refused():
    model = tiny_model("llava", seed=1)
    inputs = inputs_for(model, [[4, "image", 3]])
    with vlmprune.patched(model, method="fastv", keep=0.5):
        with pytest.raises(vlmprune.UnsupportedInputError, match="static"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    # the refused call leaves nothing behind: a static generate() works afterwards
    model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(vlmprune.ConfigError, match="smaller than"):
        vlmprune.patch(model, method="fastv", layer=3)
    assert not vlmprune.is_patched(model)
    with pytest.raises(vlmprune.ConfigError, match="K"):
        vlmprune.FastVConfig(layer=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_padded_batch_decode_logits_equal_singles(family):
    """Decode steps in layers >= K see a translated mask: every step's logits of a padded batch row equal the
    row run alone."""
    from conftest import SPECS

    model = get_model(family)
    spec = SPECS[family]
    batch = inputs_for(model, spec)
    assert not batch["attention_mask"].all()
    kw = dict(
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[model.generation_config.eos_token_id],
    )
    with vlmprune.patched(model, method="fastv", keep=0.25), torch.no_grad():
        out_b = model.generate(**batch, **kw)
        for i in range(len(spec)):
            single = inputs_for(model, [[]] * i + [spec[i]])
            keep = single["attention_mask"][i].bool()
            single = {
                k: (v[i : i + 1, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                for k, v in single.items()
            }
            out_s = model.generate(**single, **kw)
            for step in range(4):
                torch.testing.assert_close(out_b.logits[step][i], out_s.logits[step][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES_ALL)
def test_decode_when_the_longest_row_is_not_pruned(family):
    """A text-only row longer than the pruned ones keeps Lp == L: the shorter rows' filler slots then include
    dropped tokens, which decode steps must not attend to (they did: wrong logits from the second token on)."""
    from test_conformance import _take_last

    model = get_model(family)
    img = "image" if family in ("llava", "fast_vlm") else ("image", 8, 8)
    spec = [[40], [2, img, 3]]
    batch = inputs_for(model, spec)
    single = _take_last(inputs_for(model, [[], spec[1]]), 1, model)
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with vlmprune.patched(model, method="fastv", keep=0.25), torch.no_grad():
        out_b = model.generate(**batch, **kw)
        out_s = model.generate(**single, **kw)
    for lb, ls in zip(out_b.logits, out_s.logits, strict=True):
        torch.testing.assert_close(lb[1], ls[0], atol=1e-4, rtol=1e-4)
