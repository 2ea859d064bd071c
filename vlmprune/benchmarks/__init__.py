"""Offline VQA benchmarks and the scoring used by the demo, the harness, the notebooks and the tests.

* :mod:`vlmprune.benchmarks.shapes` — ShapesVQA, the project's deterministic synthetic benchmark.
* :mod:`vlmprune.benchmarks.easyvqa` — the ``easy-vqa`` PyPI dataset (MIT) as rows of the same form.

A *row* is a mapping with at least ``image`` (PIL), ``question``, ``answer`` and ``question_type``. Models are
prompted through their processor's chat template (one user turn: the image, then the question), answers are
generated greedily, and a prediction is correct when its first word equals the answer (case-insensitive).

Nothing here is imported by ``import vlmprune``; it needs Pillow (and ``datasets`` for the ``Dataset`` helpers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._processors import load_processor

__all__ = [
    "answer_questions",
    "first_word",
    "load_processor",
    "paired_difference",
    "pope_answer",
    "pope_metrics",
    "prompt_inputs",
    "score",
]


def first_word(text: str) -> str:
    """The first word of ``text``, lower-cased, without punctuation (``" Red, I think"`` -> ``"red"``)."""
    m = re.search(r"[a-z0-9]+", text.lower())
    return m.group(0) if m else ""


def prompt_inputs(processor: Any, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Batch ``rows`` into model inputs: one user turn (image, question) with the generation prompt.

    Uses the processor's chat template; the tokenizer pads on the left so generation continues every row.
    """
    texts = []
    for r in rows:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return processor(images=[r["image"] for r in rows], text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side


@torch.inference_mode()
def answer_questions(
    model: torch.nn.Module,
    processor: Any,
    rows: Iterable[Any],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 3,
    progress: bool = False,
) -> list[str]:
    """Greedy answers of ``model`` to ``rows`` (decoded new text, special tokens removed), in order."""
    rows = list(rows)
    out: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="answering", unit="q")
    device = next(model.parameters()).device
    pad = processor.tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        inputs = prompt_inputs(processor, chunk).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = gen[:, inputs["input_ids"].shape[1] :]
        out += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def score(predictions: Sequence[str], rows: Sequence[Any]) -> dict[str, Any]:
    """Exact first-word accuracy overall and per ``question_type``; ``correct`` is the per-row 0/1 list; ``pope``
    the POPE metrics of the existence rows (:func:`pope_metrics`, ``None`` without any)."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    correct = [int(first_word(p) == first_word(r["answer"])) for p, r in zip(predictions, rows, strict=True)]
    per: dict[str, list[int]] = {}
    for c, r in zip(correct, rows, strict=True):
        per.setdefault(r["question_type"], []).append(c)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per.items())},
        "correct": correct,
        "pope": pope_metrics(predictions, rows),
    }


def pope_answer(text: str) -> str:
    """A free-form reply read as POPE's evaluation script reads it: ``"no"`` if its first sentence (commas removed,
    split on spaces) contains the word ``no``, ``No`` or ``not``, else ``"yes"`` — so an off-topic reply counts as
    a "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_metrics(predictions: Sequence[str], rows: Sequence[Any]) -> dict[str, Any] | None:
    """POPE metrics over the yes/no existence rows (``question_type == "exist"``), "yes" being the positive class.

    Replies are read with POPE's own rule (:func:`pope_answer`). Returns ``None`` when there are no such rows,
    else ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (share of "yes": a hallucinating model
    says "yes" too often), ``n``, ``unanswered`` (replies whose first word is neither yes nor no; POPE reads them
    as "yes", and so do these metrics, while :func:`score`'s exact-match accuracy counts them wrong), and the same
    per ``subtype`` of the negatives (``adversarial`` / ``popular`` / ``random``, each with all the positives, as
    POPE reports its three splits).
    """
    pairs = [
        (pope_answer(p), first_word(r["answer"]), r.get("subtype"), first_word(p))
        for p, r in zip(predictions, rows, strict=True)
        if r["question_type"] == "exist"
    ]
    if not pairs:
        return None

    def metrics(sel: list[tuple[str, str, Any, str]]) -> dict[str, Any]:
        tp = sum(p == "yes" and a == "yes" for p, a, _, _ in sel)
        fp = sum(p == "yes" and a == "no" for p, a, _, _ in sel)
        fn = sum(p == "no" and a == "yes" for p, a, _, _ in sel)
        correct = sum(p == a for p, a, _, _ in sel)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        return {
            "accuracy": correct / len(sel),
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "yes_ratio": sum(p == "yes" for p, _, _, _ in sel) / len(sel),
            "n": len(sel),
            "unanswered": sum(w not in ("yes", "no") for _, _, _, w in sel),
        }

    out = metrics(pairs)
    positives = [x for x in pairs if x[1] == "yes"]
    subtypes = sorted({s for _, a, s, _ in pairs if a == "no" and s is not None})
    out["per_subtype"] = {s: metrics(positives + [x for x in pairs if x[1] == "no" and x[2] == s]) for s in subtypes}
    return out


def paired_difference(a: Sequence[int], b: Sequence[int], z: float = 1.96) -> dict[str, float]:
    """Accuracy difference ``mean(a) - mean(b)`` of two 0/1 vectors over the *same* rows, with a paired CI.

    The interval is the normal approximation on the per-row differences (``d_i = a_i - b_i``), which is what
    makes two methods evaluated on one test set comparable at much tighter width than two independent CIs.
    """
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs two non-empty vectors over the same rows")
    n = len(a)
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    half = z * math.sqrt(var / n)
    return {"diff": mean, "low": mean - half, "high": mean + half, "n": n}
