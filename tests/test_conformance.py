"""Conformance suite, generated over every registered method x every supported model family.

Properties checked (all measured on what the language model receives, not on vlmprune's own counters):
keep=1.0 is bit-identical to the unpatched model; the LLM gets exactly the budgeted vision tokens; a batch with
padding equals the samples run alone; Qwen tokens keep their original M-RoPE positions; unpatch restores
bit-identical behaviour and removes every hook and attribute.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    SPECS,
    LLMProbe,
    MRoPE,
    beam_spec,
    fastvlm_anyres_kept,
    fixed_counts,
    get_model,
    hook_snapshot,
    inputs_for,
    require,
    sequence,
    supports,
    valid_slots,
)

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.testing import FAMILIES

# DAMRO changes decoding (its keep=1.0 still contrasts generate()); tests/test_damro.py checks these invariants
# for it: alpha=0 and plain forwards are bit-identical, budgets with prune=, batch == singles, unpatch.
METHODS = [m for m in vlmprune.list_methods() if m != "damro"]
KEEPS = [0.25, 3]  # a fraction and an int count per image


@torch.no_grad()
def _gen(model, inputs, n=6, **kw):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def _image_token_id(model):
    return model.config.image_token_id


def _vision_counts(model, inputs):
    """Per row: list of vision-token counts per image, from the inputs (independent of vlmprune)."""
    counts = []
    ids = inputs["input_ids"]
    tok = _image_token_id(model)
    for row in ids:
        pos = (row == tok).nonzero().squeeze(-1).tolist()
        runs, prev = [], None
        for p in pos:
            if (
                prev is not None
                and p == prev + 1
                and (model.config.model_type != "llava" or runs[-1] < _llava_n(model))
            ):
                runs[-1] += 1
            else:
                runs.append(1)
            prev = p
        counts.append(runs)
    return counts


def _llava_n(model):
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(model, method, padding_side):
    require(model, method)
    inputs = inputs_for(model, padding_side=padding_side)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_ids = _gen(model, inputs)
    vlmprune.patch(model, method=method, keep=1.0)
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = _gen(model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)
    stats = vlmprune.last_stats(model)
    assert stats["vision_tokens_in"] == stats["vision_tokens_out"] > 0


def _fastvlm_counts(model, inputs, per_row, keep):
    """Per row: vision tokens ``fastvlm`` lets through, from each image's token grid (the input's geometry)."""
    from vlmprune.methods.fastvlm import target_side

    if model.config.model_type == "llava_next":  # every crop shrinks alike, the unpadding cuts cells
        counts = iter(fastvlm_anyres_kept(model, inputs, i, keep).numel() for i in range(len(inputs["image_sizes"])))
        return [sum(next(counts) for _ in row) for row in per_row]
    if model.config.model_type == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        grids = iter([(1, side, side)] * sum(len(r) for r in per_row))
    else:
        m = model.config.vision_config.spatial_merge_size
        grids = iter([(t, h // m, w // m) for t, h, w in inputs["image_grid_thw"].tolist()])
    out = []
    for row in per_row:
        total = 0
        for n in row:
            t, h, w = next(grids)
            assert t * h * w == n
            h2, w2 = target_side(h, w, max(1, resolve_budget(keep, n) // t))
            total += t * h2 * w2
        out.append(total)
    return out


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("method", METHODS)
def test_llm_receives_exactly_the_budget(model, method, keep):
    require(model, method)
    if method == "fastvlm" and model.config.model_type == "llava_next" and isinstance(keep, int):
        pytest.skip("fastvlm's encoder strategies need a fractional keep on anyres (tests/test_llava_next.py)")
    inputs = inputs_for(model)
    n_real = inputs["attention_mask"].sum(-1)
    per_row = _vision_counts(model, inputs)
    fixed = fixed_counts(model, inputs, per_row)
    expected_vision = torch.tensor(
        [
            sum(resolve_budget(keep, n - f) + f for n, f in zip(row, fr, strict=True))
            for row, fr in zip(per_row, fixed, strict=True)
        ]
    )
    if method == "fastvlm":  # a whole smaller grid: the largest one within the budget (tests/test_fastvlm.py)
        expected_vision = torch.tensor(_fastvlm_counts(model, inputs, per_row, keep))
    n_text = n_real - torch.tensor([sum(row) for row in per_row])
    vlmprune.patch(model, method=method, keep=keep)
    with LLMProbe(model, at_cut=True) as probe, torch.no_grad():
        model(**inputs)
    call = probe.calls[0]
    real = valid_slots(call)
    assert sequence(call).shape[1] == int((n_text + expected_vision).max())
    assert torch.equal(real.sum(-1), n_text + expected_vision)
    # the text tokens reach the LLM unchanged, in order
    emb = model.get_input_embeddings()
    tok = _image_token_id(model)
    for b in range(len(per_row)):
        ids_b = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        text_ref = emb(ids_b[ids_b != tok])
        if sequence(call) is not call.get("inputs_embeds"):
            continue  # inside the LLM (FastV) the rows are hidden states, not embeddings
        got = call["inputs_embeds"][b][real[b]]
        ptr = 0  # the text embeddings appear, unchanged and in order, among the real slots
        for row in got:
            if ptr < len(text_ref) and torch.equal(row, text_ref[ptr]):
                ptr += 1
        assert ptr == len(text_ref)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(model, method, padding_side):
    """Each row of a padded batch gives the logits (forward) and tokens (generate, left padding) of the sample
    run alone. Right padding is checked on forward logits only: generate() itself is not padding-invariant
    with right padding (transformers warns about it), patched or not."""
    require(model, method)
    spec = SPECS[model.config.model_type]
    vlmprune.patch(model, method=method, keep=0.25)
    batch = inputs_for(model, spec, padding_side=padding_side)
    with LLMProbe(model, at_cut=True) as probe, torch.no_grad():
        out_b = model(**batch).logits
    kept_mask = valid_slots(probe.calls[0])
    gen_b = _gen(model, batch) if padding_side == "left" else None
    L = batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    for i in range(len(spec)):
        # the same sample alone (make_inputs seeds by position: rebuild it at the same position, then cut)
        single = _take_last(inputs_for(model, [[] for _ in range(i)] + [spec[i]]), i, model)
        assert torch.equal(single["input_ids"][0], batch["input_ids"][i][mask[i].bool()])
        with torch.no_grad():
            out_s = model(**single).logits
        torch.testing.assert_close(out_b[i][kept_mask[i]], out_s[0], atol=1e-4, rtol=1e-4)
        if gen_b is not None:
            gen_s = _gen(model, single)[0, single["input_ids"].shape[1] :]
            assert torch.equal(gen_b[i, L : L + gen_s.numel()], gen_s)
            if L + gen_s.numel() < gen_b.shape[1]:  # the single stopped at EOS; the batch row is padded after it
                gc = model.generation_config
                assert int(gen_s[-1]) in torch.tensor(gc.eos_token_id).reshape(-1).tolist()
                assert bool((gen_b[i, L + gen_s.numel() :] == gc.pad_token_id).all())
            assert torch.equal(gen_b[i, :L], batch["input_ids"][i])  # prompt ids returned unchanged


def _take_last(inputs, i, model):
    """Row i of a batch built with empty rows before it (drops the empty rows and their padding)."""
    mask = inputs["attention_mask"][i].bool()
    out = {
        "input_ids": inputs["input_ids"][i : i + 1, mask],
        "attention_mask": inputs["attention_mask"][i : i + 1, mask],
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i : i + 1, mask]
    for k in (
        "pixel_values",
        "image_grid_thw",
        "image_sizes",
        "batch_num_images",
        "pixel_values_videos",
        "video_grid_thw",
    ):
        if k in inputs:
            out[k] = inputs[k]
    return out


@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_everything(model, method):
    require(model, method)
    inputs = inputs_for(model)
    before = hook_snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_ids = _gen(model, inputs)
    vlmprune.patch(model, method=method, keep=0.25)
    assert vlmprune.is_patched(model)
    with torch.no_grad():
        pruned = model(**inputs).logits
    _gen(model, inputs)
    assert pruned.shape[1] < ref.shape[1]
    vlmprune.unpatch(model)
    assert not vlmprune.is_patched(model)
    assert hook_snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(_gen(model, inputs), ref_ids)


@pytest.mark.parametrize("family", sorted(MRoPE))
# fastvlm's resolution strategy gives its tokens the smaller grid's positions: tests/test_fastvlm.py checks them
# against the unpatched model prompted with the smaller image
@pytest.mark.parametrize("method", [m for m in METHODS if m != "fastvlm"])
def test_qwen_keeps_original_mrope_positions(family, method):
    """Kept tokens carry original M-RoPE positions (a subset of their row's), and decoding continues exactly
    like the unpatched model. (Exact positions per kept embedding: the next test; FastV: tests/test_fastv.py.)"""
    model = get_model(family)
    require(model, method)
    inputs = inputs_for(model)
    with LLMProbe(model) as ref_probe, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vlmprune.patched(model, method=method, keep=0.25):
        with LLMProbe(model) as probe, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        entry = model._vlmprune_state.method.prunes_at_entry
    ref_pos, pos = ref_probe.calls[0]["position_ids"], probe.calls[0]["position_ids"]
    if entry:  # the pruned sequence is the LLM input
        valid = valid_slots(probe.calls[0])
        assert pos.shape[:-1] == ref_pos.shape[:-1] and pos.shape[-1] < ref_pos.shape[-1]
        for b in range(pos.shape[-2]):
            orig = {tuple(c) for c in ref_pos[1:, b, :].T.tolist()}
            got = {tuple(c) for c in pos[1:, b, valid[b]].T.tolist()}
            assert got <= orig and len(got) == int(valid[b].sum())
    else:  # in-LLM pruning: the LLM input is the original one
        assert torch.equal(pos, ref_pos)
    # decode steps continue from the original max position + 1, exactly like the unpatched model
    for step in (1, 2):
        assert torch.equal(probe.calls[step]["position_ids"], ref_probe.calls[step]["position_ids"])


@pytest.mark.parametrize("family", sorted(MRoPE))
def test_qwen_positions_from_independent_selection(family):
    """The kept embeddings sit at exactly the M-RoPE positions the unpatched model gave those embeddings."""
    model = get_model(family)
    inputs = inputs_for(model)
    with LLMProbe(model) as ref_probe, torch.no_grad():
        model(**inputs)
    with vlmprune.patched(model, method="random", keep=0.3, seed=7), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
    ref, got = ref_probe.calls[0], probe.calls[0]
    for b in range(ref["inputs_embeds"].shape[0]):
        real = got["attention_mask"][b].bool()
        ref_real = ref["attention_mask"][b].bool()
        for j in real.nonzero().squeeze(-1).tolist():
            match = (ref["inputs_embeds"][b] == got["inputs_embeds"][b, j]).all(-1) & ref_real
            src = match.nonzero().squeeze(-1)
            assert src.numel() >= 1
            assert any(torch.equal(ref["position_ids"][:, b, s], got["position_ids"][:, b, j]) for s in src.tolist())


def test_llava_contiguous_equals_unpatched_on_kept_tokens():
    """LLaVA (contiguous positions): pruned generate == the unpatched model fed only the kept embeddings."""
    model = get_model("llava")
    inputs = inputs_for(model, [[4, "image", 3]])
    vlmprune.patch(model, method="uniform", keep=0.25)
    try:
        with LLMProbe(model) as probe, torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        vlmprune.unpatch(model)
    kept = probe.calls[0]["inputs_embeds"]
    with torch.no_grad():
        ideal = model.generate(
            inputs_embeds=kept,
            attention_mask=torch.ones(kept.shape[:2], dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
        )
    assert torch.equal(ids[:, inputs["input_ids"].shape[1] :], ideal)


def test_llava_original_positions_keep_gaps():
    model = get_model("llava")
    inputs = inputs_for(model, [[4, "image", 3]])
    with vlmprune.patched(model, method="uniform", keep=0.25, position_mode="original"), LLMProbe(model) as probe:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    pos = probe.calls[0]["position_ids"][0]
    assert pos[-1].item() == inputs["input_ids"].shape[1] - 1  # last text token keeps its original position
    assert (pos[1:] > pos[:-1]).all() and pos.shape[0] < inputs["input_ids"].shape[1]
    assert probe.calls[1]["position_ids"][0, -1].item() == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_rows_in_a_batch(family):
    model = get_model(family)
    spec = [SPECS[family][0], [7]]
    batch = inputs_for(model, spec)
    with vlmprune.patched(model, method="uniform", keep=0.25):
        gen_b = _gen(model, batch)
        text = _take_last(inputs_for(model, [[], [7]]), 1, model)
        for k in ("pixel_values", "image_grid_thw", "image_sizes"):
            text.pop(k, None)
        gen_t = _gen(model, text)
    L = batch["input_ids"].shape[1]
    assert torch.equal(gen_b[1, L:], gen_t[0, text["input_ids"].shape[1] :])


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache(family):
    model = get_model(family)
    inputs = inputs_for(model)
    ref = _gen(model, inputs, cache_implementation="static")
    with vlmprune.patched(model, method="uniform", keep=1.0):
        assert torch.equal(_gen(model, inputs, cache_implementation="static"), ref)
    with vlmprune.patched(model, method="uniform", keep=0.25):
        dyn = _gen(model, inputs)
        static = _gen(model, inputs, cache_implementation="static")
    assert torch.equal(dyn, static)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_and_sampling_run(family):
    model = get_model(family)
    inputs = inputs_for(model, beam_spec(model))
    with vlmprune.patched(model, method="random", keep=0.25):
        beams = _gen(model, inputs, num_beams=2)
        torch.manual_seed(0)
        s1 = model.generate(**inputs, max_new_tokens=4, do_sample=True)
        torch.manual_seed(0)
        s2 = model.generate(**inputs, max_new_tokens=4, do_sample=True)
    assert beams.shape[0] == 2 and torch.equal(s1, s2)


@pytest.mark.parametrize("family", sorted(MRoPE))
def test_qwen_video_is_pruned(family):
    model = get_model(family)
    inputs = inputs_for(model, [[3, ("video", 2, 8, 8), 2], [2, ("image", 8, 8), 3]])
    with vlmprune.patched(model, method="uniform", keep=0.25), LLMProbe(model) as probe, torch.no_grad():
        model(**inputs)
        stats = vlmprune.last_stats(model)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kinds = sorted((i["kind"], i["tokens_in"], i["tokens_out"]) for i in stats["images"])
    assert kinds == [("image", 16, 4), ("video", 32, 8)]
    real = probe.calls[0]["attention_mask"].sum(-1)
    assert torch.equal(real, inputs["attention_mask"].sum(-1) - torch.tensor([24, 12]))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_generate_equals_cached(family):
    model = get_model(family)
    inputs = inputs_for(model)
    # a random model may generate the image token itself, which makes every uncached step fail the model's own
    # placeholder check (unpatched too): suppress the special tokens
    special = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    kw = {"suppress_tokens": [t for t in special if t is not None]}
    with vlmprune.patched(model, method="pool", keep=0.25):
        cached = _gen(model, inputs, **kw)
        uncached = _gen(model, inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_is_kept(family):
    model = get_model(family)
    impls_before = {n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")}
    conv_tower = family == "fast_vlm"  # (the tiny FastVLM's ConvNeXt tower has no attention: eager by construction)
    assert {v for n, v in impls_before.items() if not (conv_tower and "vision_tower" in n)} == {"sdpa"}
    with vlmprune.patched(model, method="uniform", keep=0.25), torch.no_grad():
        model(**inputs_for(model))
        impls = {n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")}
    assert impls == impls_before


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16(family):
    from vlmprune.testing import tiny_model

    model = tiny_model(family, seed=2, dtype=torch.bfloat16)
    inputs = inputs_for(model)
    ref = _gen(model, inputs)
    with vlmprune.patched(model, method="uniform", keep=1.0):
        assert torch.equal(_gen(model, inputs), ref)
    for method in [m for m in METHODS if supports(model, m)]:
        with vlmprune.patched(model, method=method, keep=0.25), LLMProbe(model) as probe:
            out = _gen(model, inputs)
        assert out.shape[0] == 2 and probe.calls[0]["inputs_embeds"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_local_roundtrip(family, tmp_path):
    """The real loading path: save to a local folder, load with from_pretrained(path, device_map=...), patch."""
    import transformers as tf

    src = get_model(family)
    src.save_pretrained(tmp_path)
    cls = type(src)
    model = cls.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32).eval()
    assert isinstance(model, tf.PreTrainedModel)
    inputs = inputs_for(model)
    with vlmprune.patched(model, method="uniform", keep=0.25):
        got = _gen(model, inputs)
    with vlmprune.patched(src, method="uniform", keep=0.25):
        want = _gen(src, inputs)
    assert torch.equal(got, want)
