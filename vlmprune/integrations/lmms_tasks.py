"""Offline lmms-eval tasks for the project's synthetic benchmark (ShapesVQA), with no hub anywhere.

    python -m vlmprune.integrations.lmms_tasks OUT_DIR          # writes OUT_DIR/vlmprune_shapes/...
    python -m lmms_eval --model vlmprune --model_args pretrained=checkpoints/shapes-llava-tiny,method=hiprune,\\
keep=0.25,device_map=cpu --device cpu --include_path OUT_DIR --tasks vlmprune_shapes --output_path out/

Two tasks, both on ShapesVQA's fixed ``test`` split:

* ``vlmprune_shapes``: the 1,000 test questions (the five question types in turn); metric ``accuracy`` = exact
  match of the first word, the harness's scoring (:func:`vlmprune.benchmarks.score`);
* ``vlmprune_shapes_pope``: the existence question of each of the 1,000 test scenes; metrics ``pope_accuracy``,
  ``pope_precision``, ``pope_recall``, ``pope_f1``, ``pope_yes_ratio``, read the way POPE reads replies
  (:func:`vlmprune.benchmarks.pope_metrics`).

Why a writer and not files inside the package: lmms-eval resolves a task's ``data_files`` against the current
directory, not against the YAML, so the YAML must carry an absolute path to data on this machine. The data is
a small JSON-lines file (question, answer, split and index per row, loaded by ``datasets``' ``json`` builder);
images are regenerated from ``(split, index)`` (ShapesVQA is a pure function of them), byte-identical to the
harness's. The prompt is the question alone after the image, as the harness asks it, and generation is greedy
with 3 new tokens, so with the same checkpoint and method lmms-eval's score equals ``python -m eval run``'s.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

__all__ = [
    "TASKS",
    "doc_to_text",
    "doc_to_visual",
    "pope_aggregate",
    "pope_process_results",
    "process_results",
    "write_tasks",
]

TASKS = ("vlmprune_shapes", "vlmprune_shapes_pope")
FOLDER = "vlmprune_shapes"

_YAML = """# Written by `python -m vlmprune.integrations.lmms_tasks` (vlmprune {version}); regenerate rather than edit.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.{process}
metric_list:
{metrics}
metadata:
  version: 1.0
  benchmark: {benchmark}
"""

_UTILS = '''"""Written by `python -m vlmprune.integrations.lmms_tasks`: the task functions live in vlmprune."""

from vlmprune.integrations.lmms_tasks import (  # noqa: F401
    doc_to_text,
    doc_to_visual,
    pope_accuracy,
    pope_f1,
    pope_precision,
    pope_process_results,
    pope_recall,
    pope_yes_ratio,
    process_results,
)
'''

_POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@functools.lru_cache(maxsize=64)
def _image(split: str, index: int) -> Any:
    from vlmprune.benchmarks import shapes

    img, _, _ = shapes.scene_questions(split, index)
    return img


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The scene of ``doc`` as a one-image list (RGB PIL), regenerated from its split and index."""
    return [_image(doc["split"], int(doc["index"])).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question alone: the chat template puts the image before it, as the harness does."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``accuracy``: 1.0 when the reply's first word is the answer (the harness's exact first-word match)."""
    from vlmprune.benchmarks import first_word

    return {"accuracy": float(first_word(results[0]) == first_word(doc["answer"]))}


def pope_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """One record per POPE metric; :func:`pope_aggregate` turns the records into the metric."""
    rec = {"reply": results[0], "answer": doc["answer"], "subtype": doc["subtype"]}
    return {f"pope_{m}": rec for m in _POPE_METRICS}


def pope_aggregate(records: list[dict[str, Any]], metric: str) -> float:
    """POPE ``metric`` (accuracy, precision, recall, f1, yes_ratio) over the records of a run."""
    from vlmprune.benchmarks import pope_metrics

    rows = [{"answer": r["answer"], "question_type": "exist", "subtype": r["subtype"]} for r in records]
    out = pope_metrics([r["reply"] for r in records], rows)
    return float(out[metric]) if out else 0.0


def pope_accuracy(records: list[dict[str, Any]]) -> float:  # noqa: D103 - see pope_aggregate
    return pope_aggregate(records, "accuracy")


def pope_precision(records: list[dict[str, Any]]) -> float:  # noqa: D103
    return pope_aggregate(records, "precision")


def pope_recall(records: list[dict[str, Any]]) -> float:  # noqa: D103
    return pope_aggregate(records, "recall")


def pope_f1(records: list[dict[str, Any]]) -> float:  # noqa: D103
    return pope_aggregate(records, "f1")


def pope_yes_ratio(records: list[dict[str, Any]]) -> float:  # noqa: D103
    return pope_aggregate(records, "yes_ratio")


def _rows(benchmark: str, n: int) -> list[dict[str, Any]]:
    from vlmprune.benchmarks import shapes

    out = []
    for i in range(n):
        _, _, qs = shapes.scene_questions("test", i)
        qtype = "exist" if benchmark == "shapes-pope" else shapes.QUESTION_TYPES[i % len(shapes.QUESTION_TYPES)]
        q = qs[shapes.QUESTION_TYPES.index(qtype)]
        rid = f"test-pope-{i:05d}" if benchmark == "shapes-pope" else f"test-{i:05d}"
        out.append({"id": rid, "split": "test", "index": i, **q})
    return out


def write_tasks(out_dir: str | Path, n: int | None = None) -> Path:
    """Write both tasks under ``out_dir/vlmprune_shapes/`` (YAMLs, ``utils.py``, data); return that folder.

    Pass ``out_dir`` to lmms-eval as ``--include_path``. ``n`` keeps the first ``n`` rows (default: all 1,000;
    lmms-eval's ``--limit`` also takes the first rows, in the same order as the harness's ``--n``).
    """
    import vlmprune
    from vlmprune.benchmarks import shapes

    total = shapes.SPLIT_SIZES["test"]
    n = total if n is None else n
    if not 1 <= n <= total:
        raise ValueError(f"n={n}: the test split has {total} rows")
    folder = Path(out_dir).resolve() / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(_UTILS)
    specs = [
        ("vlmprune_shapes", "shapes", "process_results", ["accuracy"]),
        ("vlmprune_shapes_pope", "shapes-pope", "pope_process_results", [f"pope_{m}" for m in _POPE_METRICS]),
    ]
    for task, benchmark, process, metrics in specs:
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(benchmark, n)))
        if process == "process_results":
            metric_yaml = "  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true"
        else:
            metric_yaml = "\n".join(
                f"  - metric: {m}\n    aggregation: !function utils.{m}\n    higher_is_better: "
                f"{'false' if m == 'pope_yes_ratio' else 'true'}"
                for m in metrics
            )
        (folder / f"{task}.yaml").write_text(
            _YAML.format(
                version=vlmprune.__version__,
                task=task,
                data=json.dumps(str(data)),
                process=process,
                metrics=metric_yaml,
                benchmark=benchmark,
            )
        )
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlmprune.integrations.lmms_tasks", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder to write into; pass it to lmms-eval as --include_path")
    p.add_argument("--n", type=int, help="keep the first N rows of each task (default: all 1,000)")
    a = p.parse_args(argv)
    folder = write_tasks(a.out_dir, a.n)
    print(f"wrote tasks {', '.join(TASKS)} to {folder}\nuse: --include_path {folder.parent} --tasks {TASKS[0]}")


if __name__ == "__main__":
    main()
