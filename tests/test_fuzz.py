"""Seeded fuzzing over every registered method x supported family x budget x batch layout x dtype x generate()
options. Each case either runs and satisfies the invariants, or raises a named vlmprune error; anything else
(a raw traceback, a silent no-op, a changed prompt) fails with the case that caused it.

New methods and families are covered without editing this file (they come from ``vlmprune.list_methods()`` and
``vlmprune.testing.FAMILIES``). The default run tries ``FUZZ_CASES`` cases (seeded, a few seconds each on the tiny
models); ``pytest -m slow tests/test_fuzz.py`` runs ten times more. Counts are printed at the end of the run.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import pytest
import torch
from conftest import ANYRES, LLMProbe, expands_images_per_beam, get_model, valid_slots

import vlmprune
from vlmprune.config import resolve_budget
from vlmprune.methods.fastvlm import target_side
from vlmprune.testing import FAMILIES, make_inputs, tiny_model

FUZZ_CASES = int(os.environ.get("VLMPRUNE_FUZZ_CASES", "200"))
COUNTS: Counter = Counter()

# what a case may legitimately be refused with (each documented where it is raised)
REFUSALS = (vlmprune.UnsupportedModelError, vlmprune.UnsupportedInputError, vlmprune.ConfigError)

_BF16: dict[str, torch.nn.Module] = {}


def _model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    if dtype == torch.float32:
        return get_model(family)
    if family not in _BF16:
        _BF16[family] = tiny_model(family, seed=1, dtype=torch.bfloat16)
    return _BF16[family]


def _image(rng: random.Random, family: str) -> Any:
    if family in ("llava", "fast_vlm"):
        return "image"
    if family in ANYRES:  # (H, W) in pixels: anyres crop grids, unpadding, interpolation
        if family == "llava_onevision" and rng.random() < 0.15:
            return ("video", 2)  # one batch's videos share a frame count (the processor stacks them)
        return ("image", *rng.choice([(48, 80), (30, 100), (112, 112), (56, 56), (100, 30)]))
    if rng.random() < 0.15:
        return ("video", 2, 4, 8)
    return ("image", *rng.choice([(4, 4), (8, 8), (8, 12), (4, 8), (12, 4)]))


def _case(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    family = rng.choice(FAMILIES)
    method = rng.choice(vlmprune.list_methods())
    keep: Any = rng.choice([1.0, 0.5, 0.25, 0.11, 0.05, 1, 2, 3, 64, 10_000])
    if method == "damro":
        keep = 1.0 if rng.random() < 0.5 else keep  # alone, or on a pruning method (below)
    whole = isinstance(keep, float) and keep == 1.0
    samples = []
    for _ in range(rng.randint(1, 4)):
        parts: list[Any] = [rng.randint(1, 6)]
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            parts += [_image(rng, family), rng.randint(0, 4)]
        samples.append([p for p in parts if p != 0])
    if not any(not isinstance(p, int) for s in samples for p in s):  # at least one image in the batch
        samples[0] += [_image(rng, family)]
    return {
        "seed": seed,
        "family": family,
        "method": method,
        "keep": keep,
        "prune": rng.choice(["uniform", "pool", "hiprune", "fastv"]) if method == "damro" and not whole else None,
        # (an int keep=1 is one token, not "all": DAMRO needs prune= for it, like any keep below 1.0)
        "samples": samples,
        "padding_side": rng.choice(["left", "left", "right"]),
        "dtype": torch.bfloat16 if rng.random() < 0.2 else torch.float32,
        "gen": rng.choice(["greedy", "greedy", "sample", "beams", "static"]),
    }


def _options(case: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"keep": case["keep"]}
    if case["prune"]:
        opts["prune"] = case["prune"]
    return opts


def _gen_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": 3, "do_sample": False}
    if case["gen"] == "sample":
        kw.update(do_sample=True, top_k=0)
    elif case["gen"] == "beams":
        kw.update(num_beams=2)
    elif case["gen"] == "static":
        kw.update(cache_implementation="static")
    return kw


def _describe(case: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


def _vision_counts(model: torch.nn.Module, inputs: dict[str, torch.Tensor], stats: dict[str, Any]) -> list[int]:
    """Per prefill row (beam search repeats each sample): the vision tokens of its images, from the stats, checked
    against the prompt's placeholders."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = len(stats["seq_len_in"])
    e = rows // len(ids)
    toks = {model.config.image_token_id, getattr(model.config, "video_token_id", None)}
    placeholders = [
        sum(int((ids[b // e][mask[b // e]] == t).sum()) for t in toks if t is not None) for b in range(rows)
    ]
    per_row = [sum(i["tokens_in"] for i in stats["images"] if i["row"] == b) for b in range(rows)]
    assert per_row == placeholders, (per_row, placeholders)
    return per_row


def _expected_refusal(case: dict[str, Any], inputs: dict[str, torch.Tensor]) -> str | None:
    """The documented refusal this case must meet (None: it must run). Any other outcome fails the case."""
    methods = {case["method"], case["prune"]} - {None}
    if case["family"] == "fast_vlm" and methods & {"hiprune", "visionzip"}:
        return "UnsupportedModelError"  # no ViT attention to read (README, patches/fast_vlm.py)
    if case["family"] in ("fast_vlm", "llava_onevision") and "fastvlm" in methods:
        return "UnsupportedModelError"  # fastvlm's default strategy (resolution): CLIP / Qwen-VL towers only
    if case["family"] == "llava_next" and "fastvlm" in methods and isinstance(case["keep"], int):
        return "ConfigError"  # every crop shrinks alike: keep must be a fraction on anyres
    if "fastvlm" in methods and inputs.get("video_grid_thw") is not None:
        m = 2  # the tiny Qwen configs' merge size
        for t, h, w in inputs["video_grid_thw"].tolist():
            if resolve_budget(case["keep"], t * (h // m) * (w // m)) < t:
                return "UnsupportedInputError"  # every frame keeps at least one token
    padded = bool((inputs["attention_mask"] == 0).any())
    if case["method"] == "damro" and (case["gen"] == "beams" or (case["padding_side"] == "right" and padded)):
        return "UnsupportedInputError"  # the contrastive branch follows neither beams nor right padding
    if "fastv" in methods and case["gen"] == "static":
        return "UnsupportedInputError"  # FastV's layers hold caches of different lengths
    return None


def run_case(case: dict[str, Any]) -> str:
    """Run one case; return "ran" or "refused:<error>"; raise AssertionError on a broken invariant."""
    model = _model(case["family"], case["dtype"])
    multi = any(sum(1 for p in s if not isinstance(p, int)) > 1 for s in case["samples"])
    if case["family"] in ANYRES and case["gen"] == "beams" and multi and expands_images_per_beam(model):
        return "skipped:multi-image beams"  # transformers' own bug here (see conftest.beam_spec), patched or not
    inputs = make_inputs(model, case["samples"], padding_side=case["padding_side"], seed=case["seed"])
    L = inputs["input_ids"].shape[1]
    kw = _gen_kwargs(case)
    expected_refusal = _expected_refusal(case, inputs)
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
    try:
        vlmprune.patch(model, method=case["method"], **_options(case))
    except REFUSALS as e:
        assert not vlmprune.is_patched(model)
        assert type(e).__name__ == expected_refusal, f"unexpected refusal: {e}"
        return f"refused:{type(e).__name__}"
    try:
        with LLMProbe(model) as probe, torch.no_grad():
            torch.manual_seed(case["seed"])
            try:
                out = model.generate(**inputs, **kw)
            except REFUSALS as e:
                assert type(e).__name__ == expected_refusal, f"unexpected refusal: {e}"
                return f"refused:{type(e).__name__}"
        stats = vlmprune.last_stats(model)
        config = vlmprune.get_config(model)
    finally:
        vlmprune.unpatch(model)
    assert expected_refusal is None, f"ran, but should have been refused with {expected_refusal}"
    # the caller's prompt comes back unchanged, followed by the new tokens, one row per sample (x beams: none)
    assert out.shape[0] == inputs["input_ids"].shape[0] and out.shape[1] <= L + kw["max_new_tokens"]
    assert torch.equal(out[:, :L], inputs["input_ids"])
    # budgets: every image's tokens_out is its budget (adaptive VQToken: at most), and the LLM saw exactly that
    entry = case["method"] != "fastv" and not (case["method"] == "damro" and case["prune"] in (None, "fastv"))
    prune_cfg = config.prune_config() if isinstance(config, vlmprune.DamroConfig) else config
    for im in stats["images"]:
        fixed = im.get("always_kept", 0)  # LLaVA-NeXT / OneVision newlines: kept outside the budget
        n = im["tokens_in"] - fixed
        want = (resolve_budget(prune_cfg.keep, n) if prune_cfg is not None else n) + fixed
        exact = getattr(prune_cfg, "adaptive", False) is not True
        if isinstance(prune_cfg, vlmprune.FastVLMConfig) and prune_cfg.strategy != "pool" and "parts" in im:
            exact = False  # anyres: at most the budget, a token per reduced cell the unpadding left (test_llava_next)
            assert all(p["tokens_out"] <= p.get("reduced_cells", 0) for p in im["parts"]), im
        elif isinstance(prune_cfg, vlmprune.FastVLMConfig) and prune_cfg.strategy != "pool":
            t, h, w = im["grid"]  # a whole smaller grid, the largest within the budget
            h2, w2 = target_side(h, w, max(1, want // t))
            want = t * h2 * w2
        assert im["tokens_out"] == want if exact else 1 <= im["tokens_out"] <= want, (im, want)
    vis_in = _vision_counts(model, inputs, stats)
    real = inputs["attention_mask"].sum(-1).repeat_interleave(len(vis_in) // len(inputs["input_ids"]))
    out_per_row = [sum(i["tokens_out"] for i in stats["images"] if i["row"] == b) for b in range(len(vis_in))]
    expected = [int(real[b]) - vis_in[b] + out_per_row[b] for b in range(len(vis_in))]
    assert stats["seq_len_out"] == expected, (stats["seq_len_out"], expected)  # (FastV: after its layer K)
    if entry and case["gen"] != "beams":  # the prefill the LLM really received (beams expand the rows)
        assert valid_slots(probe.calls[0]).sum(-1).tolist() == expected
    # keep everything: the unpatched model's exact output (DAMRO's contrast changes decoding by design)
    all_kept = all(i["tokens_out"] == i["tokens_in"] for i in stats["images"])
    if all_kept and case["method"] != "damro":
        assert torch.equal(out, ref)
    return "ran"


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_fuzz_case(seed):
    case = _case(seed)
    try:
        outcome = run_case(case)
    except AssertionError as e:
        raise AssertionError(f"invariant broken for case {_describe(case)}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the point: no raw traceback may escape
        raise AssertionError(f"raw {type(e).__name__} for case {_describe(case)}: {e}") from e
    COUNTS[outcome] += 1
    COUNTS[f"family:{case['family']}"] += 1
    COUNTS[f"method:{case['method']}"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10_000, 10_000 + 10 * FUZZ_CASES))
def test_fuzz_case_long(seed):
    test_fuzz_case(seed)


def test_fuzz_report():
    """The summary (runs last in this file): cases tried, how many ran / were refused and with what."""
    if not COUNTS:
        pytest.skip("no fuzz case ran in this session")
    tried = sum(v for k, v in COUNTS.items() if k == "ran" or k.startswith("refused:"))
    print(f"\nfuzz: {tried} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))
    assert COUNTS["ran"] > tried // 2  # refusals are the exception, not the rule
