"""Score a shipped checkpoint and write its model card: ``python -m eval card checkpoints/<name>``.

Evaluates the test split unpatched and with each vlmprune method at each budget (same rows for all, so the
differences carry paired 95 % confidence intervals), adds the image-blind baselines, and writes
``scores.json`` and ``README.md`` (recipe from ``training.json``, scores, usage) into the checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import vlmprune
from vlmprune.benchmarks import paired_difference

from .accuracy import SHIPPED, benchmark_rows, benchmark_size, evaluate, load_checkpoint, priors
from .timing import git_sha, machine_info

DEFAULT_METHODS = ["random", "uniform", "pool", "hiprune", "visionzip", "fastv", "vqtoken"]

BENCH_TEXT = {
    "shapes": (
        "ShapesVQA (`vlmprune.benchmarks.shapes`): 128 px scenes of 2-4 coloured shapes, a small low-contrast dot "
        "and high-contrast black/white distractors no question asks about; question types exist (POPE-style, "
        "adversarial negatives), count, attribute, spatial, small (the dot's colour); the test split's question "
        "types come in turn."
    ),
    "easyvqa": (
        "easy-VQA (the `easy-vqa` PyPI package, MIT): 64 px images of one coloured shape; question types shape, "
        "colour, yes/no. Trained on the package's training images 0-3499, validated on 3500-3999, tested on its "
        "test split."
    ),
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(d: dict[str, float]) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def card(path: Path, bench: str, n: int | None, methods: list[str], keeps: list[float], threads: int) -> dict:
    torch.set_num_threads(threads)
    model, processor = load_checkpoint(path)
    rows = benchmark_rows(bench, "test", n)
    t0 = time.perf_counter()
    settings: list[Any] = [None] + [(m, k) for k in keeps for m in methods]
    results = evaluate(model, processor, rows, settings)
    full = results[0]
    by = {r["setting"]: r for r in results}
    for r in results[1:]:
        r["vs_unpatched"] = paired_difference(r["correct"], full["correct"])
        rnd = by.get(f"random@{r['keep']}")
        if rnd is not None and rnd is not r:
            r["vs_random"] = paired_difference(r["correct"], rnd["correct"])
    blind = priors(bench, rows)
    info = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
    out = {
        "checkpoint": path.name,
        "benchmark": bench,
        "split": "test",
        "rows": len(rows),
        "split_rows": benchmark_size(bench, "test"),
        "blind_baselines": blind,
        "results": [{k: v for k, v in r.items() if k != "correct"} for r in results],
        "correct": {r["setting"]: "".join(map(str, r["correct"])) for r in results},
        "eval_minutes": round((time.perf_counter() - t0) / 60, 2),
        "machine": machine_info(),
        "git_sha": git_sha(),
        "vlmprune": vlmprune.__version__,
    }
    (path / "scores.json").write_text(json.dumps(out, indent=1) + "\n")
    (path / "README.md").write_text(_markdown(path, bench, info, out, model))
    return out


def _command(info: dict, bench: str) -> str:
    """The training command(s) that produced the checkpoint (every leg when it was continued with --init)."""
    legs = info.get("legs") or [info.get("args", {})]
    cmds = []
    for a in legs:
        c = (
            f"python -m eval train --family {a.get('family')} --data {a.get('data', bench)} --steps {a.get('steps')} "
            f"--batch {a.get('batch')} --lr {a.get('lr')} --seed {a.get('seed')}"
        )
        if a.get("arch"):
            c += " --arch " + " ".join(a["arch"])
        if a.get("init"):
            c += f" --init {a['init']}"
        cmds.append(c)
    return "` then `".join(cmds)


def _is_subset(out: dict) -> bool:
    return out["rows"] < out.get("split_rows", out["rows"])


def _subset(out: dict) -> str:
    """``test split, N questions``, or which ``N`` of the split's ``M`` questions were scored."""
    n = out["rows"]
    if _is_subset(out):  # benchmark_rows' subsets: ShapesVQA's first n, easy-VQA's evenly spaced n
        how = "the first" if out["benchmark"] == "shapes" else "evenly spaced"
        return f"{how} {n} of the test split's {out['split_rows']} questions"
    return f"test split, {n} questions"


def _n_flag(out: dict) -> str:
    return f" --n {out['rows']}" if _is_subset(out) else ""


def _markdown(path: Path, bench: str, info: dict, out: dict, model: torch.nn.Module) -> str:
    res = out["results"]
    full = res[0]
    types = list(full["per_type"])
    size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    arch = info.get("arch", {})
    args = info.get("args", {})
    cls = type(model).__name__
    n_vis = (arch.get("image_size", 0) // max(1, arch.get("patch_size", 1))) ** 2
    if model.config.model_type != "llava":
        n_vis //= 4
    lines = [
        f"# {path.name}",
        "",
        f"A small `{cls}` trained **from scratch** (random initialisation, no pretrained weights) by the vlmprune "
        f"project, so that token-pruning methods can be evaluated on a genuinely trained model offline. It is a "
        f"test instrument, not a general-purpose VLM: it knows only {bench!r}'s world.",
        "",
        "```python",
        f"from transformers import {cls}",
        "from vlmprune.benchmarks._processors import load_processor  # = AutoProcessor, image-only without "
        "torchvision",
        "",
        f'model = {cls}.from_pretrained("checkpoints/{path.name}")',
        f'processor = load_processor("checkpoints/{path.name}")',
        "```",
        "",
        "## Recipe",
        "",
        f"* Benchmark: {BENCH_TEXT[bench]}",
        f"* Architecture: {arch.get('image_size')} px images, ViT patch {arch.get('patch_size')}, "
        f"{arch.get('vit_layers')} ViT blocks of width {arch.get('vit_hidden')}, "
        f"{arch.get('llm_layers')} LLM layers of width {arch.get('llm_hidden')}; {n_vis} vision tokens per image "
        f"reach the LLM; word-level tokenizer of {model.config.get_text_config().vocab_size} entries; "
        f"{info.get('parameters', 0) / 1e6:.2f} M parameters ({size_mb:.1f} MB of weights).",
        f"* Training: `{_command(info, bench)}` (AdamW, warm-up {args.get('warmup')} steps then cosine, "
        f"{'bf16 autocast' if args.get('dtype') == 'bf16' else 'fp32'}, auxiliary image-level loss weight "
        f"{args.get('aux_weight')}); {info.get('images_seen')} training images, {info.get('train_minutes')} min on "
        f"{info.get('device', 'cpu')} with {info.get('threads')} threads (torch {info.get('torch')}), saved in "
        f"{args.get('save_dtype')}. Each image carries several questions as chat turns; the loss is on "
        "the answers only. The auxiliary loss (ShapesVQA only) is CLIP-like and image-level: a linear head on the "
        "tower's pooled output predicts which (colour, shape) pairs and which dot colour the image contains; it "
        "never sees a patch label, and the head is not part of the checkpoint.",
        "* Seeds: model initialisation and data stream seed " + str(args.get("seed")) + "; the benchmark's splits "
        "have their own fixed seeds (see the benchmark module).",
        "",
        f"## Scores ({_subset(out)}, greedy, exact match on the first word)",
        "",
        "| | overall | " + " | ".join(types) + " |",
        "|---|---|" + "---|" * len(types),
        f"| **this model, all tokens** | **{_pct(full['accuracy'])}** | "
        + " | ".join(_pct(full["per_type"][t]) for t in types)
        + " |",
    ]
    for key, label in (
        ("majority_per_question", "image-blind: majority answer per question"),
        ("majority_per_type", "answer prior: majority answer per type"),
    ):
        b = out["blind_baselines"][key]
        lines.append(
            f"| {label} | {_pct(b['accuracy'])} | " + " | ".join(_pct(b["per_type"].get(t, 0)) for t in types) + " |"
        )
    lines += [
        "",
        "Image-blind baselines, counted on "
        f"{out['blind_baselines']['train_questions']} training questions: the majority answer per exact question "
        "estimates the best any model without the image can do; the majority answer per type is the plain prior.",
        "",
        "## Token pruning (vlmprune, training-free)",
        "",
        "Accuracy (%) with each method at each budget; differences in points with paired 95 % confidence "
        "intervals (normal approximation on per-question differences, same questions for every setting).",
        "",
        "| method | keep | vision tokens | accuracy | vs all tokens | vs random at same keep | "
        + " | ".join(types)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(types),
    ]
    for r in res[1:]:
        vt = r["vision_tokens_per_image"]
        lines.append(
            f"| {r['method']} | {r['keep']} | {vt:.0f} | {_pct(r['accuracy'])} | {_ci(r['vs_unpatched'])} | "
            f"{_ci(r['vs_random']) if 'vs_random' in r else '—'} | "
            + " | ".join(_pct(r["per_type"][t]) for t in types)
            + " |"
        )
    lines += [
        "",
        "FastV prunes inside the LLM (from layer 2 on), so its vision-token count is the budget from that layer on. "
        f"Evaluation took {out['eval_minutes']} min on this machine; regenerate with "
        f"`python -m eval card checkpoints/{path.name}{_n_flag(out)}` (writes `scores.json` too, with per-question "
        "results).",
        "",
        "Licence: Apache-2.0, like vlmprune.",
        "",
    ]
    return "\n".join(lines)


ROOT = Path(__file__).resolve().parents[1]


def readme_table(root: Path = ROOT) -> str:
    """Rewrite README.md's checkpoint table from every ``checkpoints/*/scores.json``; returns the table rows."""
    lines = []
    for sj in sorted((root / "checkpoints").glob("*/scores.json")):
        sc = json.loads(sj.read_text())
        cfg = json.loads((sj.parent / "config.json").read_text())
        cls = (cfg.get("architectures") or ["?"])[0]
        full = sc["results"][0]
        toks = next((r["vision_tokens_per_image"] for r in sc["results"][1:] if r["keep"] == 1.0), None)
        blind = sc["blind_baselines"]["majority_per_question"]["accuracy"]
        vc = cfg["vision_config"]
        side = vc.get("image_size", 0) // vc.get("patch_size", 1)
        n_vis = toks or (side * side if cfg["model_type"] == "llava" else side * side // 4)
        lines.append(
            f"| `{sj.parent.name}` | `{cls}` | {n_vis} | {sc['benchmark']} ({sc['rows']} test questions) | "
            f"**{_pct(full['accuracy'])} %** (image-blind best {_pct(blind)} %) | "
            f"[card](checkpoints/{sj.parent.name}/README.md) |"
        )
    readme = root / "README.md"
    text = readme.read_text()
    start, end = "<!-- checkpoints-table:start -->", "<!-- checkpoints-table:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval card", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder (one of checkpoints/*)")
    p.add_argument("--benchmark", choices=["shapes", "easyvqa"], help="default: from the checkpoint's name")
    p.add_argument("--n", type=int, help="test rows (default: the whole split)")
    p.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, choices=[m for m in vlmprune.list_methods() if m != "damro"]
    )
    p.add_argument("--keep", nargs="+", type=float, default=[0.25, 0.11])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    path = Path(a.checkpoint)
    bench = a.benchmark or SHIPPED.get(path.name) or ("easyvqa" if "easyvqa" in path.name else "shapes")
    out = card(path, bench, a.n, a.methods, a.keep, a.threads)
    print(f"wrote {path / 'README.md'} and scores.json: all tokens {out['results'][0]['accuracy']:.3f}")
    readme_table()
