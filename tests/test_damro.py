"""DAMRO: the pure functions against slow references, the contrastive decoding against a step-by-step reference
without any cache (LLaVA with the official merged-head CLS score; Qwen2-VL with M-RoPE positions), and the
invariants: alpha=0 / plain forwards are untouched, batches equal singles, composition with pruning, unpatch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LLMProbe, fixed_counts, get_model, hook_snapshot, inputs_for, require, sequence, valid_slots

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.errors import ConfigError, UnsupportedInputError
from vlmprune.methods.damro import FLOOR_MARGIN, DamroConfig, cls_attention_scores, contrast_logits, select_outliers


def plausible(logits: torch.Tensor) -> torch.Tensor:
    """Which entries are in DAMRO's plausible set: the others sit FLOOR_MARGIN below the lowest plausible one."""
    return logits > logits.amax(-1, keepdim=True) - FLOOR_MARGIN / 2


def assert_same_contrast(got: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    """Same plausible set (``ref`` may mark the rest -inf, as the paper does) and the same values on it."""
    keep = torch.isfinite(ref) if torch.isinf(ref).any() else plausible(ref)
    assert torch.equal(plausible(got), keep)
    torch.testing.assert_close(got[keep].double(), ref[keep].double(), atol=atol, rtol=1e-4)


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
    ok = p >= beta * p.amax(-1, keepdim=True)
    assert torch.equal(plausible(out), ok)
    assert torch.allclose(out[ok], ((1 + alpha) * main - alpha * cd)[ok], atol=1e-5)
    assert bool(ok.gather(1, main.argmax(-1, keepdim=True)).all())  # the main branch's top token is always in
    for r in range(out.shape[0]):  # the rest: a finite floor far below, ranked like the main branch
        low, high = out[r][~ok[r]], out[r][ok[r]]
        assert torch.isfinite(low).all() and bool(low.max() <= high.min() - FLOOR_MARGIN + 1)
        assert torch.equal(torch.argsort(low, stable=True), torch.argsort(main[r][~ok[r]], stable=True))
        assert float(torch.softmax(out[r], -1)[~ok[r]].sum()) == 0.0  # no sampler can tell it from -inf
    assert torch.equal(contrast_logits(main, cd, alpha, 0.0), (1 + alpha) * main - alpha * cd)  # beta=0 keeps all
    assert torch.equal(contrast_logits(main, cd, 0.0, 0.0), main)


def test_config_validation_and_roundtrip():
    for bad in (
        dict(alpha=-1),
        dict(beta=1.5),
        dict(top_k=0),
        dict(score="cls"),
        dict(order="x"),
        dict(keep=0.25),
        dict(keep=1),  # an int is a token count: one token, which needs a pruning method
    ):
        with pytest.raises(ConfigError):
            DamroConfig(**bad)
    with pytest.raises(vlmprune.errors.UnknownMethodError, match="Did you mean 'hiprune'"):
        vlmprune.make_config("damro", prune="hiprun", keep=0.25)
    with pytest.raises(ConfigError, match="conflicts"):
        DamroConfig(keep=0.5, prune=vlmprune.make_config("uniform", keep=0.25))
    # fastvlm's encoder strategies shrink the tower DAMRO reads its outliers from; its post-encoder pool does not
    with pytest.raises(ConfigError, match="full tower"):
        vlmprune.make_config("damro", prune="fastvlm", keep=0.25)
    with pytest.raises(ConfigError, match="strategy='pool'"):
        DamroConfig(prune=vlmprune.make_config("fastvlm", keep=0.25, strategy="encoder_pool"))
    assert DamroConfig(prune=vlmprune.make_config("fastvlm", keep=0.25, strategy="pool")).keep == 0.25
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
    stacks = probe.calls[0].get("deepstack_visual_embeds")  # Qwen3-VL: the outliers bring their own DeepStack rows
    if stacks is not None:
        cd_stacks = [d[outliers] for d in stacks]
        cd_vis = torch.zeros(len(order), dtype=torch.bool)
        cd_vis[int(img[0]) : int(img[0]) + len(outliers)] = True
    if mrope:
        cd_pos = pos[..., order]
        nxt = int(pos.max()) + 1
    lm, embed = model.model.language_model, model.get_input_embeddings()
    gen, mixed = [], []
    for t in range(steps):
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], torch.tensor([gen], dtype=torch.long)], 1))
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if mrope:  # positions given: some releases' get_rope_index trips over a generated <vision_start> id
            full["position_ids"] = torch.cat([pos, torch.arange(nxt, nxt + t).expand(*pos.shape[:-1], t)], -1)
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
        extra = {}
        if stacks is not None:
            mask = torch.cat([cd_vis, torch.zeros(t, dtype=torch.bool)])[None]
            extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": cd_stacks}
        cd = model.lm_head(lm(inputs_embeds=seq[None], position_ids=p, **extra).last_hidden_state[0, -1])
        m = _mix(main, cd, alpha, beta)
        mixed.append(m)
        gen.append(int(m.argmax()))
    return gen, torch.stack(mixed)


def _check_against_reference(model, inputs, got, ref_gen, ref_mixed):
    L = inputs["input_ids"].shape[1]
    assert got.sequences[0, L:].tolist() == ref_gen
    for t, lg in enumerate(got.logits):
        assert_same_contrast(lg[0], ref_mixed[t], atol=2e-4)


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


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
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
    if prune:
        require(model, prune)
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
    if prune:
        require(model, prune)
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
            assert_same_contrast(lb[i], ls[0])


def test_main_branch_gets_the_budget_and_branch_is_short(model):
    inputs = inputs_for(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    tok = model.config.image_token_id
    n_img = [(ids[b][mask[b]] == tok).sum().item() for b in range(ids.shape[0])]
    from test_conformance import _vision_counts

    per_row = _vision_counts(model, inputs)  # placeholder count per image, from the inputs
    fixed = fixed_counts(model, inputs, per_row)  # LLaVA-NeXT's newline tokens: kept outside the budget
    vlmprune.patch(model, method="damro", prune="uniform", keep=0.25, top_k=2)
    with LLMProbe(model) as probe, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    stats = vlmprune.last_stats(model)
    main, branch = probe.calls[0], probe.calls[1]  # prefill of the main branch, then of the contrastive one
    per_image = [i["tokens_in"] for i in stats["images"]]
    assert sum(per_image) == sum(n_img)
    assert [i["tokens_in"] for i in sorted(stats["images"], key=lambda i: i["row"])] == sum(per_row, [])
    expected = mask.sum(-1) - torch.tensor(n_img)
    for b in range(ids.shape[0]):
        expected[b] += sum(resolve_budget(0.25, n - f) + f for n, f in zip(per_row[b], fixed[b], strict=True))
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
    # the penalty is applied to the contrastive logits: scores = penalty(logits) over the tokens seen so far
    L = inputs["input_ids"].shape[1]
    pad = int(inputs["input_ids"][inputs["attention_mask"] == 0][0])
    for t, (sc, lg) in enumerate(zip(out.scores, out.logits, strict=True)):
        seen = torch.zeros_like(lg, dtype=torch.bool)
        for b in range(seen.shape[0]):  # the row's real prompt tokens and what it generated so far (pads excluded)
            ids = torch.cat([inputs["input_ids"][b][inputs["attention_mask"][b].bool()], out.sequences[b, L : L + t]])
            seen[b, ids] = True
        expected = torch.where(seen, torch.where(lg > 0, lg / 50.0, lg * 50.0), lg)
        other = torch.arange(lg.shape[-1]) != pad  # whether pads count as seen differs across transformers releases
        torch.testing.assert_close(sc[:, other], expected[:, other])
    assert not torch.equal(out.sequences, greedy)  # and it changes the answer


def test_processors_that_ban_every_plausible_token_fall_back_to_the_main_ranking(model):
    """beta=1 leaves one plausible token; suppressing it must not yield an all -inf row (token 0 / a crash):
    decoding falls back to the main branch's ranking, i.e. the unpatched model with the same suppression."""
    inputs = inputs_for(model)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, L:].flatten().tolist()
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=first)
        vlmprune.patch(model, method="damro", top_k=3, beta=1.0)
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=first)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, suppress_tokens=first)
    assert torch.equal(got, ref)
    assert not set(sampled[:, L:].flatten().tolist()) & set(first)


@pytest.mark.parametrize("prune", [None, "uniform", "hiprune", "visionzip", "fastv"])
def test_beta_one_keeps_the_main_branch_choice(model, prune):
    """With beta=1 only the main branch's best token is plausible, so greedy DAMRO (alpha > 0, second branch
    running) must give exactly the tokens of the model (or the pruning method) alone: the branch disturbs nothing,
    FastV's in-LLM hooks included."""
    if prune:
        require(model, prune)
    inputs = inputs_for(model)
    kw = dict(prune=prune, keep=0.25) if prune else {}
    if prune:
        vlmprune.patch(model, method=prune, keep=0.25)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    if prune:
        vlmprune.unpatch(model)
    vlmprune.patch(model, method="damro", top_k=3, beta=1.0, **kw)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, ref)
    assert vlmprune.last_stats(model)["damro"]["branch_tokens"]


def test_unsupported_decoding_modes_raise(model):
    inputs = inputs_for(model)
    vlmprune.patch(model, method="damro")
    with pytest.raises(UnsupportedInputError, match="beam"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(UnsupportedInputError, match="left"):
        model.generate(**inputs_for(model, padding_side="right"), max_new_tokens=2)
    with torch.no_grad():  # still usable afterwards
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_text_only_rows_of_a_mixed_batch_are_not_contrasted(model):
    image = "image" if model.config.model_type == "llava" else ("image", 8, 8)
    inputs = inputs_for(model, [[5, image, 3], [9]])
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with vlmprune.patched(model, method="damro", top_k=3, beta=0.5):
            got = model.generate(**inputs, **kw)
    assert torch.equal(got.sequences[1], ref.sequences[1])
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a[1], b[1].float())  # untouched: no plausibility cut, no contrast
    assert not plausible(got.logits[0][0]).all()  # while the image row is cut


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
    # one image per row (transformers <= 5.12 expands LLaVA's pixel_values per image, not per sample, for
    # num_return_sequences: wrong even unpatched)
    spec = (
        [[5, "image", 3], [2, "image", 4]]
        if family == "llava"
        else [[5, ("image", 8, 8), 3], [2, ("image", 8, 12), 4]]
    )
    inputs = inputs_for(model, spec)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vlmprune.patched(model, method="damro", alpha=0.0), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)
    with vlmprune.patched(model, method="damro", top_k=3), torch.no_grad():
        dyn = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        static = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            cache_implementation="static",
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(static.sequences, dyn.sequences)
        for a, b in zip(static.logits, dyn.logits, strict=True):
            assert_same_contrast(a, b, atol=1e-3)
        many = model.generate(
            **inputs,
            max_new_tokens=1,
            do_sample=True,
            num_return_sequences=3,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert many.sequences.shape[0] == 3 * inputs["input_ids"].shape[0]
        for row in range(many.sequences.shape[0]):  # every copy gets its sample's contrastive logits
            assert_same_contrast(many.logits[0][row], dyn.logits[0][row // 3], atol=1e-3)
        kv = vlmprune.last_stats(model)["damro"]["branch_kv_bytes"]
        assert kv and kv > 0
