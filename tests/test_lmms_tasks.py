"""The lmms-eval task files and the report's reading of lmms-eval results; no lmms-eval needed (the plugin itself
is tested end to end in test_lmms_eval.py, in the lmms venv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmprune.benchmarks import pope_metrics, score
from vlmprune.benchmarks.shapes import pope_sample, sample
from vlmprune.integrations import lmms_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_written_tasks_are_the_harness_rows(tmp_path: Path):
    folder = lmms_tasks.write_tasks(tmp_path / "t", n=7)
    assert folder == (tmp_path / "t" / "vlmprune_shapes").resolve()
    for task, make in (("vlmprune_shapes", sample), ("vlmprune_shapes_pope", pope_sample)):
        text = (folder / f"{task}.yaml").read_text()
        assert f"task: {task}" in text
        data = folder / f"{task}.jsonl"
        assert json.dumps(str(data)) in text  # absolute: lmms-eval does not resolve data_files against the YAML
        docs = [json.loads(x) for x in data.read_text().splitlines()]
        assert len(docs) == 7
        for i, doc in enumerate(docs):
            row = make("test", i)
            assert {k: doc[k] for k in ("id", "question", "answer", "question_type", "subtype")} == {
                k: row[k] for k in ("id", "question", "answer", "question_type", "subtype")
            }
            (img,) = lmms_tasks.doc_to_visual(doc)
            assert np.array_equal(np.asarray(img), np.asarray(row["image"].convert("RGB")))
            assert lmms_tasks.doc_to_text(doc) == row["question"]
    assert "from vlmprune.integrations.lmms_tasks import" in (folder / "utils.py").read_text()
    with pytest.raises(ValueError, match="1000 rows"):
        lmms_tasks.write_tasks(tmp_path / "u", n=1001)


def test_task_scoring_is_the_harness_scoring():
    rows = [sample("test", i) for i in range(10)]
    preds = ["Yes.", "two", "red", "left of it", "blue", "no", "zero", "x", "", "Circle"]
    docs = [{k: r[k] for k in ("answer", "subtype")} for r in rows]
    got = [lmms_tasks.process_results(d, [p])["accuracy"] for d, p in zip(docs, preds, strict=True)]
    assert got == [float(c) for c in score(preds, rows)["correct"]]

    prow = [pope_sample("test", i) for i in range(12)]
    pp = ["yes", "no", "Yes, there is", "not at all", "no", "yes", "maybe", "No.", "yes", "yes", "no", "yes"]
    recs = [lmms_tasks.pope_process_results(r, [p])["pope_f1"] for r, p in zip(prow, pp, strict=True)]
    want = pope_metrics(pp, prow)
    for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert getattr(lmms_tasks, f"pope_{m}")(recs) == pytest.approx(want[m])


def _results(
    tmp_path: Path,
    method: str | None,
    acc: float,
    ttft: float,
    gflops: float,
    tokens: int,
    side: Path | None = None,
    keep: float | None = 0.25,
) -> Path:
    """An lmms-eval results file of a ``--model vlmprune`` run, and its sidecar (appended to ``side`` if given)."""
    side = side or tmp_path / f"side_{method}.jsonl"
    config = {"method": method, "keep": keep if keep is not None else 0.5} if method else None
    recs = [
        {
            "model": "ckpt/x",
            "config": config,
            "task": "vlmprune_shapes",
            "doc_id": i,
            "vision_tokens_at_llm": tokens,
            "ttft_ms": ttft + i,
            "flops": {"prefill": gflops * 1e9, "vision": 1.0},
        }
        for i in range(3)
    ]
    with side.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    args = f"pretrained=ckpt/x,device_map=cpu,stats_path={side}"
    if method:
        args += f",method={method}" + (f",keep={keep}" if keep is not None else "")
    res = {
        "results": {
            "vlmprune_shapes": {"alias": "vlmprune_shapes", "accuracy,none": acc, "accuracy_stderr,none": 0.1}
        },
        "config": {"model": "vlmprune", "model_args": args, "device": "cpu"},
        "n-samples": {"vlmprune_shapes": {"original": 1000, "effective": 3}},
        "throughput": {},
        "lmms_eval_version": "test",
    }
    path = tmp_path / f"{method}_{keep}_results.json"
    path.write_text(json.dumps(res))
    return path


def test_report_reads_lmms_results_with_sidecars(tmp_path: Path):
    sys.path.insert(0, str(ROOT))
    try:
        from eval.report import report
    finally:
        sys.path.remove(str(ROOT))
    base = _results(tmp_path, None, 0.8, 100.0, 4.0, 256)
    pruned = _results(tmp_path, "hiprune", 0.7, 40.0, 1.0, 64)
    rep = report([base, pruned], tmp_path / "rep", name="merged")
    by = {r["method"]: r for r in rep["rows"]}
    assert by[None]["keep"] == 1.0 and by["hiprune"]["keep"] == 0.25
    assert by["hiprune"]["accuracy"] == 0.7 and by["hiprune"]["n"] == 3
    assert by["hiprune"]["ttft_ms_median"] == 41.0 and by["hiprune"]["vision_tokens_at_llm"] == 64
    assert by["hiprune"]["speedup_vs_unpatched"] == pytest.approx(101.0 / 41.0)
    assert by["hiprune"]["flop_bound_speedup"] == pytest.approx(4.0)
    assert "ckpt/x [vlmprune_shapes]" in rep["markdown"]
    names = {p.name for p in rep["files"]}
    assert {"merged.md", "merged.csv", "merged_acc_flops.png", "merged_speedup.png"} <= names


def test_report_keeps_runs_apart_in_a_shared_sidecar(tmp_path: Path):
    """Two runs appending to one stats_path (and a run without keep=, at its method's default budget): each row
    reads only its own records."""
    sys.path.insert(0, str(ROOT))
    try:
        from eval.report import load
    finally:
        sys.path.remove(str(ROOT))
    shared = tmp_path / "shared.jsonl"
    base = _results(tmp_path, None, 0.8, 100.0, 4.0, 256, side=shared)
    fastv = _results(tmp_path, "fastv", 0.7, 40.0, 1.0, 128, side=shared, keep=None)
    (b,) = load(base)
    (f,) = load(fastv)
    assert (b["vision_tokens_at_llm"], b["ttft_ms_median"], b["keep"]) == (256, 101.0, 1.0)
    assert (f["vision_tokens_at_llm"], f["ttft_ms_median"], f["keep"]) == (128, 41.0, 0.5)
