"""The eval harness CLI (``python -m eval run`` / ``report``), run as a user would, from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def _eval(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "timing:llava-70b"], "unknown timing model"),
        (["--models", "no/such/folder"], "neither timing:<name> nor a checkpoint folder"),
        (["--models", "timing:llava-tiny", "--methods", "hiprun"], "hiprune"),
        (["--models", "timing:llava-tiny", "--keep", "1.5"], "keep"),
        (["--models", "timing:llava-tiny", "--rounds", "0"], "rounds must be >= 1"),
        (["--models", "timing:llava-1.5-7b", "--llm-layers", "2", "--methods", "fastv"], "--llm-layers must be > 2"),
    ],
)
def test_bad_configs_fail_before_loading(tmp_path, args, message):
    out = tmp_path / "r.jsonl"
    proc = _eval("run", *args, "--out", str(out), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["fast_vlm"])
def test_families_without_a_flop_formula_fail_before_loading(tmp_path, model_type):
    """Supported by the patch, but every harness row reports analytic FLOPs: refused at validation with the remedy
    (before, the run crashed after loading the model)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    out = tmp_path / "r.jsonl"
    proc = _eval("run", "--models", str(folder), "--benchmark", "none", "--out", str(out), check=False)
    assert proc.returncode == 2 and "no FLOP formula" in proc.stderr and "lmms-eval" in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_checkpoint_without_a_processor_needs_benchmark_none(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    proc = _eval("run", "--models", str(folder), "--benchmark", "shapes", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "--benchmark none" in proc.stderr, proc.stderr


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_checkpoint_folders_run_end_to_end(tmp_path, family):
    """A weights-only local folder of each anyres family (saved with save_pretrained, loaded by ``eval run`` through
    the adapter's class): synthetic timing inputs of a 2 x 2 crop grid, and analytic FLOPs equal to torch's counter
    (OneVision: SigLIP tower inputs counted by vlmprune.stats.onevision_tower_inputs)."""
    from vlmprune.testing import tiny_model

    folder = tmp_path / family
    tiny_model(family, seed=0).save_pretrained(folder)
    out = tmp_path / "r.jsonl"
    cfg = tmp_path / "c.json"
    settings = {"rounds": 1, "warmup": 0, "decode_tokens": 2, "threads": 1, "benchmark": "none"}
    cfg.write_text(
        json.dumps({"models": [str(folder)], "methods": ["uniform"], "keep": [0.5], "out": str(out)} | settings)
    )
    _eval("run", "--config", str(cfg))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == [None, "uniform"]
    for r in rows:
        assert r["flops"]["vision"] > 0 and r["flops"]["projector"] > 0
        assert r["flops_analytic_over_counter"] == pytest.approx(1.0, rel=1e-3)
    base, pruned = rows
    assert base["vision_tokens_at_llm"] == base["vision_tokens_in"] > pruned["vision_tokens_at_llm"]
    assert pruned["flops"]["llm_prefill"] < base["flops"]["llm_prefill"]


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"models": ["timing:llava-tiny"], "out": str(tmp_path / "r.jsonl"), "kepp": [0.5]}))
    proc = _eval("run", "--config", str(cfg), check=False)
    assert proc.returncode != 0 and "kepp" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r.jsonl"
    cfg = out.parent / "sweep.json"
    cfg.write_text(
        json.dumps(
            {
                "models": ["timing:llava-tiny", "timing:qwen2-vl-tiny"],
                "methods": ["uniform", "hiprune", "fastv", "damro", "damro+uniform", "fastvlm:resolution"],
                "keep": [0.5],
                "rounds": 1,
                "warmup": 0,
                "decode_tokens": 2,
                "threads": 1,
                "out": str(out),
            }
        )
    )
    first = _eval("run", "--config", str(cfg))
    return out, cfg, first


def test_rows_carry_the_promised_fields(results):
    out, _, _ = results
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # unpatched + 3 methods + DAMRO alone (keep 1.0 only) + DAMRO on uniform + FastVLM-style resolution, per model
    assert len(rows) == 2 * 7
    base = {r["model"]: r for r in rows if r["method"] is None}
    for r in rows:
        for key in (
            "config",
            "model",
            "dtype",
            "attn_implementation",
            "machine",
            "flops",
            "flops_counter",
            "ttft_ms_median",
            "ttft_ms_min",
            "vision_ms_median",
            "llm_prefill_ms_median",
            "cpu_per_wall",
            "decode_tokens_per_s",
            "kv_cache_bytes",
            "peak_rss_delta_bytes",
        ):
            assert key in r, key
        if Path("/proc/self/clear_refs").exists():  # Linux (a tiny prefill may fit in memory already resident)
            assert isinstance(r["peak_rss_delta_bytes"], int) and r["peak_rss_delta_bytes"] >= 0
        assert r["machine"]["git_sha"] and r["machine"]["torch"] and r["machine"]["transformers"]
        # the analytic formula equals torch's counter exactly for the plain cut; methods that compute extra
        # attention scores (HiPrune's two ViT layers, FastV's layer K-1 ranking) cost a little more than the formula
        # (DAMRO: its branch is in both; the counter also sees its outlier score, hence <= 1, not == 1)
        assert 0 < r["vision_ms_median"] and r["llm_prefill_ms_median"] == pytest.approx(
            r["ttft_ms_median"] - r["vision_ms_median"]
        )
        if r["method"] in (None, "uniform", "fastvlm:resolution"):
            # (rel 1e-3: transformers 5.0's RoPE computes its angles with a matmul the counter sees, ~1e-4)
            assert r["flops_analytic_over_counter"] == pytest.approx(1.0, rel=1e-3), r["method"]
        else:
            assert 0.8 < r["flops_analytic_over_counter"] <= 1.0 + 1e-9, r["method"]
        if r["method"] == "damro":  # the whole image in the main branch, plus the branch: dearer than unpatched
            assert r["config"]["keep"] == 1.0 and r["vision_tokens_at_llm"] == r["vision_tokens_in"]
            assert r["flop_bound_speedup"] < 1.0
        elif r["method"] == "fastvlm:resolution":  # 4x4 tokens, budget 8: the largest grid within it, 2x3
            assert r["config"]["strategy"] == "resolution" and r["vision_tokens_at_llm"] == 6
            assert r["flops"]["vision"] < 0.5 * base[r["model"]]["flops"]["vision"]  # the encoder's own saving
        elif r["method"] is not None:
            assert r["config"]["keep"] == 0.5 and r["vision_tokens_at_llm"] == r["vision_tokens_in"] // 2
            if r["method"] != "damro+uniform":  # (on tiny models the branch can cost more than pruning saves)
                assert r["flop_bound_speedup"] > 1.0
        if r["method"] and r["method"].startswith("damro"):
            text = r["timing"]["text_tokens"] - r["vision_tokens_in"]
            assert r["contrast_branch_tokens"] == text + min(10, r["vision_tokens_in"])
            assert r["overhead_ratio"] is None  # no "ideal" run has a second branch
            assert r["flops"]["branch_prefill"] > 0
        else:
            assert r["flops"]["branch_prefill"] == 0
        if r["method"] == "uniform":
            assert r["ideal_ttft_ms_median"] > 0 and r["ideal_check_max_abs_diff"] < 1e-4
    by = {(r["model"], r["method"]): r for r in rows}
    for model in ("timing:llava-tiny", "timing:qwen2-vl-tiny"):  # DAMRO = the same prefill + its branch
        for plain, damro in ((None, "damro"), ("uniform", "damro+uniform")):
            p, d = by[(model, plain)]["flops"], by[(model, damro)]["flops"]
            assert d["prefill"] == pytest.approx(p["prefill"] + d["branch_prefill"])
            assert d["decode_per_token"] > 1.5 * p["decode_per_token"]
            assert by[(model, damro)]["kv_cache_bytes"] > by[(model, plain)]["kv_cache_bytes"]  # two caches
    kv = {(r["model"], r["method"]): r["kv_cache_bytes"] for r in rows}
    for model in ("timing:llava-tiny", "timing:qwen2-vl-tiny"):
        assert kv[(model, "uniform")] < kv[(model, None)]  # the pruned prefill really caches fewer tokens


def test_run_is_resumable(results):
    out, cfg, _ = results
    before = out.read_text()
    again = _eval("run", "--config", str(cfg))
    assert out.read_text() == before
    assert again.stdout.count("already in") == 2


def test_report_writes_tables_and_plots(results, tmp_path):
    out, _, _ = results
    _eval("report", str(out), "--out-dir", str(tmp_path))
    md = (tmp_path / "r.md").read_text()
    for m in ("unpatched", "uniform", "hiprune", "fastv", "damro+uniform"):
        assert m in md
    assert (tmp_path / "r.csv").read_text().count("\n") == 1 + 14
    png = tmp_path / "r_speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_rss_delta_sees_a_temporary_allocation():
    sys.path.insert(0, str(ROOT))
    try:
        from eval.timing import peak_rss_delta
    finally:
        sys.path.remove(str(ROOT))

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("Linux only")

    def allocate():
        buf = bytearray(200 * 2**20)
        buf[::4096] = b"x" * len(buf[::4096])  # touch every page so it is resident
        return len(buf)

    n, delta = peak_rss_delta(allocate)
    assert n == 200 * 2**20 and delta >= 150 * 2**20
    _, idle = peak_rss_delta(lambda: None)
    assert idle < 50 * 2**20


def test_anyres_timing_model_counts_crops_and_newlines(tmp_path):
    """LLaVA-NeXT through the harness: FLOPs count the tower on every crop (analytic == torch's counter) and the LLM
    gets the budget plus the newline tokens; fastvlm's resolution runs every crop smaller."""
    out = tmp_path / "next.jsonl"
    _eval(
        "run",
        "--models",
        "timing:llava-next-tiny",
        "--methods",
        "uniform",
        "fastvlm:resolution",
        "--keep",
        "0.25",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--decode-tokens",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    )
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    base, pruned = rows[None], rows["uniform"]
    # 112 x 112 on the tiny pinpoints: base view (16) + 2 x 2 crops (8 x 8) + 8 newlines
    assert base["vision_tokens_in"] == pruned["vision_tokens_in"] == 16 + 64 + 8
    assert pruned["vision_tokens_at_llm"] == 4 + 16 + 8
    for r in (base, pruned):
        assert r["flops_analytic_over_counter"] == pytest.approx(1.0, rel=1e-3)
    assert (
        pruned["flops"]["vision"] == base["flops"]["vision"]
        and pruned["flops"]["llm_prefill"] < base["flops"]["llm_prefill"]
    )
    small = rows["fastvlm:resolution"]  # 2 x 2 per crop: the same token count as uniform here, a cheaper tower
    assert small["vision_tokens_at_llm"] == pruned["vision_tokens_at_llm"]
    assert small["flops_analytic_over_counter"] == pytest.approx(1.0, rel=1e-3)
    assert small["flops"]["vision"] < 0.35 * base["flops"]["vision"] and small["vision_ms_median"] is not None
