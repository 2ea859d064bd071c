"""The README's demo: one model, unpatched vs patched with each baseline, side by side.

For now the model is a LLaVA-1.5-shaped *random-weight* model built offline (336 px, 576 vision tokens per
image, small widths), so the demo shows what the patch does to the sequence and to prefill time; accuracy needs
a trained checkpoint (the shipped ones replace this model once they exist).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

import vlmprune
from vlmprune.testing import make_inputs, tiny_model

from .timing import interleaved, machine_info


def _llm_tokens(model: torch.nn.Module, fn: Any) -> tuple[int, Any]:
    """Run ``fn`` and count the tokens the language model really receives (a hook registered after vlmprune's,
    so it sees the rewritten inputs)."""
    seen: dict[str, int] = {}

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        emb = kwargs["inputs_embeds"]
        seen["n"] = int(mask.sum()) if mask is not None else int(emb.shape[0] * emb.shape[1])

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return seen["n"], out


def run(methods: list[str], keeps: list[float | int], rounds: int, size: str, out: str | None) -> list[dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = tiny_model("llava", size=size, seed=0)
    inputs = make_inputs(model, [[40, "image", 12]])
    n_vision = int((inputs["input_ids"] == model.config.image_token_id).sum())

    @torch.inference_mode()
    def prefill() -> torch.Tensor:
        return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]

    # reference next-token prediction of the unpatched model, to show how much the answer moves
    llm_ref, ref_logits = _llm_tokens(model, prefill)
    settings: list[tuple[str, Any]] = [("unpatched", None)] + [(m, k) for m in methods for k in keeps]
    rows, fns = [], {}
    for name, keep in settings:
        if keep is None:
            fns[name] = prefill
            continue
        label = f"{name}@{keep}"

        def setup(name: str = name, keep: Any = keep) -> None:
            vlmprune.patch(model, method=name, keep=keep)

        fns[label] = (setup, prefill, lambda: vlmprune.unpatch(model))
    timing = interleaved(fns, rounds=rounds, warmup=1)
    base = timing["unpatched"]["median_s"]
    for label in fns:
        method, _, keep = label.partition("@")
        if label == "unpatched":
            llm_tokens, logits = llm_ref, ref_logits
        else:
            with vlmprune.patched(model, method=method, keep=keep_arg(keep)):
                llm_tokens, logits = _llm_tokens(model, prefill)
        row = {
            "setting": label,
            "method": method,
            "keep": keep_arg(keep) if keep else None,
            "vision_tokens_in": n_vision,
            "llm_tokens": llm_tokens,
            "vision_tokens_at_llm": llm_tokens - (llm_ref - n_vision),
            "prefill_ms_median": 1000 * timing[label]["median_s"],
            "prefill_ms_min": 1000 * timing[label]["min_s"],
            "speedup_vs_unpatched": base / timing[label]["median_s"],
            "same_next_token": bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()),
            "cpu_per_wall": timing[label]["cpu_per_wall"],
        }
        rows.append(row)
    print(
        f"\nvlmprune demo: random-weight LLaVA-1.5-shaped model ({size}), 1 image = {n_vision} vision tokens, "
        f"{llm_ref - n_vision} text tokens; median of {rounds} interleaved prefills\n"
    )
    hdr = f"{'setting':<16}{'vision tok @LLM':>16}{'LLM seq':>9}{'prefill ms':>12}{'speed-up':>10}{'same top-1':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['setting']:<16}{r['vision_tokens_at_llm']:>16}{r['llm_tokens']:>9}{r['prefill_ms_median']:>12.1f}"
            f"{r['speedup_vs_unpatched']:>9.2f}x{str(r['same_next_token']):>12}"
        )
    print("\n(random weights: 'same top-1' only shows how far the prediction moves; accuracy needs a trained model)")
    if any(r["method"] == "fastv" for r in rows):
        print("(fastv prunes after LLM layer 2: its LLM input is whole, the budget applies from layer 2 on)")
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine_info(), "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return rows


def keep_arg(text: str) -> float | int:
    """``--keep`` values: ``0.25`` is a fraction, ``64`` a token count per image."""
    return int(text) if text.isdigit() else float(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval demo", description=__doc__)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["uniform", "random", "pool", "hiprune", "visionzip", "fastv", "vqtoken"],
        choices=vlmprune.list_methods(),
    )
    p.add_argument("--keep", nargs="+", type=keep_arg, default=[0.25, 0.11])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", default="demo", choices=["tiny", "demo", "bench"])
    p.add_argument("--out", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    run(a.methods, a.keep, a.rounds, a.size, a.out)
