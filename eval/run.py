"""``python -m eval run``: models x methods x budgets (x a benchmark) -> one JSON line per setting.

    python -m eval run --models checkpoints/shapes-llava-tiny --methods hiprune visionzip --keep 0.25 0.11 \\
        --benchmark shapes --n 200 --out eval/results/shapes.jsonl
    python -m eval run --models timing:llava-1.5-7b --llm-layers 2 --vit-layers 6 --out eval/results/timing.jsonl
    python -m eval run --config my_sweep.json          # the same keys as the flags (JSON)

``--methods`` takes method names, ``damro+NAME`` (DAMRO's contrastive decoding on top of method NAME at each
keep; ``damro`` alone runs once, at keep 1.0) and ``fastvlm:STRATEGY`` (``resolution`` | ``encoder_pool`` |
``pool``; plain ``fastvlm`` is ``resolution``). ``--image-patches H W`` sets a Qwen timing model's image grid
(e.g. ``74 74``: 1036 px, about a megapixel). ``--benchmark shapes-pope`` asks every test scene its POPE-style
existence question (rows then carry ``pope``: accuracy, precision, recall, F1, yes-ratio, per negative subtype).

A model is a local checkpoint folder (``from_pretrained``; accuracy on the benchmark) or ``timing:<geometry>``:
a random-weight model with the real widths/heads of LLaVA-1.5-7B, LLaVA-NeXT-7B (a 672 x 672 image, anyres: 2928
tokens) or Qwen2.5-VL-7B (``--llm-layers`` /
``--vit-layers`` cut the depth so a CPU can time it; with real weights pass the checkpoint path instead). Every
model gets an ``unpatched`` row; every (method, keep) a row with:

* ``accuracy`` / ``per_type`` / ``correct`` (per-question 0/1, for paired comparisons) on the benchmark;
* ``vision_tokens_in`` / ``vision_tokens_at_llm`` (per image; FastV: the tokens of layers >= K);
  ``contrast_branch_tokens`` for DAMRO (its second branch: text + outliers), whose prefill FLOPs are
  ``flops.branch_prefill`` and whose decode step is in ``flops.decode_per_token``; DAMRO rows time and count a
  contrasted prefill (both branches), as ``generate()`` runs it (the counter cannot tell the branches apart: it
  books the branch under ``llm_prefill`` / ``lm_head``; totals compare), and have no ideal / overhead ratio;
* ``flops``: analytic per component (``vlmprune.stats``: vision tower, projector, LLM prefill, lm_head, per
  decoded token), ``flops_counter`` measured by ``torch.utils.flop_counter.FlopCounterMode`` on the same prefill
  (CPU SDPA formula registered), their ratio, and ``flop_bound_speedup`` = analytic unpatched / this prefill;
* ``vision_ms_median`` (the vision tower and projector alone, ``get_image_features`` under the same patch,
  timed in the same interleaved schedule) and ``llm_prefill_ms_median`` = TTFT minus it: where the time goes;
* ``ttft_ms_median`` / ``ttft_ms_min``: one-request prefill (``use_cache=True, logits_to_keep=1``, what
  ``generate`` runs first) after warm-up, all settings of a model interleaved round-robin, device-synchronised,
  with ``cpu_per_wall`` and ``contended`` (CPU time / wall time far below the thread count: a shared box);
* ``ideal_ttft_ms_median`` and ``overhead_ratio``: the unpatched modules fed only the kept tokens (the vision
  tower on the image, the embedding lookup, then the language model on exactly the inputs the patched model gives
  it, captured from a ``uniform`` run at the same budget), so ``overhead_ratio`` = patched / ideal is the cost of
  the selection plus the fixed steps the ideal skips (placeholder scatter, Qwen's M-RoPE index), which matter on
  tiny models only;
* ``decode_tokens_per_s`` (``generate`` of N = ``--decode-tokens`` and of 1 token, interleaved:
  ``(N - 1) / (t_N - t_1)``), ``kv_cache_bytes`` (the cache the prefill left), ``peak_cuda_bytes`` on a GPU and
  ``peak_rss_delta_bytes`` on a CPU (Linux: the resident high-water mark during one prefill above the resident
  size when it started, reset through ``/proc/self/clear_refs``; it counts activations, not the weights).

Rows carry the method config (``to_dict()``), model and dtype, attention implementation, versions, machine, git
SHA and date. Resumable: rows already in ``--out`` with the same key (model, benchmark and n or the timing
geometry, method, keep, dtype, attention, device) are skipped, and a model none of whose rows is missing is not
even loaded; progress is per model (a killed run redoes the model it was in).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import vlmprune
from vlmprune import stats
from vlmprune._ops import cache_bytes, output_cache

from .accuracy import expand_settings, has_processor, setting_config
from .timing import interleaved, machine_info, peak_rss_delta, sync

BENCHMARKS = ("shapes", "shapes-pope", "easyvqa", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN = ("sdpa", "eager", "flash_attention_2")


# ----------------------------------------------------------------------------------------------- timing models
def _llava_7b(llm_layers: int | None, vit_layers: int | None) -> dict[str, Any]:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 blocks, d=1024, 16 heads) + Vicuna-7B (32 layers, d=4096)."""
    return dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=vit_layers or 24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=llm_layers or 32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
    )


def _llava_next_7b(llm_layers: int | None, vit_layers: int | None) -> dict[str, Any]:
    """LLaVA-NeXT-7B (LLaVA-1.6-Vicuna): LLaVA-1.5-7B's towers with anyres crops of 336 px on its default pinpoints
    (a 672 x 672 image: base view + 2 x 2 crops = 576 + 2304 tokens + 48 newlines)."""
    g = _llava_7b(llm_layers, vit_layers)
    g["pinpoints"] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return g


def _qwen25_7b(llm_layers: int | None, vit_layers: int | None) -> dict[str, Any]:
    """Qwen2.5-VL-7B: ViT d=1280 (32 blocks, windows of 112 px, full attention in blocks 7/15/23/31) + Qwen2.5-7B
    (28 layers, d=3584, 28 heads / 4 KV heads)."""
    depth = vit_layers or 32
    return dict(
        vision=dict(
            depth=depth,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=3584,
            fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1],
            in_channels=3,
        ),
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=llm_layers or 28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        ),
    )


TIMING = {
    "llava-1.5-7b": ("llava", _llava_7b),
    "llava-next-7b": ("llava_next", _llava_next_7b),
    "qwen2.5-vl-7b": ("qwen2_5_vl", _qwen25_7b),
    "llava-tiny": ("llava", None),  # vlmprune.testing's test-size models: for tests of the harness itself
    "llava-next-tiny": ("llava_next", None),
    "qwen2-vl-tiny": ("qwen2_vl", None),
}


def build_timing_model(name: str, llm_layers: int | None, vit_layers: int | None, dtype: Any, attn: str) -> Any:
    """A random-weight model of the named geometry (token ids as in :mod:`vlmprune.testing`)."""
    import transformers as tf

    from vlmprune import testing

    family, geometry = TIMING[name]
    if geometry is None:
        return testing.tiny_model(family, attn_implementation=attn, dtype=dtype)
    g = geometry(llm_layers, vit_layers)
    text = testing._text_cfg(**g["text"])
    torch.manual_seed(0)
    if family in ("llava", "llava_next"):
        cfg = testing._llava_config(
            family, g["vision"], text, **({"image_grid_pinpoints": g["pinpoints"]} if "pinpoints" in g else {})
        )
        cls = tf.LlavaNextForConditionalGeneration if family == "llava_next" else tf.LlavaForConditionalGeneration
    else:
        cfg = tf.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=g["vision"],
            image_token_id=testing._IMAGE,
            video_token_id=testing._VIDEO,
            vision_start_token_id=testing._VSTART,
            vision_end_token_id=testing._VEND,
            pad_token_id=testing._PAD,
        )
        cls = tf.Qwen2_5_VLForConditionalGeneration
    return cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """One sweep. ``keep`` entries: floats in (0, 1] are fractions, ints are counts per image."""

    models: list[str]
    out: str
    methods: list[str] = field(default_factory=lambda: ["random", "uniform", "hiprune", "visionzip"])
    keep: list[float | int] = field(default_factory=lambda: [0.25, 0.11])
    benchmark: str = "shapes"
    n: int = 200
    rounds: int = 5
    warmup: int = 1
    dtype: str = "float32"
    attn: str = "sdpa"
    threads: int | None = None
    decode_tokens: int = 16
    llm_layers: int | None = None
    vit_layers: int | None = None
    text_tokens: int = 40
    #: timing models: the image's patch grid (h, w) — Qwen: any even sizes (e.g. 74 74 = 1036 px, ~1 MP);
    #: LLaVA's CLIP takes its fixed 336 px whatever this says
    image_patches: list[int] | None = None
    batch_size: int = 16
    ideal: bool = True
    counter: bool = True

    def validate(self) -> None:
        """Every check that needs no model: bad values fail here, before anything is loaded."""
        if not self.models:
            raise ValueError("no models: pass --models PATH|timing:NAME ...")
        for m in self.models:
            if m.startswith("timing:"):
                if m[7:] not in TIMING:
                    raise ValueError(f"unknown timing model {m!r}; choose timing:{{{','.join(TIMING)}}}")
            elif not (Path(m) / "config.json").is_file():
                raise ValueError(f"model {m!r} is neither timing:<name> nor a checkpoint folder with config.json")
            else:
                mt = json.loads((Path(m) / "config.json").read_text()).get("model_type")
                if mt not in vlmprune.list_supported_models():
                    raise ValueError(f"{m}: model_type {mt!r} is not supported ({vlmprune.list_supported_models()})")
                if mt not in stats.FLOP_MODEL_TYPES:  # every row reports analytic FLOPs: fail before loading
                    raise ValueError(
                        f"{m}: vlmprune.stats has no FLOP formula for {mt!r} yet (it has: "
                        f"{', '.join(stats.FLOP_MODEL_TYPES)}), and every row of `eval run` reports analytic FLOPs. "
                        "Run this model through the lmms-eval plugin (accuracy, vision tokens and TTFT per sample; "
                        "no FLOPs), or add the formula."
                    )
                if self.benchmark != "none" and not has_processor(m):
                    raise ValueError(
                        f"{m} has no processor or tokenizer files, so it cannot answer --benchmark "
                        f"{self.benchmark}: save its processor there, or time it on synthetic inputs with "
                        "--benchmark none"
                    )
                info = Path(m) / "training.json"
                data = json.loads(info.read_text()).get("data") if info.is_file() else None
                if data and self.benchmark.split("-")[0] not in ("none", data):
                    raise ValueError(f"{m} was trained on {data!r}: evaluate it with --benchmark {data} (or none)")
        for meth, k in expand_settings(self.methods, self.keep):
            mcfg = setting_config(meth, k)  # ConfigError (a ValueError) names the problem
            inner = mcfg.prune_config() if isinstance(mcfg, vlmprune.DamroConfig) else mcfg
            layer = getattr(inner, "layer", None) if inner is not None and inner.name == "fastv" else None
            if layer is not None and self.llm_layers is not None and self.llm_layers <= layer:
                raise ValueError(f"fastv prunes after LLM layer {layer}: --llm-layers must be > {layer}")
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {self.benchmark!r} is not one of {BENCHMARKS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.attn not in ATTN:
            raise ValueError(f"attn {self.attn!r} is not one of {ATTN}")
        if self.attn == "flash_attention_2":
            if not torch.cuda.is_available():
                raise ValueError("attn=flash_attention_2 needs a CUDA GPU (and the flash-attn package)")
            if self.dtype == "float32":
                raise ValueError("attn=flash_attention_2 runs in float16 / bfloat16: pass --dtype bfloat16")
        if self.benchmark == "easyvqa":
            from importlib.util import find_spec

            if find_spec("easy_vqa") is None:
                raise ValueError("benchmark easyvqa needs the easy-vqa package: pip install 'vlmprune[eval]'")
        for name in ("n", "rounds", "text_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be >= 2 (tokens/s compares 1 and N), got {self.decode_tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.image_patches is not None:
            if len(self.image_patches) != 2 or any(v < 2 or v % 2 for v in self.image_patches):
                raise ValueError(f"image_patches must be two even sizes >= 2 (h w), got {self.image_patches}")
        for name in ("llm_layers", "vit_layers", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")

    def key(self, model: str, method: str | None, keep: Any) -> str:
        """What identifies a row: rows with the same key are not measured again."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if model.startswith("timing:"):
            what = f"{model}|L{self.llm_layers}|V{self.vit_layers}|T{self.text_tokens}"
            if self.image_patches is not None:
                what += f"|P{self.image_patches[0]}x{self.image_patches[1]}"
        else:
            what = f"{os.path.normpath(model)}|{self.benchmark}|{self.n}"
        return f"{what}|{method}|{keep!r}|{self.dtype}|{self.attn}|{device}"


def _keep(text: str) -> float | int:
    return int(text) if text.isdigit() else float(text)


def parse(argv: list[str] | None) -> RunConfig:
    p = argparse.ArgumentParser(
        prog="python -m eval run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="JSON file with any of the options below (flags override it)")
    p.add_argument("--models", nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--keep", nargs="+", type=_keep)
    p.add_argument("--benchmark", choices=BENCHMARKS)
    p.add_argument("--n", type=int, help="benchmark questions per setting")
    p.add_argument("--rounds", type=int, help="timing rounds per setting (median and min reported)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--attn", choices=ATTN)
    p.add_argument("--threads", type=int)
    p.add_argument("--decode-tokens", type=int)
    p.add_argument("--llm-layers", type=int, help="timing models: LLM depth (default: the real one)")
    p.add_argument("--vit-layers", type=int, help="timing models: vision tower depth (default: the real one)")
    p.add_argument("--text-tokens", type=int, help="timing models: text tokens around the image")
    p.add_argument(
        "--image-patches", type=int, nargs=2, metavar=("H", "W"), help="timing models (Qwen): image patch grid"
    )
    p.add_argument("--batch-size", type=int, help="benchmark batch size for accuracy")
    p.add_argument("--no-ideal", dest="ideal", action="store_false", default=None)
    p.add_argument("--no-counter", dest="counter", action="store_false", default=None)
    p.add_argument("--out", help="JSON-lines results file (appended; existing rows are skipped)")
    a = vars(p.parse_args(argv))
    cfg: dict[str, Any] = {}
    if a.pop("config"):
        cfg = json.loads(Path(p.parse_args(argv).config).read_text())
        unknown = set(cfg) - set(RunConfig.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"unknown keys in the config file: {sorted(unknown)}")
    cfg.update({k: v for k, v in a.items() if v is not None})
    missing = [k for k in ("models", "out") if k not in cfg]
    if missing:
        p.error(f"missing {', '.join('--' + m for m in missing)} (flags or config file)")
    rc = RunConfig(**cfg)
    try:
        rc.validate()
    except ValueError as e:
        p.error(str(e))
    return rc


# ----------------------------------------------------------------------------------------------- measurement
def _existing(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a truncated last line from a killed run: that row is measured again
    return keys


def _timing_inputs(model: Any, name: str, cfg: RunConfig, processor: Any, rows: list) -> dict[str, torch.Tensor]:
    from vlmprune.testing import make_inputs

    if processor is not None:
        from vlmprune.benchmarks import prompt_inputs

        return dict(prompt_inputs(processor, rows[:1]))
    half = cfg.text_tokens // 2
    if model.config.model_type == "llava":
        image: Any = "image"
    elif model.config.model_type in ("llava_next", "llava_onevision"):  # (H, W) in pixels: a 2 x 2 crop grid
        side = 2 * model.config.vision_config.image_size  # LLaVA-NeXT-7B: 672 x 672
        image = ("image", side, side)
    elif cfg.image_patches is not None:
        image = ("image", *cfg.image_patches)
    else:  # a 672 x 672 image: 48 x 48 patches -> 576 tokens, LLaVA-1.5's count
        image = ("image", 48, 48) if "tiny" not in name else ("image", 8, 8)
    return make_inputs(model, [[half, image, cfg.text_tokens - half]])


def _analytic(
    model: Any, inputs: dict, n_vis_in: int, n_vis_out: int, method: str | None, keep: Any
) -> dict[str, float]:
    cfg = model.config
    n_text = int(inputs["input_ids"][0].shape[0]) - n_vis_in
    grids, n_images = None, 1
    if "image_grid_thw" in inputs:
        grids = [tuple(int(v) for v in inputs["image_grid_thw"][0])]
    if cfg.model_type == "llava_next":  # the tower and projector run on every crop
        n_images = sum(stats.anyres_crops(cfg, inputs["image_sizes"]))
    elif cfg.model_type == "llava_onevision":  # crops of a lone image, base views of several, video frames
        frames = [int(v.shape[0]) for v in inputs.get("pixel_values_videos", [])]
        n_images = stats.onevision_tower_inputs(
            cfg, inputs.get("image_sizes"), inputs.get("batch_num_images"), video_frames=frames
        )
    mcfg = setting_config(method, keep) if method is not None else None
    return stats.prefill_flops(
        cfg, n_text=n_text, vision_in=n_vis_in, vision_out=n_vis_out, config=mcfg, n_images=n_images, grids=grids
    ).to_dict()


def _ideal(model: Any, inputs: dict, keep: Any) -> Any:
    """The unpatched modules on only the kept tokens: the vision tower on the image, the embedding lookup, then the
    language model on exactly the inputs a ``uniform``-patched run gives it (captured by a pre-hook registered
    after vlmprune's) and the lm_head on the last position. It skips the placeholder scatter and, for Qwen, the
    M-RoPE index computation, which every real run pays: on tiny models those fixed costs show up in
    ``overhead_ratio``; on 7B-sized ones they are negligible."""
    captured: dict[str, Any] = {}

    def hook(mod: Any, args: tuple, kwargs: dict) -> None:
        captured.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")})

    lm = model.model.language_model
    with vlmprune.patched(model, method="uniform", keep=keep), torch.inference_mode():
        handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            handle.remove()
    captured["use_cache"] = True
    vis_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    embed = model.get_input_embeddings()

    @torch.inference_mode()
    def run() -> torch.Tensor:
        model.model.get_image_features(**vis_kwargs)  # the vision work the ideal still does
        embed(inputs["input_ids"])  # and the token embedding lookup
        out = lm(**captured)
        return model.lm_head(out.last_hidden_state[:, -1:])

    return run


def measure_model(spec: str, cfg: RunConfig, todo: list[tuple[str | None, Any]], progress: bool = True) -> list[dict]:
    """All rows of one model (``todo``: the settings still missing; ``None`` = unpatched)."""
    from .accuracy import benchmark_rows, evaluate, load_checkpoint

    dtype = DTYPES[cfg.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor, rows = None, []
    if spec.startswith("timing:"):
        model = build_timing_model(spec[7:], cfg.llm_layers, cfg.vit_layers, dtype, cfg.attn).to(device)
    else:
        model, processor = load_checkpoint(spec, dtype=dtype, attn=cfg.attn)
        model = model.to(device)
        if cfg.benchmark != "none":
            rows = benchmark_rows(cfg.benchmark, "test", cfg.n)
    timing_rows = rows or (benchmark_rows("shapes", "test", 1) if processor is not None else [])
    inputs = {k: v.to(device) for k, v in _timing_inputs(model, spec, cfg, processor, timing_rows).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    image_id = model.config.image_token_id
    n_vis_in = int((inputs["input_ids"][0] == image_id).sum())
    settings: list[tuple[str | None, Any]] = [(None, None)] + [s for s in todo if s[0] is not None]

    # accuracy (checkpoints with a benchmark)
    acc: dict[str, dict] = {}
    if rows and cfg.benchmark != "none":
        ev = evaluate(
            model,
            processor,
            rows,
            [None if m is None else (m, k) for m, k in settings],
            batch_size=cfg.batch_size,
            progress=progress,
        )
        acc = {r["setting"]: r for r in ev}

    def contrasting() -> Any:
        """DAMRO contrasts inside generate() only: open its session so a measured prefill includes its branch."""
        method = getattr(getattr(model, "_vlmprune_state", None), "method", None)
        branch = getattr(method, "branch", None)
        return branch.contrasting() if branch is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def prefill() -> Any:
        with contrasting():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    vis_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}

    @torch.inference_mode()
    def encode() -> Any:
        """The vision side of the prefill alone (tower and projector, with the patch's encoder hooks)."""
        return model.model.get_image_features(**vis_kwargs)

    def counted_flops() -> dict[str, float]:
        with contrasting():
            return stats.count_flops(model, inputs, use_cache=True, logits_to_keep=1)

    def label(m: str | None, k: Any) -> str:
        return "unpatched" if m is None else f"{m}@{k}"

    # tokens, FLOPs (analytic and counted), KV cache and CUDA peak per setting
    info: dict[str, dict] = {}
    for m, k in settings:
        ctx = vlmprune.patched(model, setting_config(m, k)) if m is not None else contextlib.nullcontext()
        with ctx:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            out, peak_rss = peak_rss_delta(prefill)
            sync()
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            branch_tokens, branch_kv = None, 0
            if m is None:
                n_out = n_vis_in
            else:
                st = vlmprune.last_stats(model)
                n_out = int(st["images"][0]["tokens_out"]) if st.get("images") else n_vis_in
                branch_tokens = st.get("damro", {}).get("branch_tokens", [None])[0]
                branch_kv = st.get("damro", {}).get("branch_kv_bytes") or 0
            counted = counted_flops() if cfg.counter else None
        analytic = _analytic(model, inputs, n_vis_in, n_out, m, k)
        info[label(m, k)] = {
            "vision_tokens_at_llm": n_out,
            "contrast_branch_tokens": branch_tokens,
            "flops": analytic,
            "flops_counter": counted,
            "flops_analytic_over_counter": (analytic["prefill"] / counted["prefill"]) if counted else None,
            "kv_cache_bytes": (cache_bytes(output_cache(out)) or 0) + branch_kv or None,  # DAMRO: both caches
            "peak_cuda_bytes": peak,
            # CPU: resident memory the prefill needed above what the process held when it started (Linux)
            "peak_rss_delta_bytes": peak_rss if device == "cpu" else None,
        }
        del out

    # TTFT: every setting and the ideal references, interleaved
    fns: dict[str, Any] = {}
    for m, k in settings:
        if m is None:
            fns["unpatched"] = prefill
            fns["unpatched#vision"] = encode
        else:
            for name, fn in ((label(m, k), prefill), (f"{label(m, k)}#vision", encode)):
                fns[name] = (
                    lambda m=m, k=k: vlmprune.patch(model, setting_config(m, k)),
                    fn,
                    lambda: vlmprune.unpatch(model),
                )
    # ideal = the unpatched modules on the kept tokens: defined for pruning at the LLM input (not FastV, which prunes
    # inside the LLM, nor DAMRO, whose second branch no ideal run has)
    # (nor fastvlm's resolution / encoder_pool, whose encoder work differs from uniform's)
    plain = [
        (m, k)
        for m, k in settings
        if m is not None
        and not m.endswith("fastv")
        and not m.startswith("damro")
        and getattr(setting_config(m, k), "strategy", "pool") == "pool"
    ]
    keeps = list({repr(k): k for m, k in plain}.values())
    ideal_check: dict[Any, float] = {}
    if cfg.ideal:
        for k in keeps:
            fns[f"ideal@{k}"] = _ideal(model, inputs, k)
            with vlmprune.patched(model, method="uniform", keep=k):
                got = prefill().logits[:, -1:]
            ideal_check[k] = float((got - fns[f"ideal@{k}"]()).abs().max())  # sanity check of the capture
    timing = interleaved(fns, rounds=cfg.rounds, warmup=cfg.warmup, progress=progress)

    # decode speed: generate(N) and generate(1) interleaved in one pass; tokens/s = (N - 1) / (t_N - t_1), so
    # generate()'s fixed costs (input preparation, cache creation, the prefill itself) cancel
    dec_fns = {}
    for m, k in settings:
        for n_new in (1, cfg.decode_tokens):
            kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            if getattr(model.generation_config, "pad_token_id", None) is None:
                kw["pad_token_id"] = 0

            @torch.inference_mode()
            def gen(kw: dict = kw) -> Any:
                return model.generate(**inputs, **kw)

            dec_fns[f"{label(m, k)}#{n_new}"] = (
                gen
                if m is None
                else (
                    lambda m=m, k=k: vlmprune.patch(model, setting_config(m, k)),
                    gen,
                    lambda: vlmprune.unpatch(model),
                )
            )
    dec = interleaved(dec_fns, rounds=max(1, cfg.rounds // 2), warmup=1, progress=progress)

    machine = machine_info()
    threads = machine["torch_threads"]
    base_ttft = timing["unpatched"]["median_s"]
    base_flops = info["unpatched"]["flops"]["prefill"]
    out_rows = []
    for m, k in settings:
        if (m, k) not in todo:
            continue
        lab = label(m, k)
        t = timing[lab]
        ideal = timing.get(f"ideal@{k}") if (m, k) in plain else None
        dt_decode = dec[f"{lab}#{cfg.decode_tokens}"]["median_s"] - dec[f"{lab}#1"]["median_s"]
        a = acc.get(lab)
        row = {
            "key": cfg.key(spec, m, k),
            "model": spec,
            "model_type": model.config.model_type,
            "dtype": cfg.dtype,
            "attn_implementation": model.config._attn_implementation,
            "device": device,
            "benchmark": None if not a else cfg.benchmark,
            "n": len(rows) if a else None,
            "method": m,
            "keep": k,
            "config": setting_config(m, k).to_dict() if m is not None else None,
            "accuracy": a["accuracy"] if a else None,
            "pope": a.get("pope") if a else None,
            "per_type": a["per_type"] if a else None,
            "correct": "".join(map(str, a["correct"])) if a else None,
            "vision_tokens_in": n_vis_in,
            **info[lab],
            "flop_bound_speedup": base_flops / info[lab]["flops"]["prefill"],
            "ttft_ms_median": 1000 * t["median_s"],
            # the vision tower + projector alone (timed separately, same schedule); the rest is the LLM prefill
            "vision_ms_median": 1000 * timing[f"{lab}#vision"]["median_s"],
            "llm_prefill_ms_median": 1000 * (t["median_s"] - timing[f"{lab}#vision"]["median_s"]),
            "ttft_ms_min": 1000 * t["min_s"],
            "ttft_ms_all": [1000 * x for x in t["times_s"]],
            "speedup_vs_unpatched": base_ttft / t["median_s"],
            "unpatched_ttft_ms_median": 1000 * base_ttft,  # measured in this run, beside this row
            "cpu_per_wall": t["cpu_per_wall"],
            "contended": device == "cpu" and t["cpu_per_wall"] < 0.6 * threads,
            "ideal_ttft_ms_median": 1000 * ideal["median_s"] if ideal else None,
            "overhead_ratio": t["median_s"] / ideal["median_s"] if ideal else None,
            "ideal_check_max_abs_diff": ideal_check.get(k) if ideal else None,
            "decode_tokens_per_s": (cfg.decode_tokens - 1) / dt_decode if dt_decode > 0 else None,
            "timing": {"rounds": cfg.rounds, "warmup": cfg.warmup, "text_tokens": int(inputs["input_ids"].shape[1])},
            "depth": {"llm_layers": model.config.get_text_config().num_hidden_layers, "vit_layers": _vit_depth(model)},
            "machine": machine,
        }
        out_rows.append(row)
    return out_rows


def _vit_depth(model: Any) -> int:
    vc = model.config.vision_config
    return getattr(vc, "num_hidden_layers", None) or vc.depth


def run(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Run the sweep, appending new rows to ``cfg.out``; returns the rows written now."""

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _existing(out)
    written = []
    models = cfg.models
    if progress:
        from tqdm.auto import tqdm

        models = tqdm(cfg.models, desc="models", unit="model")
    for spec in models:
        wanted: list[tuple[str | None, Any]] = [(None, None), *expand_settings(cfg.methods, cfg.keep)]
        todo = [(m, k) for m, k in wanted if cfg.key(spec, m, k) not in done]
        if not todo:
            print(f"{spec}: all {len(wanted)} rows already in {out}, skipped")
            continue
        t0 = time.perf_counter()
        rows = measure_model(spec, cfg, todo, progress=progress)
        with out.open("a") as f:
            for r in rows:
                r["run"] = {"config": asdict(cfg), "seconds_for_model": time.perf_counter() - t0}
                f.write(json.dumps(r) + "\n")
        written += rows
        print(f"{spec}: wrote {len(rows)} rows to {out}")
    return written


def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    rows = run(cfg)
    for r in rows:
        acc = "" if r["accuracy"] is None else f" acc {100 * r['accuracy']:5.1f}%"
        print(
            f"  {r['model']:<34} {str(r['method']):<10} {str(r['keep']):<5} tok {r['vision_tokens_at_llm']:>4}"
            f"{acc}  TTFT {r['ttft_ms_median']:8.1f} ms  x{r['speedup_vs_unpatched']:.2f}"
            f" (FLOP bound x{r['flop_bound_speedup']:.2f})"
        )
