"""Accuracy of a checkpoint on an offline benchmark, unpatched and under vlmprune settings.

Shared by the demo, the model cards (``python -m eval card``) and the harness. A *setting* is ``None``
(unpatched) or ``(method, keep)`` (:func:`setting_config`: ``"damro+hiprune"`` = DAMRO on top of HiPrune); every
setting answers the same rows, so accuracies can be compared pairwise
(:func:`vlmprune.benchmarks.paired_difference`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import vlmprune
from vlmprune.benchmarks import answer_questions, first_word, score
from vlmprune.benchmarks._processors import load_processor

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
SHIPPED = {
    "shapes-llava-tiny": "shapes",
    "shapes-qwen2vl-tiny": "shapes",
    "easyvqa-llava-tiny": "easyvqa",
}


def setting_config(method: str, keep: float | int) -> vlmprune.PruneConfig:
    """The config of one harness setting. ``method`` is a method name, ``"damro"`` (DAMRO on the whole image:
    ``keep`` must be 1.0), ``"damro+NAME"`` (DAMRO's contrast on top of method NAME at ``keep``) or
    ``"fastvlm:STRATEGY"`` (``resolution`` / ``encoder_pool`` / ``pool``; plain ``fastvlm`` = resolution)."""
    if method.startswith("damro+"):
        return vlmprune.make_config("damro", prune=method[6:], keep=keep)
    if method.startswith("fastvlm:"):
        return vlmprune.make_config("fastvlm", keep=keep, strategy=method[8:])
    return vlmprune.make_config(method, keep=keep)


def expand_settings(methods: list[str], keeps: list[float | int]) -> list[tuple[str, float | int]]:
    """``(method, keep)`` pairs of a sweep: every method at every keep, except ``"damro"`` alone (no pruning),
    which runs once at ``keep=1.0``."""
    out: list[tuple[str, float | int]] = []
    for m in methods:
        for k in [1.0] if m == "damro" else keeps:
            if (m, k) not in out:
                out.append((m, k))
    return out


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from a local folder: the model class is the one vlmprune's adapter for
    ``config.model_type`` names (every supported family). ``processor`` is ``None`` when the folder has no processor
    or tokenizer files (weights only: enough for ``eval run --benchmark none``, which times synthetic inputs)."""
    import transformers as tf
    from vlmprune.patches import ADAPTERS

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint folder")
    cfg = tf.AutoConfig.from_pretrained(path)
    if cfg.model_type not in ADAPTERS:
        raise ValueError(f"{path}: model_type {cfg.model_type!r} is not one of {ADAPTERS.names()}")
    cls = getattr(tf, ADAPTERS.get(cfg.model_type).hf_class)
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    return model, load_processor(path) if has_processor(path) else None


def has_processor(path: str | Path) -> bool:
    """Whether a checkpoint folder carries a processor or tokenizer (else it holds weights only)."""
    files = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    return any((Path(path) / f).is_file() for f in files)


def benchmark_size(name: str, split: str = "test") -> int:
    """How many rows ``benchmark_rows(name, split)`` gives without ``n`` (counted without building them)."""
    if name == "shapes":
        from vlmprune.benchmarks import shapes

        if split not in shapes.SPLIT_SIZES:
            raise ValueError(f"split {split!r} has no fixed size")
        return shapes.SPLIT_SIZES[split]
    if name == "easyvqa":
        from vlmprune.benchmarks import easyvqa

        return easyvqa.size(split)
    raise ValueError(f"unknown benchmark {name!r}; choose shapes or easyvqa")


def benchmark_rows(name: str, split: str = "test", n: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``name`` (``shapes`` | ``easyvqa``): ShapesVQA's first ``n``; easy-VQA's evenly spaced ``n``."""
    if name == "shapes":
        from vlmprune.benchmarks import shapes

        total = shapes.SPLIT_SIZES.get(split)
        if n is None:
            if total is None:
                raise ValueError(f"split {split!r} has no fixed size: pass n")
            n = total
        if total is not None and n > total:
            raise ValueError(f"the {split} split has {total} rows, asked for {n}")
        return [shapes.sample(split, i) for i in range(n)]
    if name == "shapes-pope":  # the existence question of every scene: POPE-style yes/no
        from vlmprune.benchmarks import shapes

        total = shapes.SPLIT_SIZES[split]
        n = total if n is None else n
        if n > total:
            raise ValueError(f"the {split} split has {total} scenes, asked for {n}")
        return [shapes.pope_sample(split, i) for i in range(n)]
    if name == "easyvqa":
        from vlmprune.benchmarks import easyvqa

        return easyvqa.rows(split, n)
    raise ValueError(f"unknown benchmark {name!r}; choose shapes, shapes-pope or easyvqa")


def priors(name: str, rows: list[dict[str, Any]], n_train: int = 5000) -> dict[str, Any]:
    """Blind baselines from the training split: the majority answer per question type, and the majority
    answer per exact question string (the best any image-blind model can do on these questions)."""
    train = _train_questions(name, n_train)
    by_type: dict[str, Counter] = {}
    by_question: dict[str, Counter] = {}
    for q, a, t in train:
        by_type.setdefault(t, Counter())[a] += 1
        by_question.setdefault(q, Counter())[a] += 1
    type_pred = [by_type[r["question_type"]].most_common(1)[0][0] for r in rows]
    q_pred = [(by_question.get(r["question"]) or by_type[r["question_type"]]).most_common(1)[0][0] for r in rows]
    a, b = score(type_pred, rows), score(q_pred, rows)
    return {
        "majority_per_type": {k: a[k] for k in ("accuracy", "per_type")},
        "majority_per_question": {k: b[k] for k in ("accuracy", "per_type")},
        "train_questions": len(train),
    }


def _train_questions(name: str, n: int) -> list[tuple[str, str, str]]:
    if name == "shapes":
        from vlmprune.benchmarks import shapes

        out = []
        for i in range(n):
            _, _, qs = shapes.scene_questions("train", i)
            out += [(q["question"], q["answer"], q["question_type"]) for q in qs]
        return out
    from vlmprune.benchmarks import easyvqa

    _, groups = easyvqa.grouped("train")
    return [(q, a, easyvqa._qtype(q, a)) for g in groups for q, a in g]


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    rows: list[dict[str, Any]],
    settings: list[tuple[str, float | int] | None],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One result per setting: accuracy overall / per type, the per-row 0/1 vector, vision tokens that reached
    the LLM per image (from ``vlmprune.last_stats``; FastV reports its LLM-internal budget) and seconds."""
    results = []
    iterator: Any = settings
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(settings, desc="settings", unit="setting")
    for setting in iterator:
        t0 = time.perf_counter()
        if setting is None:
            preds = answer_questions(model, processor, rows, batch_size=batch_size)
            tokens = None
        else:
            method, keep = setting
            with vlmprune.patched(model, setting_config(method, keep)):
                preds, tokens = [], []
                for i in range(0, len(rows), batch_size):
                    chunk = rows[i : i + batch_size]
                    preds += answer_questions(model, processor, chunk, batch_size=batch_size)
                    st = vlmprune.last_stats(model)
                    tokens += [im["tokens_out"] for im in st.get("images", [])]
        res = score(preds, rows)
        res.update(
            setting="unpatched" if setting is None else f"{setting[0]}@{setting[1]}",
            method=None if setting is None else setting[0],
            keep=None if setting is None else setting[1],
            vision_tokens_per_image=(sum(tokens) / len(tokens)) if tokens else None,
            seconds=time.perf_counter() - t0,
            examples=[
                {"q": r["question"], "a": r["answer"], "pred": first_word(p)}
                for r, p in zip(rows[:3], preds[:3], strict=True)
            ],
        )
        results.append(res)
    return results
