"""generate() and forward() paths beyond the basic conformance suite: unpadded batches that prune unevenly,
single prompts with static caches, hand-written decode loops, prompt-lookup decoding, beams at keep=1.0."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import LLMProbe, beam_spec, get_model, inputs_for

import vlmprune
from vlmprune.testing import FAMILIES

# equal-length prompts (no padding) whose rows lose different numbers of tokens
UNPADDED = {
    "llava": [[16, "image", 4], [2, "image", 2, "image"]],
    "llava_next": [[16, "image", 14], [2, ("image", 56, 56), 2, ("image", 30, 100)]],  # 44 + 36 + 34 tokens
    "llava_onevision": [[16, "image", 14], [2, "image", 2, "image", 36]],  # 44; two base views of 17
    "qwen2_vl": [[2, ("image", 8, 8), 14], [2, ("image", 4, 4), 26]],
    "qwen2_5_vl": [[2, ("image", 8, 8), 14], [2, ("image", 4, 4), 26]],
    "qwen3_vl": [[2, ("image", 8, 8), 14], [2, ("image", 4, 4), 26]],
    "fast_vlm": [[16, "image", 4], [2, "image", 2, "image"]],
}


def _row(inputs, i):
    """Sample i of a batch built with empty samples before it, as a batch of one."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    out.update({k: v for k, v in inputs.items() if k not in out})
    return out


@torch.no_grad()
def _gen(model, inputs, n=5, **kw):
    kw.setdefault("suppress_tokens", [model.generation_config.eos_token_id])  # fixed-length outputs to compare
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_with_uneven_pruning_equals_singles(family, cache):
    model = get_model(family)
    spec = UNPADDED[family]
    batch = inputs_for(model, spec)
    assert batch["attention_mask"].all()  # no padding: generate() passes no mask at all on recent releases
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with vlmprune.patched(model, method="uniform", keep=0.25):
        seq_b, logits_b = _gen(model, batch, **kw)
        for i in range(2):
            single = _row(inputs_for(model, [[]] * i + [spec[i]]), i)
            seq_s, logits_s = _gen(model, single, **kw)
            torch.testing.assert_close(logits_b[i], logits_s[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(seq_b[i, batch["input_ids"].shape[1] :], seq_s[0, single["input_ids"].shape[1] :])


@pytest.mark.parametrize("family", FAMILIES)
def test_single_prompt_static_cache(family):
    model = get_model(family)
    inputs = inputs_for(model, [UNPADDED[family][0]])
    ref, _ = _gen(model, inputs, cache_implementation="static")
    with vlmprune.patched(model, method="uniform", keep=1.0):
        assert torch.equal(_gen(model, inputs, cache_implementation="static")[0], ref)
    with vlmprune.patched(model, method="pool", keep=0.25):
        assert torch.equal(_gen(model, inputs, cache_implementation="static")[0], _gen(model, inputs)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_long_text_only_row_sets_the_length(family):
    """The longest row loses nothing (Lp == L) while another is pruned: its mask must still be translated."""
    model = get_model(family)
    n = max(40, inputs_for(model, [UNPADDED[family][0]])["input_ids"].shape[1])  # at least the image row's length
    spec = [[n], UNPADDED[family][0]]
    batch = inputs_for(model, spec)
    with vlmprune.patched(model, method="uniform", keep=0.25):
        seq_b, _ = _gen(model, batch)
        assert vlmprune.last_stats(model)["seq_len_out"][0] == n == batch["input_ids"].shape[1]
        single = _row(inputs_for(model, [[], spec[1]]), 1)
        seq_s, _ = _gen(model, single)
    assert torch.equal(seq_b[1, n:], seq_s[0, single["input_ids"].shape[1] :])


def _cache_kw(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize(
    "family,options",
    [
        ("qwen2_vl", {}),
        ("qwen2_5_vl", {}),
        ("llava", {"position_mode": "original"}),
        ("llava", {"position_mode": "contiguous"}),
    ],
)
def test_hand_written_decode_loop_gets_generates_positions(family, options):
    """A manual loop (forward with the returned cache, no position_ids) decodes from the original positions."""
    model = get_model(family)
    inputs = inputs_for(model, [UNPADDED[family][0]])
    with vlmprune.patched(model, method="uniform", keep=0.25, **options):
        with LLMProbe(model) as gen_probe, torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        tokens = []
        with LLMProbe(model) as loop_probe, torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache = out.past_key_values
            for _ in range(3):
                nxt = out.logits[:, -1:].argmax(-1)
                tokens.append(nxt)
                out = model(input_ids=nxt, use_cache=True, **{_cache_kw(model): cache})
                cache = out.past_key_values
        n_kept = vlmprune.last_stats(model)["seq_len_out"][0]
    assert torch.equal(torch.cat(tokens, 1), seq[:, inputs["input_ids"].shape[1] :])
    for step in (1, 2):
        want = gen_probe.calls[step]["position_ids"]
        got = loop_probe.calls[step]["position_ids"]
        if got is None:  # contiguous LLaVA: the LLM numbers the pruned cache itself, 0..n_kept-1, n_kept, ...
            assert options.get("position_mode") == "contiguous" and want.item() == n_kept + step - 1
            continue
        assert torch.equal(got[-3:] if got.ndim == 3 else got, want[-3:] if want.ndim == 3 else want)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_decoding(family):
    from transformers.cache_utils import DynamicCache

    model = get_model(family)
    inputs = inputs_for(model, [[5, "image", 3, 5]])
    relative = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters
    with vlmprune.patched(model, method="uniform", keep=0.25):
        greedy, _ = _gen(model, inputs, n=12)
        if not relative:
            with pytest.raises(vlmprune.UnsupportedInputError, match="assisted / prompt-lookup"):
                _gen(model, inputs, n=12, prompt_lookup_num_tokens=3)
            return
        lookup, _ = _gen(model, inputs, n=12, prompt_lookup_num_tokens=3)
    assert torch.equal(greedy, lookup)


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_at_keep_all_equal_unpatched(family):
    model = get_model(family)
    inputs = inputs_for(model, beam_spec(model))
    ref, _ = _gen(model, inputs, num_beams=3, num_return_sequences=2)
    with vlmprune.patched(model, method="random", keep=1.0):
        got, _ = _gen(model, inputs, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, ref)


def test_labels_allowed_when_nothing_is_pruned():
    model = get_model("llava")
    inputs = inputs_for(model)
    with torch.no_grad():
        ref = model(**inputs, labels=inputs["input_ids"]).loss
        with vlmprune.patched(model, method="uniform", keep=1.0):
            assert torch.equal(model(**inputs, labels=inputs["input_ids"]).loss, ref)


def test_failed_replace_keeps_the_old_patch(monkeypatch):
    from vlmprune import _versions

    model = get_model("llava")
    with vlmprune.patched(model, method="uniform", keep=0.5):
        with pytest.raises(vlmprune.ConfigError):
            vlmprune.patch(model, method="pool", keep=2.0, replace=True)
        monkeypatch.setattr(_versions, "installed_version", lambda: "4.0.0")
        with pytest.raises(vlmprune.UnsupportedVersionError):
            vlmprune.patch(model, method="pool", keep=0.5, replace=True)
        monkeypatch.undo()
        assert vlmprune.get_config(model).name == "uniform"
        with torch.no_grad():
            model(**inputs_for(model))
        assert vlmprune.last_stats(model)["method"] == "uniform"


def test_config_object_is_copied():
    model = get_model("llava")
    cfg = vlmprune.UniformConfig(keep=0.25)
    with vlmprune.patched(model, cfg), torch.no_grad():
        cfg.keep = 3.0  # invalid, and after the fact: must not reach the patched model
        model(**inputs_for(model))
        assert vlmprune.last_stats(model)["keep"] == 0.25


def test_deepcopy_of_a_patched_model_is_refused_clearly():
    import copy

    model = get_model("llava")
    with vlmprune.patched(model, method="uniform", keep=0.25):
        with pytest.raises(vlmprune.UnsupportedInputError, match="deepcopy"):
            copy.deepcopy(model)
    copy.deepcopy(model)  # fine once unpatched
