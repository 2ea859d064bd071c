"""Prefill benchmark: is the patched model as fast as the ideal, and is keep=1.0 free?

One LLaVA-1.5-shaped random-weight model (CLIP-L-sized tower with 6 layers at 336 px -> 576 tokens, 12-layer
d=1024 Llama; ``vlmprune.testing.LLAVA_SIZES["bench"]``), one prompt (40 text tokens + 1 image), measured side by
side in one run, configurations interleaved round-robin after warm-up:

* ``unpatched``: the model as loaded;
* ``patched@1.0``: patched with keep=1.0 (must cost the same as unpatched);
* ``uniform@K``: patched with ``uniform`` at each budget K;
* ``ideal@K``: the *unpatched* model fed only the kept tokens: vision tower + projector on the image, the same
  uniform selection, then the unpatched forward on ``inputs_embeds`` of text + kept image tokens;
* ``<method>@K`` for every other ``--methods`` entry (e.g. ``hiprune``): its cost over ``uniform@K`` (same token
  count) is the method's selection overhead (for HiPrune: recomputing two ViT layers' attention + selection).

Every timed call is one forward with ``use_cache=True, logits_to_keep=1`` (generate's prefill step) under
``torch.inference_mode()``. Ratios come from medians of the same run. Writes JSON with the config, versions and
machine.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

import vlmprune
from vlmprune import stats
from vlmprune.methods.uniform import uniform_indices
from vlmprune.testing import make_inputs, tiny_model

from .demo import keep_arg
from .timing import interleaved, machine_info


def build(size: str, text_tokens: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_model("llava", size=size, seed=0)
    half = text_tokens // 2
    inputs = make_inputs(model, [[half, "image", text_tokens - half]])
    return model, inputs


def ideal_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor], keep: float | int) -> Any:
    """The unpatched model fed only the kept tokens, vision tower and projector included."""
    ids = inputs["input_ids"]
    img = ids[0] == model.config.image_token_id
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    k = vlmprune.make_config("uniform", keep=keep).budget(int(img.sum()))
    kept_rel = uniform_indices((1, side, side), k)
    text_pos = (~img).nonzero().squeeze(-1)
    first = int(img.nonzero()[0, 0])
    embed = model.get_input_embeddings()

    @torch.inference_mode()
    def run() -> torch.Tensor:
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        text = embed(ids[0, text_pos])
        emb = torch.cat([text[:first], feats[kept_rel], text[first:]])[None]
        mask = torch.ones(emb.shape[:2], dtype=torch.long)
        return model(inputs_embeds=emb, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m eval bench-prefill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--keep", nargs="+", type=keep_arg, default=[0.25, 0.11])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["hiprune", "visionzip", "fastv", "vqtoken"],
        help="methods timed beside uniform",
    )
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--size", default="bench", choices=["tiny", "demo", "bench"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="results/bench_prefill_cpu.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, inputs = build(a.size, a.text_tokens)

    @torch.inference_mode()
    def prefill() -> torch.Tensor:
        return model(**inputs, use_cache=True, logits_to_keep=1).logits

    def patched(keep: float | int, method: str = "uniform") -> tuple:
        return (lambda: vlmprune.patch(model, method=method, keep=keep), prefill, lambda: vlmprune.unpatch(model))

    fns: dict[str, Any] = {"unpatched": prefill, "patched@1.0": patched(1.0)}
    for k in a.keep:
        fns[f"uniform@{k}"] = patched(k)
        fns[f"ideal@{k}"] = ideal_fn(model, inputs, k)
        for m in a.methods:
            fns[f"{m}@{k}"] = patched(k, m)
    # sanity: the patched prefill and the ideal compute the same thing
    checks = {}
    for k in a.keep:
        with vlmprune.patched(model, method="uniform", keep=k):
            got = prefill()
        want = fns[f"ideal@{k}"]()
        checks[f"max_abs_diff_patched_vs_ideal@{k}"] = float((got - want).abs().max())
    res = interleaved(fns, rounds=a.rounds, warmup=2)
    med = {n: r["median_s"] for n, r in res.items()}
    ratios = {"patched@1.0/unpatched": med["patched@1.0"] / med["unpatched"]}
    for k in a.keep:
        ratios[f"uniform@{k}/ideal@{k}"] = med[f"uniform@{k}"] / med[f"ideal@{k}"]
        ratios[f"unpatched/uniform@{k}"] = med["unpatched"] / med[f"uniform@{k}"]
        for m in a.methods:
            ratios[f"{m}@{k}/uniform@{k}"] = med[f"{m}@{k}"] / med[f"uniform@{k}"]
            ratios[f"unpatched/{m}@{k}"] = med["unpatched"] / med[f"{m}@{k}"]
    # the analytic FLOP bound (vlmprune.stats), to read the measured speed-ups against
    vision, projector = stats.vision_flops(model.config, n_images=1)
    n_vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_vision
    flops = {}
    for k in [1.0, *a.keep]:
        n_img = vlmprune.make_config("uniform", keep=k).budget(n_vision)
        llm, head, decode = stats.llm_flops(model.config.text_config, n_text + n_img)
        flops[f"@{k}"] = stats.FlopBreakdown(vision, projector, llm, head, decode).to_dict()
        if "fastv" in a.methods:  # FastV: the first K LLM layers still see every token
            K = vlmprune.make_config("fastv").layer
            llm, head, decode = stats.llm_flops_in_llm_pruning(
                model.config.text_config, n_text + n_vision, n_text + n_img, K
            )
            flops[f"fastv@{k}"] = stats.FlopBreakdown(vision, projector, llm, head, decode).to_dict()
    for k in a.keep:
        ratios[f"flops_bound_unpatched/@{k}"] = flops["@1.0"]["prefill"] / flops[f"@{k}"]["prefill"]
        if f"fastv@{k}" in flops:
            ratios[f"flops_bound_unpatched/fastv@{k}"] = flops["@1.0"]["prefill"] / flops[f"fastv@{k}"]["prefill"]
    n_params = sum(p.numel() for p in model.parameters())
    out = {
        "benchmark": "prefill",
        "config": {
            "model": f"llava random-weight size={a.size}",
            "params": n_params,
            "keep": a.keep,
            "method": "uniform",
            "text_tokens": a.text_tokens,
            "vision_tokens": n_vision,
            "rounds": a.rounds,
            "warmup": 2,
            "dtype": "float32",
            "attn_implementation": model.config._attn_implementation,
        },
        "machine": machine_info(),
        "timings": res,
        "ratios": ratios,
        "analytic_flops": flops,
        "checks": checks,
    }
    print(
        f"\nprefill, median of {a.rounds} interleaved rounds ({out['machine']['cpu']}, "
        f"{out['machine']['torch_threads']} threads)"
    )
    for n, r in res.items():
        print(
            f"  {n:<16} median {1000 * r['median_s']:8.1f} ms   min {1000 * r['min_s']:8.1f} ms   "
            f"cpu/wall {r['cpu_per_wall']:.2f}"
        )
    for n, v in ratios.items():
        print(f"  {n:<32} {v:.3f}")
    for n, v in checks.items():
        print(f"  {n:<36} {v:.2e}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")
