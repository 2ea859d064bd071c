"""The lmms-eval plugin end to end, offline: ``--model vlmprune`` through lmms-eval's own CLI and API on the shipped
tiny checkpoints and the ShapesVQA tasks, checked against the harness's own answers for the same samples.

Needs the ``lmms`` extra (``scripts/setup.sh`` with ``LMMS=1``; CI runs this file in ``.venv-lmms``). Without
lmms-eval the module is skipped, unless ``VLMPRUNE_REQUIRE_LMMS=1`` (CI's lmms venv), where that is a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlmprune

if os.environ.get("VLMPRUNE_REQUIRE_LMMS") != "1":
    pytest.importorskip("lmms_eval", reason="the lmms extra is not installed")

from conftest import tower_batches  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from vlmprune.errors import ConfigError, UnknownMethodError  # noqa: E402
from vlmprune.integrations import lmms_eval as plugin  # noqa: E402
from vlmprune.integrations.lmms_tasks import write_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "checkpoints" / "shapes-llava-tiny"
QWEN = ROOT / "checkpoints" / "shapes-qwen2vl-tiny"
N = 10


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lmms_tasks")
    write_tasks(root, n=N)
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.getbasetemp() / "hf_home"
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),
        "LMMS_EVAL_DATASETS_CACHE": str(home / "datasets"),
    }.items():
        monkeypatch.setenv(k, v)


def harness_answers(path: Path, config: vlmprune.PruneConfig | None, benchmark: str = "shapes") -> list[str]:
    """The harness's greedy answers for the first N rows (one at a time, as lmms-eval's wrapper asks them)."""
    sys.path.insert(0, str(ROOT))
    try:
        from eval.accuracy import benchmark_rows, load_checkpoint
    finally:
        sys.path.remove(str(ROOT))
    from vlmprune.benchmarks import answer_questions

    model, processor = load_checkpoint(path)
    rows = benchmark_rows(benchmark, "test", N)
    if config is None:
        return answer_questions(model, processor, rows, batch_size=1, max_new_tokens=3)
    with vlmprune.patched(model, config):
        return answer_questions(model, processor, rows, batch_size=1, max_new_tokens=3)


def evaluate(lm, tasks: Path, task: str = "vlmprune_shapes", limit: int = N) -> dict:
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=tm, log_samples=True, device="cpu")


def replies(res: dict, task: str = "vlmprune_shapes") -> list[str]:
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]


def test_entry_point_resolves_both_modes():
    from lmms_eval.models import get_model, list_available_models

    assert "vlmprune" in list_available_models(include_aliases=True)
    assert get_model("vlmprune") is plugin.VLMPruneChat
    assert get_model("vlmprune", force_simple=True) is plugin.VLMPruneSimple


def test_cli_end_to_end_matches_harness(tasks: Path, tmp_path: Path):
    """``python -m lmms_eval --model vlmprune`` (the user's command): same replies and score as the harness on the
    same rows and method, the budget at the LLM per sample, and lmms-eval's token counts after pruning."""
    out, side = tmp_path / "out", tmp_path / "stats.jsonl"
    args = f"pretrained={LLAVA},method=hiprune,keep=0.25,device_map=cpu,dtype=float32,stats_path={side}"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vlmprune", "--model_args", args, "--device", "cpu"]
    cmd += ["--include_path", str(tasks), "--tasks", "vlmprune_shapes", "--limit", str(N), "--log_samples"]
    cmd += ["--output_path", str(out), "--verbosity", "DEBUG"]  # DEBUG: lmms-eval re-raises instead of exiting 0
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    (samples_file,) = out.glob("*/*_samples_vlmprune_shapes.jsonl")
    samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])

    want = harness_answers(LLAVA, vlmprune.make_config("hiprune", keep=0.25))
    got = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert [g.strip() for g in got] == [w.strip() for w in want]
    from vlmprune.benchmarks import score
    from vlmprune.benchmarks.shapes import sample

    harness = score(want, [sample("test", i) for i in range(N)])["accuracy"]
    assert results["results"]["vlmprune_shapes"]["accuracy,none"] == pytest.approx(harness)

    recs = [json.loads(x) for x in side.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in recs) == list(range(N))
    budget = math.ceil(0.25 * recs[0]["vision_tokens_in"])
    for r in recs:
        assert r["vision_tokens_at_llm"] == budget
        assert r["llm_prompt_tokens"] == r["prompt_tokens"] - r["vision_tokens_in"] + budget
        assert r["ttft_ms"] > 0 and r["flops"]["prefill"] > 0 and r["config"]["method"] == "hiprune"
    by_doc = {r["doc_id"]: r for r in recs}
    for s in samples:
        assert s["token_counts"][0]["input_tokens"] == by_doc[s["doc_id"]]["llm_prompt_tokens"]
    thr = results["throughput"]
    assert thr["avg_vlmprune_vision_tokens_at_llm"] == budget
    assert thr["avg_vlmprune_samples"] == N

    # the harness's report reads the run (and its sidecar) as rows of its table
    sys.path.insert(0, str(ROOT))
    try:
        from eval.report import report
    finally:
        sys.path.remove(str(ROOT))
    rep = report([results_file], tmp_path / "report")
    (row,) = rep["rows"]
    assert row["method"] == "hiprune" and row["keep"] == 0.25 and row["vision_tokens_at_llm"] == budget
    assert row["accuracy"] == pytest.approx(harness) and row["gflops"] > 0


@pytest.mark.parametrize("method", [None, "damro"])
def test_api_unpatched_and_damro_match_harness(tasks: Path, method: str | None):
    """The Python API twin: the unpatched baseline through the same wrapper, and DAMRO (whose generate shadow
    composes with the plugin's timing wrapper), give the harness's replies."""
    lm = plugin.load_model(str(LLAVA), method, device_map="cpu", dtype="float32", device="cpu")
    res = evaluate(lm, tasks)
    config = vlmprune.make_config("damro") if method else None
    assert [r.strip() for r in replies(res)] == [w.strip() for w in harness_answers(LLAVA, config)]
    recs = lm.vlmprune_records()
    assert len(recs) == N
    if method is None:
        assert all(r["vision_tokens_at_llm"] == r["vision_tokens_in"] for r in recs)
        assert all(r["llm_prompt_tokens"] == r["prompt_tokens"] for r in recs)
    else:
        assert all(r["flops"]["branch_prefill"] > 0 for r in recs)  # DAMRO's contrastive branch is counted


def _qwen_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test scaffolding for a box without torchvision (CI's, beside the CPU torch): lmms-eval's Qwen2-VL wrapper
    loads its processor with AutoProcessor (whose video half needs torchvision) and reads images through
    qwen_vl_utils (which imports torchvision). Give it the same processor without the video half, and a reader of
    the image data-URLs it builds; the wrapper's prompt building, batching and generate call are its own."""
    import base64
    import io

    from lmms_eval.models.simple import qwen2_vl as module
    from PIL import Image

    from vlmprune.benchmarks import load_processor

    class _Auto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return load_processor(path)

    def process_vision_info(conversations):
        images = []
        for messages in conversations:
            for m in messages:
                for part in m["content"] if isinstance(m["content"], list) else []:
                    if part.get("type") == "image":
                        data = part["image"].split(",", 1)[1]
                        images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        return images or None, None

    monkeypatch.setattr(module, "AutoProcessor", _Auto)
    monkeypatch.setattr(module, "process_vision_info", process_vision_info)


def test_qwen2_vl_simple_wrapper_batched(tasks: Path, monkeypatch: pytest.MonkeyPatch):
    """Qwen2-VL has only a simple wrapper in lmms-eval: it is used (also under --model vlmprune's chat default),
    patched, and with --batch_size 2 every sample is attributed to its own document: its LLM prompt length equals
    the one it has when asked alone, and it reaches the LLM with its budget."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        _qwen_without_torchvision(monkeypatch)
    n = 5  # odd: the last batch holds one document

    def run(batch_size: int) -> tuple[dict, list[dict]]:
        lm = plugin.load_model(str(QWEN), "uniform", keep=0.5, device_map="cpu", device="cpu", batch_size=batch_size)
        assert lm.is_simple and vlmprune.is_patched(lm.model)
        res = evaluate(lm, tasks, limit=n)
        return res, sorted(lm.vlmprune_records(), key=lambda r: r["doc_id"])

    res1, singles = run(1)
    res2, batched = run(2)
    assert "accuracy,none" in res2["results"]["vlmprune_shapes"]
    assert [r["doc_id"] for r in batched] == list(range(n))
    assert {r["batch_rows"] for r in batched} == {1, 2}
    assert len({r["prompt_tokens"] for r in singles}) > 1  # the questions differ in length: attribution is visible
    for a, b in zip(singles, batched, strict=True):
        assert (a["prompt_tokens"], a["llm_prompt_tokens"]) == (b["prompt_tokens"], b["llm_prompt_tokens"])
        assert b["vision_tokens_at_llm"] == math.ceil(0.5 * b["vision_tokens_in"])
        assert b["flops"] is not None and b["flops"]["vision"] > 0
    assert replies(res1) == replies(res2)  # batch of 2 == singles, through lmms-eval


def test_model_args_are_validated_before_loading(monkeypatch: pytest.MonkeyPatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(plugin._PrunedWrapper, "__init__", no_load)
    with pytest.raises(ConfigError, match="did you mean 'keep'"):
        plugin.load_model(str(LLAVA), "hiprune", kep=0.1)
    with pytest.raises(ConfigError, match="keep=2.0"):
        plugin.load_model(str(LLAVA), "hiprune", keep=2.0)
    with pytest.raises(UnknownMethodError):
        plugin.load_model(str(LLAVA), "hiprun", keep=0.5)
    with pytest.raises(ConfigError, match="no method options"):
        plugin.load_model(str(LLAVA), None, keep=0.5)
    # the wrapper's own options and the CLI's extras pass
    cfg, rest = plugin._split_args(
        plugin._wrapper_class("llava", True),
        "random",
        {"keep": 8, "seed": 3, "device_map": "cpu", "max_batch_size": 4},
    )
    assert (cfg.keep, cfg.seed, rest) == (8, 3, {"device_map": "cpu"})


def test_data_parallel_two_processes(tasks: Path, tmp_path: Path):
    """``accelerate launch`` with two processes (CPU here: ``--multi_gpu`` starts torch's distributed launcher and,
    with no GPU, the processes talk over gloo), one patched model each: lmms-eval shards the docs between them and
    the gathered score is the single-process one."""
    out, side = tmp_path / "out", tmp_path / "stats.jsonl"
    args = f"pretrained={LLAVA},method=hiprune,keep=0.25,device_map=cpu,dtype=float32,stats_path={side}"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"  # the console script users run, not a module path
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)]
    cmd += ["-m", "lmms_eval", "--model", "vlmprune", "--model_args", args, "--device", "cpu"]
    cmd += ["--include_path", str(tasks), "--tasks", "vlmprune_shapes", "--limit", str(N - 1)]  # odd: rank padding
    cmd += ["--output_path", str(out), "--verbosity", "DEBUG"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [side, tmp_path / "stats.rank1.jsonl"]
    docs = [sorted(json.loads(x)["doc_id"] for x in f.read_text().splitlines()) for f in ranks]
    assert docs[0] and docs[1] and not set(docs[0]) & set(docs[1])
    assert sorted(docs[0] + docs[1]) == list(range(N - 1))  # the padding copy is not a sample
    (results_file,) = out.glob("*/*_results.json")
    acc = json.loads(results_file.read_text())["results"]["vlmprune_shapes"]["accuracy,none"]
    from vlmprune.benchmarks import score
    from vlmprune.benchmarks.shapes import sample

    want = harness_answers(LLAVA, vlmprune.make_config("hiprune", keep=0.25))[: N - 1]
    assert acc == pytest.approx(score(want, [sample("test", i) for i in range(N - 1)])["accuracy"])


def test_close_with_damro_restores_the_model():
    """DAMRO wraps generate too: closing takes the plugin's wrapper off first, then unpatches."""
    lm = plugin.load_model(str(LLAVA), "damro", device_map="cpu", dtype="float32", device="cpu")
    model = lm.model
    assert "generate" in model.__dict__
    lm.vlmprune_close()
    assert not vlmprune.is_patched(model)
    assert "generate" not in model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_failures_inside_generate_are_raised(tasks: Path):
    """lmms-eval's LLaVA wrapper catches exceptions from generate() and scores an empty reply; the plugin raises."""
    lm = plugin.load_model(str(LLAVA), "random", keep=0.5, device_map="cpu", dtype="float32", device="cpu")

    def boom(*args, **kwargs):
        raise ValueError("injected failure")

    lm.model.model.language_model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        evaluate(lm, tasks, limit=2)
    assert not lm._vlmprune.pending  # nothing left to be attributed to the next batch


def test_likelihood_tasks_are_refused_when_pruning():
    lm = plugin.load_model(str(LLAVA), "random", keep=0.5, device_map="cpu", dtype="float32", device="cpu")
    with pytest.raises(NotImplementedError, match="without method="):
        lm.loglikelihood([])


def test_text_only_prompt_after_an_image_reads_no_stale_stats():
    from vlmprune.testing import make_inputs, tiny_model

    model = tiny_model("llava", seed=1)
    config = vlmprune.make_config("random", keep=0.5)
    vlmprune.patch(model, config)
    rec = plugin._Recorder(model, config, timing=False)
    try:
        model.generate(**make_inputs(model, [[3, "image", 2]]), max_new_tokens=1, do_sample=False)
        text = make_inputs(model, [[6]])
        model.generate(**text, max_new_tokens=1, do_sample=False)
    finally:
        rec.remove()
        vlmprune.unpatch(model)
    img, txt = rec.records
    assert img["vision_tokens_at_llm"] < img["vision_tokens_in"]
    assert (txt["vision_tokens_in"], txt["vision_tokens_at_llm"]) == (0, 0)
    assert txt["llm_prompt_tokens"] == txt["prompt_tokens"] == 6
    assert txt["flops"]["vision"] == 0 and txt["ttft_ms"] is None


def _recorded(model, config, inputs) -> tuple[list[dict], dict]:
    """Patch, generate two tokens under the plugin's recorder, unpatch: ``(records, last_stats)``."""
    vlmprune.patch(model, config)
    rec = plugin._Recorder(model, config, timing=True)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        return rec.records, vlmprune.last_stats(model)
    finally:
        rec.remove()
        vlmprune.unpatch(model)


def _row_flops(model, config, record: dict, **vision) -> dict:
    """The FLOPs ``vlmprune.stats`` gives for one recorded row (its text, vision tokens in / at the LLM, and the
    row's own vision work: ``grids`` or ``n_images``)."""
    from vlmprune import stats

    return stats.prefill_flops(
        model.config,
        n_text=record["prompt_tokens"] - record["vision_tokens_in"],
        vision_in=record["vision_tokens_in"],
        vision_out=record["vision_tokens_at_llm"],
        config=config,
        **vision,
    ).to_dict()


def test_recorder_counts_qwen_grids_per_row():
    """The plugin's bookkeeping on an M-RoPE model with a padded batch of two prompts with different images: each
    row's vision tokens, budget at the LLM and vision FLOPs (from its own image grids) are its own."""
    from vlmprune.testing import make_inputs, tiny_model

    model = tiny_model("qwen2_vl", seed=1)
    config = vlmprune.make_config("uniform", keep=0.5)
    inputs = make_inputs(model, [[5, ("image", 8, 12), 3], [2, ("image", 4, 8), 1]])
    (r0, r1), _ = _recorded(model, config, inputs)
    assert (r0["vision_tokens_in"], r1["vision_tokens_in"]) == (24, 8)  # (8 x 12) / 2^2, (4 x 8) / 2^2
    assert (r0["vision_tokens_at_llm"], r1["vision_tokens_at_llm"]) == (12, 4)
    assert [r0["prompt_tokens"], r1["prompt_tokens"]] == inputs["attention_mask"].sum(-1).tolist()
    assert [r0["llm_prompt_tokens"], r1["llm_prompt_tokens"]] == [r0["prompt_tokens"] - 12, r1["prompt_tokens"] - 4]
    grids = [tuple(int(v) for v in g) for g in inputs["image_grid_thw"]]
    for r, g in zip((r0, r1), grids, strict=True):
        assert r["flops"] == _row_flops(model, config, r, grids=[g])
        assert r["batch_rows"] == 2 and r["ttft_ms"] > 0


def test_recorder_counts_onevision_tower_inputs_per_row():
    """LLaVA-OneVision: a row with one image runs the tower on its crops, a row with two images on their base views
    only, a video row on its frames; each row's FLOPs count exactly its own (vlmprune.stats.onevision_tower_inputs
    per row, and the tower's real batch in total)."""
    from vlmprune import stats
    from vlmprune.testing import make_inputs, tiny_model

    model = tiny_model("llava_onevision", seed=1)
    config = vlmprune.make_config("uniform", keep=0.25)
    spec = [[5, ("image", 112, 112), 3], [2, "image", 1, ("image", 56, 112), 1], [4, ("video", 2), 2]]
    inputs = make_inputs(model, spec)
    per_row = [
        stats.onevision_tower_inputs(model.config, inputs["image_sizes"][:1], [1]),
        stats.onevision_tower_inputs(model.config, inputs["image_sizes"][1:], [2]),
        stats.onevision_tower_inputs(model.config, video_frames=[2]),
    ]
    assert per_row[1] == 2 and per_row[2] == 2 and per_row[0] > 1
    with tower_batches(model) as seen:
        records, _ = _recorded(model, config, inputs)
    assert sum(seen) == sum(per_row)  # the prefill's tower calls (decode steps encode nothing)
    assert len(records) == 3
    for r, n in zip(records, per_row, strict=True):
        assert r["vision_tokens_at_llm"] < r["vision_tokens_in"]
        assert r["flops"] == _row_flops(model, config, r, n_images=n)


def test_recorder_counts_anyres_crops_per_row():
    """LLaVA-NeXT: each row's vision FLOPs run the tower on its own images' base views and crops (3 for a 48 x 80
    image, 5 for 112 x 112 on the tiny model's pinpoints), and the newline tokens reach the LLM."""
    from vlmprune import stats
    from vlmprune.testing import make_inputs, tiny_model

    model = tiny_model("llava_next", seed=1)
    config = vlmprune.make_config("uniform", keep=0.25)
    inputs = make_inputs(model, [[5, "image", 3], [2, ("image", 112, 112), 1]])
    crops = stats.anyres_crops(model.config, inputs["image_sizes"])
    assert crops == [3, 5]
    records, last = _recorded(model, config, inputs)
    for r, n_crops, image in zip(records, crops, last["images"], strict=True):
        assert r["vision_tokens_at_llm"] == image["tokens_out"] < r["vision_tokens_in"] == image["tokens_in"]
        assert r["flops"] == _row_flops(model, config, r, n_images=n_crops)
