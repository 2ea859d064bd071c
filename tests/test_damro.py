"""DAMRO: the pure functions against slow references, the contrastive decoding against a step-by-step reference
without any cache (LLaVA with the official merged-head CLS score; Qwen2-VL with M-RoPE positions), and the
invariants: alpha=0 / plain forwards are untouched, batches equal singles, composition with pruning, unpatch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LLMProbe, get_model, hook_snapshot, inputs_for, sequence, valid_slots

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.errors import ConfigError, UnsupportedInputError
from vlmprune.methods.damro import DamroConfig, cls_attention_scores, contrast_logits, select_outliers

# ---- pure functions ----------------------------------------------------------------------------------------


def test_cls_scores_match_loops():
    g = torch.Generator().manual_seed(0)
    C, H, N = 12, 3, 7
    q, k = torch.randn(C, generator=g), torch.randn(N + 1, C, generator=g)
    merged = cls_attention_scores(q, k, H, "cls_merged")
    logits = [sum(float(q[c]) * float(k[j, c]) for c in range(C)) / math.sqrt(C) for j in range(N + 1)]
    z = sum(math.exp(v) for v in logits)
    assert torch.allclose(merged, torch.tensor([math.exp(v) / z for v in logits[1:]]), atol=1e-6)
    d = C // H
    per_head = []
    for h in range(H):
        lg = [sum(float(q[h * d + c]) * float(k[j, h * d + c]) for c in range(d)) / math.sqrt(d) for j in range(N + 1)]
        zz = sum(math.exp(v) for v in lg)
        per_head.append([math.exp(v) / zz for v in lg[1:]])
    ref = torch.tensor(per_head).mean(0)
    assert torch.allclose(cls_attention_scores(q, k, H, "cls_heads"), ref, atol=1e-6)
    batched = cls_attention_scores(torch.stack([q, q]), torch.stack([k, k]), H)
    torch.testing.assert_close(batched[1], merged)


def test_select_outliers_order_and_ties():
    s = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.9])
    assert select_outliers(s, 3).tolist() == [4, 1, 3]  # best first, tie to the lower index
    assert select_outliers(s, 3, "raster").tolist() == [1, 3, 4]
    assert select_outliers(s, 10).numel() == 5


def test_contrast_logits_definition():
    g = torch.Generator().manual_seed(1)
    main, cd = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 50, generator=g) * 3
    alpha, beta = 1.5, 0.2
    out = contrast_logits(main, cd, alpha, beta)
    p = main.softmax(-1)
    plausible = p >= beta * p.amax(-1, keepdim=True)
    assert torch.equal(torch.isfinite(out), plausible)
    assert torch.allclose(out[plausible], ((1 + alpha) * main - alpha * cd)[plausible], atol=1e-5)
    assert bool(plausible.gather(1, main.argmax(-1, keepdim=True)).all())  # never an all -inf row
    assert torch.isfinite(contrast_logits(main, cd, alpha, 0.0)).all()  # beta=0 keeps all
    assert torch.equal(contrast_logits(main, cd, 0.0, 0.0), main)


def test_config_validation_and_roundtrip():
    for bad in (dict(alpha=-1), dict(beta=1.5), dict(top_k=0), dict(score="cls"), dict(order="x"), dict(keep=0.25)):
        with pytest.raises(ConfigError):
            DamroConfig(**bad)
    with pytest.raises(vlmprune.errors.UnknownMethodError, match="Did you mean 'hiprune'"):
        vlmprune.make_config("damro", prune="hiprun", keep=0.25)
    with pytest.raises(ConfigError, match="conflicts"):
        DamroConfig(keep=0.5, prune=vlmprune.make_config("uniform", keep=0.25))
    cfg = DamroConfig(prune=vlmprune.make_config("hiprune", keep=0.11), alpha=1.0)
    assert cfg.keep == 0.11
    d = cfg.to_dict()
    assert d["method"] == "damro" and d["prune"]["method"] == "hiprune"
    assert DamroConfig.from_dict(d).to_dict() == d
    named = vlmprune.make_config("damro", prune="uniform", keep=0.25, top_k=4)
    assert named.prune_config().to_dict()["keep"] == 0.25 and named.to_dict()["prune"] == "uniform"


# ---- slow references ---------------------------------------------------------------------------------------


def _mix(main: torch.Tensor, cd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The paper's rule written out per vocabulary entry (independent of contrast_logits)."""
    p = torch.softmax(main.double(), -1)
    out = torch.full_like(main, float("-inf"))
    for v in range(main.shape[-1]):
        if p[v] >= beta * p.max():
            out[v] = (1 + alpha) * main[v] - alpha * cd[v]
    return out


@torch.no_grad()
def _llava_outliers(model, pixel_values, top_k):
    """The official DAMRO LLaVA score from the tower's hidden states: block -2's input, LN1, q_proj / k_proj,
    one merged head over the full width, CLS row."""
    tower = model.model.vision_tower
    blocks = getattr(tower, "vision_model", tower).encoder.layers
    j = len(blocks) - 2
    hs = tower(pixel_values, output_hidden_states=True).hidden_states
    x = blocks[j].layer_norm1(hs[j])
    q, k = blocks[j].self_attn.q_proj(x)[0], blocks[j].self_attn.k_proj(x)[0]
    s = torch.softmax(k @ q[0] / math.sqrt(q.shape[-1]), 0)[1:]
    return sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))[:top_k]


@torch.no_grad()
def _reference(model, inputs, outliers, alpha, beta, steps, mrope):
    """Greedy DAMRO without any cache: the unpatched model re-run on the whole sequence every step for the main
    branch; the LLM run on text + outliers (+ generated tokens) for the contrastive branch."""
    with LLMProbe(model) as probe:
        model(**inputs)
    emb, pos = probe.calls[0]["inputs_embeds"][0], probe.calls[0].get("position_ids")
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(-1)
    order = list(range(img[0])) + img[outliers].tolist() + list(range(int(img[-1]) + 1, len(ids)))
    cd_emb = emb[order]
    if mrope:
        cd_pos = pos[..., order]
        nxt = int(pos.max()) + 1
    lm, embed = model.model.language_model, model.get_input_embeddings()
    gen, mixed = [], []
    for t in range(steps):
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], torch.tensor([gen], dtype=torch.long)], 1))
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, t, dtype=torch.long)], 1
            )
        main = model(**full).logits[0, -1]
        seq = torch.cat([cd_emb, embed(torch.tensor(gen, dtype=torch.long))])
        if mrope:
            p = torch.cat([cd_pos, torch.arange(nxt, nxt + t).expand(*cd_pos.shape[:-1], t)], -1)
        else:
            p = torch.arange(seq.shape[0])[None]
        cd = model.lm_head(lm(inputs_embeds=seq[None], position_ids=p).last_hidden_state[0, -1])
        m = _mix(main, cd, alpha, beta)
        mixed.append(m)
        gen.append(int(m.argmax()))
    return gen, torch.stack(mixed)


def _check_against_reference(model, inputs, got, ref_gen, ref_mixed):
    L = inputs["input_ids"].shape[1]
    assert got.sequences[0, L:].tolist() == ref_gen
    for t, lg in enumerate(got.logits):
        lg = lg[0].double()
        assert torch.equal(torch.isfinite(lg), torch.isfinite(ref_mixed[t]))
        fin = torch.isfinite(lg)
        torch.testing.assert_close(lg[fin], ref_mixed[t][fin].double(), atol=2e-4, rtol=1e-4)


def test_llava_matches_step_by_step_reference():
    model = get_model("llava")
    inputs = inputs_for(model, [[4, "image", 5]])
    top_k, alpha, beta, steps = 5, 1.5, 0.05, 5
    outliers = _llava_outliers(model, inputs["pixel_values"], top_k)
    ref_gen, ref_mixed = _reference(model, inputs, outliers, alpha, beta, steps, mrope=False)
    with vlmprune.patched(model, method="damro", top_k=top_k, alpha=alpha, beta=beta), torch.no_grad():
        got = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stats = vlmprune.last_stats(model)
    assert stats["damro"]["outliers"][0]["indices"] == outliers
    assert stats["damro"]["branch_tokens"] == [inputs["input_ids"].shape[1] - 16 + top_k]
    _check_against_reference(model, inputs, got, ref_gen, ref_mixed)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_matches_step_by_step_reference(family):
    """Qwen: outliers keep their original M-RoPE positions and decoding continues at max + 1 (score='norm' so
    the outliers come from an independent computation: the norms of the image rows of inputs_embeds)."""
    model = get_model(family)
    inputs = inputs_for(model, [[4, ("image", 8, 12), 5]])
    top_k, alpha, beta, steps = 4, 1.0, 0.1, 4
    with LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(-1)
    norms = probe.calls[0]["inputs_embeds"][0, img].norm(dim=-1)
    outliers = sorted(range(norms.numel()), key=lambda i: (-float(norms[i]), i))[:top_k]
    ref_gen, ref_mixed = _reference(model, inputs, outliers, alpha, beta, steps, mrope=True)
    with vlmprune.patched(model, method="damro", top_k=top_k, alpha=alpha, beta=beta, score="norm"):
        with torch.no_grad():
            got = model.generate(
                **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        assert vlmprune.last_stats(model)["damro"]["outliers"][0]["indices"] == outliers
    _check_against_reference(model, inputs, got, ref_gen, ref_mixed)


# ---- invariants --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", [None, "uniform", "hiprune", "fastv"])
def test_alpha_zero_is_the_underlying_model(model, prune):
    """alpha=0: greedy and sampled outputs equal the unpatched model's (or the pruning method's alone)."""
    inputs = inputs_for(model)
    kw = dict(prune=prune, keep=0.25) if prune else {}

    def run():
        torch.manual_seed(3)
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            s = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0)
        return g, s

    if prune:
        vlmprune.patch(model, method=prune, keep=0.25)
    ref = run()
    if prune:
        vlmprune.unpatch(model)
    vlmprune.patch(model, method="damro", alpha=0.0, **kw)
    got = run()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_plain_forward_is_not_contrasted_and_unpatch_restores(model):
    inputs = inputs_for(model)
    before = hook_snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vlmprune.patch(model, method="damro", top_k=3)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vlmprune.unpatch(model)
    assert hook_snapshot(model) == before
    assert "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ref_ids)


@pytest.mark.parametrize("prune", [None, "hiprune"])
def test_batch_equals_singles(model, prune):
    """A left-padded batch (one row with two images) gives each sample's tokens and contrastive logits alone."""
    from test_conformance import _take_last

    spec = inputs_for.__globals__["SPECS"][model.config.model_type]
    kw = dict(prune=prune, keep=0.25) if prune else {}
    vlmprune.patch(model, method="damro", top_k=3, **kw)
    batch = inputs_for(model, spec)
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        out_b = model.generate(
            **batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    for i in range(len(spec)):
        single = _take_last(inputs_for(model, [[] for _ in range(i)] + [spec[i]]), i, model)
        with torch.no_grad():
            out_s = model.generate(
                **single, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        assert out_b.sequences[i, L:].tolist() == out_s.sequences[0, single["input_ids"].shape[1] :].tolist()
        for lb, ls in zip(out_b.logits, out_s.logits, strict=True):
            assert torch.equal(torch.isfinite(lb[i]), torch.isfinite(ls[0]))
            fin = torch.isfinite(ls[0])
            torch.testing.assert_close(lb[i][fin], ls[0][fin], atol=1e-4, rtol=1e-4)


def test_main_branch_gets_the_budget_and_branch_is_short(model):
    inputs = inputs_for(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    tok = model.config.image_token_id
    n_img = [(ids[b][mask[b]] == tok).sum().item() for b in range(ids.shape[0])]
    vlmprune.patch(model, method="damro", prune="uniform", keep=0.25, top_k=2)
    with LLMProbe(model) as probe, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = vlmprune.last_stats(model)
    main, branch = probe.calls[0], probe.calls[1]  # prefill of the main branch, then of the contrastive one
    per_image = [i["tokens_in"] for i in stats["images"]]
    assert sum(per_image) == sum(n_img)
    expected = mask.sum(-1) - torch.tensor(n_img)
    for b in range(ids.shape[0]):
        expected[b] += sum(resolve_budget(0.25, i["tokens_in"]) for i in stats["images"] if i["row"] == b)
    assert torch.equal(valid_slots(main).sum(-1), expected)
    n_images = [sum(1 for i in stats["images"] if i["row"] == b) for b in range(ids.shape[0])]
    short = mask.sum(-1) - torch.tensor(n_img) + 2 * torch.tensor(n_images)
    assert torch.equal(valid_slots(branch).sum(-1), short)
    assert stats["damro"]["branch_tokens"] == short.tolist()
    assert sequence(branch).shape[1] == int(short.max())


def test_generation_config_is_honoured(model):
    """The contrast comes before generate's own processors: a near-zero temperature samples the greedy DAMRO
    tokens, and a repetition penalty changes them (the official code would silently ignore both)."""
    inputs = inputs_for(model)
    vlmprune.patch(model, method="damro", top_k=3)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        torch.manual_seed(0)
        cold = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1e-4, top_k=0)
        out = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            repetition_penalty=50.0,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(cold, greedy)
    # scores = logits after the repetition penalty: they differ from the contrastive logits where penalised
    assert any(not torch.equal(s.nan_to_num(), lg.nan_to_num()) for s, lg in zip(out.scores, out.logits, strict=True))


def test_unsupported_decoding_modes_raise(model):
    inputs = inputs_for(model)
    vlmprune.patch(model, method="damro")
    with pytest.raises(UnsupportedInputError, match="beam"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
    with torch.no_grad():  # still usable afterwards
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_text_only_generate_is_not_contrasted(model):
    ids = torch.randint(3, 100, (1, 7))
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    vlmprune.patch(model, method="damro")
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref)


def test_cls_score_refused_without_cls():
    model = get_model("qwen2_vl")
    with pytest.raises(vlmprune.errors.UnsupportedModelError, match="CLS"):
        vlmprune.patch(model, method="damro", score="cls_merged")
    assert not vlmprune.is_patched(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bfloat16_static_cache_and_several_samples(family):
    """bf16 weights (the contrast is mixed in float32), a static main cache, and num_return_sequences > 1."""
    from vlmprune.testing import tiny_model

    model = tiny_model(family, seed=2, dtype=torch.bfloat16)
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vlmprune.patched(model, method="damro", alpha=0.0), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)
    with vlmprune.patched(model, method="damro", top_k=3), torch.no_grad():
        dyn = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert dyn.logits[0].dtype == torch.float32
        static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
        assert torch.equal(static, dyn.sequences)
        many = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=3)
        assert many.shape[0] == 3 * inputs["input_ids"].shape[0]
        kv = vlmprune.last_stats(model)["damro"]["branch_kv_bytes"]
        assert kv and kv > 0
