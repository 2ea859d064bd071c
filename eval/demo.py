"""The README's demo: the shipped trained checkpoint, unpatched vs patched with a few methods and budgets.

Default: ``checkpoints/shapes-llava-tiny`` (a LLaVA trained from scratch on ShapesVQA, 256 vision tokens per
image) answers the first ``--n`` ShapesVQA test questions per setting; the table gives accuracy, the vision
tokens that reached the LLM, and prefill time (one batch, settings interleaved round-robin, median).

``--random-geometry demo|bench`` instead runs the earlier timing-only demo on a random-weight LLaVA-1.5-shaped
model (336 px, 576 vision tokens), where prefill is large enough for the speed-up to show.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import vlmprune
from vlmprune.testing import make_inputs, tiny_model

from .timing import interleaved, machine_info

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-llava-tiny"


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


def run_checkpoint(
    checkpoint: str, methods: list[str], keeps: list[float | int], n: int, rounds: int, out: str | None
) -> list[dict]:
    """Accuracy, vision tokens and prefill time of the trained checkpoint per setting."""
    from vlmprune.benchmarks import paired_difference, prompt_inputs

    from .accuracy import SHIPPED, benchmark_rows, evaluate, load_checkpoint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor = load_checkpoint(checkpoint)
    name = checkpoint.rstrip("/").split("/")[-1]
    bench = SHIPPED.get(name, "shapes")
    rows = benchmark_rows(bench, "test", n)
    settings: list[Any] = [None] + [(m, k) for k in keeps for m in methods]
    results = evaluate(model, processor, rows, settings)
    batch = prompt_inputs(processor, rows[:8])
    n_vision = int((batch["input_ids"][0] == model.config.image_token_id).sum())

    @torch.inference_mode()
    def prefill() -> torch.Tensor:
        return model(**batch, use_cache=True, logits_to_keep=1).logits[:, -1]

    fns: dict[str, Any] = {}
    for r in results:
        if r["method"] is None:
            fns[r["setting"]] = prefill
            continue

        def setup(m: str = r["method"], k: Any = r["keep"]) -> None:
            vlmprune.patch(model, method=m, keep=k)

        fns[r["setting"]] = (setup, prefill, lambda: vlmprune.unpatch(model))
    timing = interleaved(fns, rounds=rounds, warmup=1)
    base = results[0]
    print(
        f"\nvlmprune demo: {name} (trained from scratch, {n_vision} vision tokens per image), {len(rows)} "
        f"{bench} test questions per setting; prefill = median of {rounds} interleaved runs on a batch of 8\n"
    )
    hdr = f"{'setting':<18}{'vision tok @LLM':>16}{'accuracy':>10}{'vs all tokens (95% CI)':>26}{'prefill ms':>12}"
    print(hdr)
    print("-" * len(hdr))
    table = []
    for r in results:
        vt = n_vision if r["method"] is None else r["vision_tokens_per_image"]
        t = timing[r["setting"]]
        diff = "" if r is base else paired_difference(r["correct"], base["correct"])
        ci = "" if not diff else f"{100 * diff['diff']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
        print(f"{r['setting']:<18}{vt:>16.0f}{100 * r['accuracy']:>9.1f}%{ci:>26}{1000 * t['median_s']:>12.1f}")
        table.append(
            {
                "setting": r["setting"],
                "method": r["method"],
                "keep": r["keep"],
                "accuracy": r["accuracy"],
                "per_type": r["per_type"],
                "vision_tokens_at_llm": vt,
                "prefill_ms_median": 1000 * t["median_s"],
                "prefill_ms_min": 1000 * t["min_s"],
                "cpu_per_wall": t["cpu_per_wall"],
            }
        )
    print(
        "\n(fastv prunes after LLM layer 2: its budget applies from layer 2 on. A model this small spends most of "
        "its prefill outside the LLM, so the time saved is small here; see `--random-geometry demo` and "
        "results/bench_prefill_cpu.json for realistic geometry.)"
    )
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine_info(), "checkpoint": checkpoint, "rows": table}, f, indent=1)
        print(f"wrote {out}")
    return table


def run(methods: list[str], keeps: list[float | int], rounds: int, size: str, out: str | None) -> list[dict]:
    """The timing-only demo on a random-weight LLaVA-1.5-shaped model."""
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
    p.add_argument("--checkpoint", default=str(CHECKPOINT), help="a checkpoint folder (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["random", "uniform", "hiprune", "visionzip", "vqtoken"],
        choices=[m for m in vlmprune.list_methods() if m != "damro"],
        help="token-reduction methods (DAMRO changes decoding, not the prefill: see `python -m eval run`)",
    )
    p.add_argument("--keep", nargs="+", type=keep_arg, default=[0.25, 0.11])
    p.add_argument("--n", type=int, default=200, help="test questions per setting (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--random-geometry",
        choices=["tiny", "demo", "bench"],
        help="timing-only demo on a random-weight LLaVA of this geometry instead of the checkpoint",
    )
    p.add_argument("--out", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.random_geometry:
        run(a.methods, a.keep, a.rounds, a.random_geometry, a.out)
    else:
        run_checkpoint(a.checkpoint, a.methods, a.keep, a.n, a.rounds, a.out)
