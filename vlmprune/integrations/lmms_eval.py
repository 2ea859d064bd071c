"""lmms-eval plugin: ``--model vlmprune`` runs any lmms-eval task on a pruned model, without forking lmms-eval.

    pip install "vlmprune[lmms]"
    python -m lmms_eval --model vlmprune \\
        --model_args pretrained=PATH,method=hiprune,keep=0.11,stats_path=out/vlmprune_stats.jsonl \\
        --tasks pope --batch_size 1 --output_path out/

How it plugs in: ``pyproject.toml`` registers :func:`manifests` in lmms-eval's entry-point group
``lmms_eval.models`` (lmms-eval >= 0.7). ``--model vlmprune`` then builds, from the checkpoint's
``config.model_type``, lmms-eval's *own* HF wrapper for that family (``llava_hf`` for LLaVA / LLaVA-NeXT /
LLaVA-OneVision, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``; the generic ``huggingface`` chat wrapper for
FastVLM), loads the model exactly as that wrapper does, and patches the loaded model with
:func:`vlmprune.patch`. Prompts, chat templates and generation settings are therefore those of lmms-eval's
unpruned baselines (``--model llava_hf`` etc.): only the vision tokens differ. Without ``method`` (or with
``method=none``) the model runs unpatched, with the same wrapper and the same measurements: the baseline row.

``--model_args``: ``pretrained`` and the wrapper's own options (``device_map``, ``dtype``, ``max_pixels``, ...)
go to lmms-eval's wrapper; ``method`` and that method's options (``keep``, ``seed``, ``layer``, ...) go to
:func:`vlmprune.patch`, validated before the model is loaded, with the same errors; a name that is neither
raises a :class:`~vlmprune.errors.ConfigError` with a "did you mean". Plus:

* ``stats_path``: a JSON-lines sidecar, one line per sample, rewritten by each run (give every run its own;
  ``.rank<N>`` is inserted before the suffix on ranks > 0): model, method config, task, split, doc_id, vision
  tokens in and at the LLM, LLM prompt tokens before/after, ``ttft_ms``, analytic prefill FLOPs by component.
  ``python -m eval report`` merges it (and the results JSON) with the harness's rows.
* ``timing`` (default true): ``ttft_ms`` per ``generate`` call, from entering ``generate`` to the end of its first
  forward (vision encoder, projector, LLM prefill, lm_head: time to the first token's logits; the processor is
  outside), device-synchronised at both ends. Set false to skip the synchronisations. With ``--batch_size`` > 1
  the samples of a batch share their batch's time.

What lands in lmms-eval's own output: per sample, ``token_counts.input_tokens`` is the LLM's prompt length
*after* pruning (so lmms-eval's ``efficiency`` block counts the tokens the LLM really saw); in
``results["throughput"]``, ``avg_vlmprune_*`` fields: vision tokens in / at the LLM, LLM prompt tokens, TTFT
ms (median), prefill GFLOPs (mean), keep, samples. lmms-eval hands all generation requests of a run (every
task) to one ``generate_until`` call, so these cover all tasks together, and with several processes they are
rank 0's; the sidecar has the per-sample numbers of every task and rank (rank padding excluded). A failure
inside ``generate`` (which lmms-eval's wrappers would log and score as an empty reply) is raised.

Generation tasks only: likelihood tasks (``output_type: loglikelihood``, which pass labels) are refused on a
pruned model (a pruned model's logits are in pruned coordinates); run them without ``method=``.

Data parallel: ``accelerate launch --num_processes N -m lmms_eval --model vlmprune ...`` — each process loads and
patches its own model (the patch is per instance) and lmms-eval shards the documents and gathers the scores. On a
CPU-only box add ``--multi_gpu`` (it only selects torch's distributed launcher; the processes talk over gloo) and
pass ``device_map=cpu`` and ``--device cpu``. The ``accelerate`` command imports timm whenever it is installed:
where torchvision was removed (CPU set-up), remove timm too (``scripts/setup.sh`` does).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms as _lmms
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "vlmprune's lmms-eval plugin needs lmms-eval >= 0.7: pip install 'vlmprune[lmms]' (on a CPU-only machine "
        "see the README's lmms-eval section first: the torchvision pin)."
    ) from e

import vlmprune
from vlmprune import stats as _stats
from vlmprune.errors import ConfigError, UnsupportedModelError

__all__ = ["MODEL_ID", "WRAPPERS", "VLMPruneChat", "VLMPruneSimple", "load_model", "manifests"]

MODEL_ID = "vlmprune"

_LLAVA = ("lmms_eval.models.chat.llava_hf.LlavaHf", "lmms_eval.models.simple.llava_hf.LlavaHf")
#: ``config.model_type`` -> (lmms-eval chat wrapper, simple wrapper); ``None`` where lmms-eval has none.
WRAPPERS: dict[str, tuple[str | None, str | None]] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "llava_onevision": _LLAVA,
    "qwen2_vl": (None, "lmms_eval.models.simple.qwen2_vl.Qwen2_VL"),
    "qwen2_5_vl": ("lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL"),
    "qwen3_vl": ("lmms_eval.models.chat.qwen3_vl.Qwen3_VL", "lmms_eval.models.simple.qwen3_vl.Qwen3_VL"),
    "fast_vlm": ("lmms_eval.models.chat.huggingface.Huggingface", None),
}

_UNPATCHED = (None, "", "none", "unpatched")
# passed by lmms-eval's CLI to every model; dropped when the wrapper does not take them
_CLI_EXTRAS = ("max_batch_size",)


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: one model id, ``vlmprune``, with a chat and a simple class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            chat_class_path=f"{__name__}.VLMPruneChat",
            simple_class_path=f"{__name__}.VLMPruneSimple",
        )
    ]


class VLMPruneChat(_lmms):
    """What ``--model vlmprune`` resolves to. Constructing it returns lmms-eval's wrapper for the checkpoint's
    family, patched (see :func:`load_model`); the object is an instance of that wrapper's subclass, not of this
    class."""

    is_simple = False

    def __new__(cls, **kwargs: Any) -> Any:  # noqa: D102 - documented on the class
        return load_model(chat=not cls.is_simple, **kwargs)

    # never reached: __new__ returns another class's instance; these only satisfy lmms' abstract interface
    def loglikelihood(self, requests: list) -> list:  # pragma: no cover
        raise NotImplementedError

    def generate_until(self, requests: list) -> list:  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests: list) -> list:  # pragma: no cover
        raise NotImplementedError


class VLMPruneSimple(VLMPruneChat):
    """``--model vlmprune --force_simple``: lmms-eval's *simple* wrapper for the family, patched."""

    is_simple = True


def _import(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _wrapper_class(model_type: str, chat: bool) -> type:
    chat_path, simple_path = WRAPPERS[model_type]
    path = (chat_path or simple_path) if chat else (simple_path or chat_path)
    assert path is not None
    return _import(path)


def _init_params(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _split_args(
    wrapper: type, method: Any, kwargs: dict[str, Any]
) -> tuple[vlmprune.PruneConfig | None, dict[str, Any]]:
    """``(config, wrapper kwargs)``: the method's options validated into a config; unknown names rejected."""
    wrapper_params = _init_params(wrapper)
    if isinstance(method, str):
        method = method.strip()
    options: dict[str, Any] = {}
    fields: list[str] = []
    if method not in _UNPATCHED:
        from vlmprune.methods import METHODS

        cfg_cls = METHODS.get(method)  # UnknownMethodError with "did you mean"
        fields = [f.name for f in dataclasses.fields(cfg_cls) if f.init]
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    rest = {}
    unknown = []
    for k, v in kwargs.items():
        if k in wrapper_params:
            rest[k] = v
        elif k not in _CLI_EXTRAS:
            unknown.append(k)
    if unknown:
        names = sorted(set(fields) | wrapper_params | {"method", "stats_path", "timing"})
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1, cutoff=0.6)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        what = f"method {method!r}" if fields else "an unpatched run (no method=)"
        raise ConfigError(
            f"Unknown --model_args for vlmprune: {', '.join(parts)}. {what} takes: "
            f"{', '.join(fields) or 'no method options'}; lmms-eval's {wrapper.__name__} takes: "
            f"{', '.join(sorted(wrapper_params))}; vlmprune's plugin: method, stats_path, timing."
        )
    if method in _UNPATCHED:
        return None, rest
    return vlmprune.make_config(method, **options), rest


_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    """A subclass of lmms-eval's wrapper ``base`` that patches the model it loaded and records what it did."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"VLMPrune{base.__name__}", (_PrunedWrapper, base), {"__module__": __name__})
    return _CLASSES[base]


def load_model(
    pretrained: str,
    method: str | None = None,
    *,
    chat: bool = True,
    stats_path: str | None = None,
    timing: bool = True,
    **kwargs: Any,
) -> Any:
    """lmms-eval's wrapper for ``pretrained``'s family, with the loaded model patched by ``method``.

    The Python-API twin of ``--model vlmprune``: pass the result to ``lmms_eval.evaluator.simple_evaluate(model=...)``.

    Args:
        pretrained: a local checkpoint folder (or anything the wrapper's ``from_pretrained`` accepts).
        method: a :func:`vlmprune.list_methods` name, or ``None`` / ``"none"`` for the unpatched baseline.
        chat: use lmms-eval's chat wrapper where the family has one (its default), else the simple one.
        stats_path: per-sample JSON-lines sidecar (see the module docstring).
        timing: device-synchronised prefill timing.
        **kwargs: the method's options (``keep=0.11``...) and the wrapper's (``device_map="cpu"``...).

    Raises:
        UnknownMethodError, ConfigError: bad method or options (before anything is loaded).
        UnsupportedModelError: the checkpoint's ``model_type`` has no lmms-eval wrapper here, or no vlmprune
            adapter while a method is asked for.
    """
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(pretrained).model_type
    if model_type not in WRAPPERS:
        raise UnsupportedModelError(
            f"{pretrained}: model_type {model_type!r} has no lmms-eval wrapper in vlmprune's plugin. Supported: "
            f"{', '.join(sorted(WRAPPERS))}."
        )
    base = _wrapper_class(model_type, chat)
    config, rest = _split_args(base, method, dict(kwargs))
    if config is not None and model_type not in vlmprune.list_supported_models():
        raise UnsupportedModelError(
            f"{pretrained}: model_type {model_type!r} is not supported by vlmprune.patch yet (supported: "
            f"{', '.join(vlmprune.list_supported_models())}); run it without method= for the unpatched baseline."
        )
    if isinstance(timing, str):
        timing = timing.lower() not in ("0", "false", "no")
    return _pruned_class(base)(
        pretrained=pretrained, vlmprune_config=config, stats_path=stats_path, timing=bool(timing), **rest
    )


# --------------------------------------------------------------------------------------------- doc-fetch taps
class _DocTap:
    """A split of a task's dataset that notes which documents the wrapper fetched (``split[doc_id]``), so the
    next prefill can be attributed to them. Everything else is forwarded."""

    def __init__(self, data: Any, task: str, split: str, sink: list) -> None:
        self._data, self._task, self._split, self._sink = data, task, split, sink

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            self._sink.append((self._task, self._split, key))
        return self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


class _SplitTap:
    def __init__(self, data: Any, task: str, sink: list) -> None:
        self._data, self._task, self._sink = data, task, sink

    def __getitem__(self, split: Any) -> Any:
        return _DocTap(self._data[split], self._task, split, self._sink)

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


class _TaskDict(dict):
    """``lm.task_dict`` (lmms-eval's evaluator fills it ``task -> DatasetDict``; wrappers read
    ``task_dict[task][split][doc_id]`` right before generating): reads go through the taps."""

    def __init__(self, sink: list, *args: Any) -> None:
        super().__init__(*args)
        self._sink = sink

    def __getitem__(self, task: Any) -> Any:
        return _SplitTap(super().__getitem__(task), task, self._sink)


# ------------------------------------------------------------------------------------------------- recording
def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, XPU, MPS; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type in ("xpu", "mps"):
        getattr(torch, device.type).synchronize()


class _Recorder:
    """Per ``generate`` call on the HF model: the docs it served, token counts, time to the end of the prefill and
    analytic FLOPs. The clock starts when ``generate`` is entered and stops after its first forward (newer
    transformers run the vision encoder before that forward, older ones inside it: both are counted), each end
    device-synchronised; the processor's work is outside."""

    def __init__(self, model: torch.nn.Module, config: vlmprune.PruneConfig | None, timing: bool) -> None:
        self.model, self.config, self.timing = model, config, timing
        self.pending: list[tuple[str, str, int]] = []
        self.records: list[dict[str, Any]] = []
        #: exceptions raised inside generate (lmms-eval's wrappers catch them and score an empty reply)
        self.errors: list[BaseException] = []
        self._t0: float | None = None
        self._kw: dict[str, Any] | None = None
        self._had_generate = "generate" in model.__dict__
        self._orig_generate = model.__dict__.get("generate")
        self._wrapper = self._make_generate(model.generate)
        model.generate = self._wrapper
        self.handle = model.register_forward_hook(self._post, with_kwargs=True)  # not on a raising forward

    def _make_generate(self, original: Any) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            kw = dict(kwargs)
            if args and isinstance(args[0], torch.Tensor):
                kw["input_ids"] = args[0]
            ids = kw.get("input_ids")
            if self.timing and isinstance(ids, torch.Tensor):
                _sync(ids.device)
            self._kw, self._t0 = kw, time.perf_counter()
            try:
                return original(*args, **kwargs)
            except Exception as e:
                self.errors.append(e)
                raise
            finally:
                self._kw = self._t0 = None
                self.pending.clear()  # docs fetched for a call that never reached its first forward

        return generate

    def _post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._kw is None or self._t0 is None:
            return
        kw, t0 = self._kw, self._t0
        self._kw = self._t0 = None  # only the first forward of this generate call
        ids = kw.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return
        if self.timing:
            _sync(ids.device)
        dt = time.perf_counter() - t0
        docs, self.pending[:] = list(self.pending), []
        try:
            rows = self._rows(kw, ids)
        except Exception as e:  # noqa: BLE001 - bookkeeping must never break an evaluation
            rows = [{"error": f"{type(e).__name__}: {e}"} for _ in range(int(ids.shape[0]))]
        for i, row in enumerate(rows):
            row["ttft_ms"] = 1000 * dt if self.timing else None
            row["batch_rows"] = len(rows)
            if len(docs) == len(rows):
                row["task"], row["split"], row["doc_id"] = docs[i]
            self.records.append(row)

    def _rows(self, kw: dict[str, Any], ids: torch.Tensor) -> list[dict[str, Any]]:
        cfg = self.model.config
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask.sum(-1)
        else:
            real = torch.full((ids.shape[0],), ids.shape[1])

        def count(*names: str) -> torch.Tensor:
            tok = [getattr(cfg, n, None) for n in names]
            tok = torch.tensor([t for t in tok if t is not None], device=ids.device, dtype=ids.dtype)
            return torch.isin(ids, tok).sum(-1) if tok.numel() else torch.zeros(ids.shape[0], dtype=torch.long)

        img_in, vid_in = count("image_token_id", "image_token_index"), count("video_token_id")
        vis_in = img_in + vid_in
        # last_stats is written by prefills that carry images only: a text-only batch must not read a stale one
        st = vlmprune.last_stats(self.model) if self.config is not None and int(vis_in.sum()) else {}
        merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 1) or 1

        def grids_of(name: str) -> list[tuple[int, ...]]:
            g = kw.get(name)
            return [tuple(int(v) for v in row) for row in g] if isinstance(g, torch.Tensor) else []

        queues = {"image": grids_of("image_grid_thw"), "video": grids_of("video_grid_thw")}
        # anyres families: (placeholders, tower inputs) per image and per video, in batch order
        anyres: list[tuple[int, int]] = []
        videos: list[tuple[int, int]] = []
        state = getattr(self.model, "_vlmprune_state", None)
        strategy = getattr(cfg, "vision_feature_select_strategy", None)
        if cfg.model_type == "llava_next" and isinstance(kw.get("image_sizes"), torch.Tensor):
            from vlmprune.patches.llava_next import LlavaNextAdapter

            adapter = state.adapter if state is not None else LlavaNextAdapter()
            for hw in kw["image_sizes"]:
                lay = adapter.layout(self.model, hw, strategy)
                anyres.append((lay.n, lay.n_units))
        elif cfg.model_type == "llava_onevision":  # a lone image: crops; several: base views; a video: its frames
            from vlmprune.patches.llava_onevision import LlavaOnevisionAdapter

            ov = state.adapter if state is not None else LlavaOnevisionAdapter()
            if isinstance(kw.get("image_sizes"), torch.Tensor):
                aspect = kw.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
                sizes = kw["image_sizes"]
                lone = _stats.onevision_lone_images(kw.get("batch_num_images"), len(sizes))
                for hw, one in zip(sizes, lone, strict=True):
                    lay = ov.image_layout(self.model, hw, strategy, aspect, one)
                    anyres.append((lay.n, lay.n_units))
            pv = kw.get("pixel_values_videos")
            if isinstance(pv, torch.Tensor) and pv.ndim == 5:
                frames = int(pv.shape[1])
                videos = [(ov.video_layout(self.model, frames, strategy).n, frames)] * int(pv.shape[0])

        def take(kind: str, n_tokens: int) -> list[tuple[int, ...]]:
            """This row's grids: the next ones in the batch's order, until they cover its placeholders."""
            mine: list[tuple[int, ...]] = []
            while queues[kind] and sum(t * h * w for t, h, w in mine) // merge**2 < n_tokens:
                mine.append(queues[kind].pop(0))
            return mine

        out: list[dict[str, Any]] = []
        for r in range(ids.shape[0]):
            n_in = int(vis_in[r])
            n_real = int(real[r])
            if st:
                n_out = sum(i["tokens_out"] for i in st["images"] if i["row"] == r)
                llm_len = int(st["seq_len_out"][r])
            else:
                n_out, llm_len = n_in, n_real
            row_grids = take("image", int(img_in[r])) + take("video", int(vid_in[r]))
            flops = None
            try:
                n_images = 0
                if cfg.model_type == "llava":  # one CLIP image = (size / patch)^2 placeholders
                    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
                    n_images = round(n_in / per_image)
                elif anyres or videos:  # this row's images (videos), until they cover its placeholders
                    for queue, need in ((anyres, int(img_in[r])), (videos, int(vid_in[r]))):
                        covered = 0
                        while queue and covered < need:
                            tokens, units = queue.pop(0)
                            covered += tokens
                            n_images += units  # base views, crops and frames all run the tower
                flops = _stats.prefill_flops(
                    cfg,
                    n_text=n_real - n_in,
                    vision_in=n_in,
                    vision_out=n_out,
                    config=self.config,
                    n_images=n_images,
                    grids=row_grids,
                ).to_dict()
            except ValueError:
                flops = None  # no formula for this family (see vlmprune.stats.vision_flops)
            out.append(
                {
                    "vision_tokens_in": n_in,
                    "vision_tokens_at_llm": n_out,
                    "prompt_tokens": n_real,
                    "llm_prompt_tokens": llm_len,
                    "selection_ms": 1000 * st["selection_s"] if st else None,
                    "flops": flops,
                }
            )
        return out

    def remove(self) -> None:
        """Take the hook and the ``generate`` wrapper off the model (only if the wrapper is still the one there)."""
        self.handle.remove()
        if self.model.__dict__.get("generate") is self._wrapper:
            if self._had_generate:
                self.model.generate = self._orig_generate
            else:
                del self.model.__dict__["generate"]


class _PrunedWrapper:
    """Mixed in before lmms-eval's wrapper (see :func:`_pruned_class`)."""

    def __init__(
        self,
        *,
        vlmprune_config: vlmprune.PruneConfig | None,
        stats_path: str | None,
        timing: bool,
        **kwargs: Any,
    ) -> None:
        self._vlmprune_pretrained = str(kwargs.get("pretrained", ""))  # not every wrapper keeps it
        super().__init__(**kwargs)
        model = self.model  # the wrappers' property: the HF model, unwrapped from accelerate
        self.vlmprune_config = vlmprune_config
        if vlmprune_config is not None:
            vlmprune.patch(model, vlmprune_config)
        self._vlmprune = _Recorder(model, vlmprune_config, timing)
        self._vlmprune_stats_path = stats_path
        self._vlmprune_sidecar_open = False
        self._vlmprune_model = model
        self.task_dict = _TaskDict(self._vlmprune.pending, self.task_dict)

    @property
    def _vlmprune_sidecar(self) -> Path | None:
        if not self._vlmprune_stats_path:
            return None
        p = Path(self._vlmprune_stats_path)
        rank = int(getattr(self, "rank", 0) or 0)  # lmms-eval sets the global rank when WORLD_SIZE > 1
        return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")

    def loglikelihood(self, requests: list) -> list:
        if self.vlmprune_config is not None:
            raise NotImplementedError(
                "vlmprune's lmms-eval plugin runs generation tasks (output_type: generate_until) on pruned models. "
                "Likelihood tasks pass labels, and a pruned model's logits are in pruned coordinates, so their "
                "scores would be misaligned: run likelihood tasks without method= (unpatched)."
            )
        return super().loglikelihood(requests)

    def generate_until(self, requests: list) -> list:
        return self._vlmprune_call(super().generate_until, requests)

    def generate_until_multi_round(self, requests: list) -> list:
        return self._vlmprune_call(super().generate_until_multi_round, requests)

    def _vlmprune_call(self, run: Any, requests: list) -> list:
        rec = self._vlmprune
        start, errors = len(rec.records), len(rec.errors)
        rec.pending.clear()
        res = run(requests)
        if len(rec.errors) > errors:  # lmms-eval's wrappers log these and score an empty reply: fail instead
            first = rec.errors[errors]
            raise RuntimeError(
                f"vlmprune: generate() failed on {len(rec.errors) - errors} request(s) of this batch of "
                f"{len(requests)}; first error: {type(first).__name__}: {first}"
            ) from first
        new = rec.records[start:]
        # rank padding (lmms-eval repeats a document so every rank gets as many requests) is not a sample
        wanted: dict[tuple, int] = {}
        for req in requests:
            if not (getattr(req, "metadata", None) or {}).get("__padding_only__"):
                key = (req.args[-2], req.args[-1], req.args[-3])  # args end with (doc_id, task, split)
                wanted[key] = wanted.get(key, 0) + 1
        samples = []
        for r in new:
            key = (r.get("task"), r.get("split"), r.get("doc_id"))
            if "doc_id" not in r or wanted.get(key, 0) > 0:
                samples.append(r)
                if "doc_id" in r:
                    wanted[key] -= 1
        by_doc = {(r["task"], r["split"], r["doc_id"]): r for r in new if "doc_id" in r}
        out = []
        for req, item in zip(requests, res, strict=True):
            doc_id, task, split = req.args[-3:]
            row = by_doc.get((task, split, doc_id))
            if row is None or "llm_prompt_tokens" not in row:
                out.append(item)
                continue
            if isinstance(item, GenerationResult):
                counts = item.token_counts or TokenCounts()
                counts.input_tokens = row["llm_prompt_tokens"]
                item.token_counts = counts
            elif isinstance(item, str):
                item = GenerationResult(text=item, token_counts=TokenCounts(input_tokens=row["llm_prompt_tokens"]))
            out.append(item)
        self._vlmprune_log(samples)
        return out

    def vlmprune_close(self) -> None:
        """Take the plugin's timing wrapper off the model, then unpatch it (in that order: DAMRO's own
        ``generate`` wrapper lies underneath). The wrapper is unusable for pruned evaluation afterwards."""
        self._vlmprune.remove()
        if vlmprune.is_patched(self._vlmprune.model):
            vlmprune.unpatch(self._vlmprune.model)

    def _vlmprune_log(self, new: list[dict[str, Any]]) -> None:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        good = [r for r in new if "llm_prompt_tokens" in r]
        config = self.vlmprune_config.to_dict() if self.vlmprune_config is not None else None
        path = self._vlmprune_sidecar
        if path is not None and new:
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = "a" if self._vlmprune_sidecar_open else "w"  # each run starts its sidecar afresh
            self._vlmprune_sidecar_open = True
            with path.open(mode) as f:
                for r in new:
                    f.write(json.dumps({"model": self._vlmprune_pretrained, "config": config, **r}) + "\n")
        if not good:
            return
        extra: dict[str, Any] = {
            "vlmprune_samples": len(good),
            # keep as configured: a fraction, or (an int) tokens per image
            "vlmprune_keep": 1.0 if self.vlmprune_config is None else float(self.vlmprune_config.keep),
            "vlmprune_vision_tokens_in": statistics.fmean(r["vision_tokens_in"] for r in good),
            "vlmprune_vision_tokens_at_llm": statistics.fmean(r["vision_tokens_at_llm"] for r in good),
            "vlmprune_llm_prompt_tokens": statistics.fmean(r["llm_prompt_tokens"] for r in good),
        }
        times = [r["ttft_ms"] for r in good if r.get("ttft_ms") is not None]
        if times:
            extra["vlmprune_ttft_ms_median"] = statistics.median(times)
        flops = [r["flops"]["prefill"] for r in good if r.get("flops")]
        if len(flops) == len(good):
            extra["vlmprune_prefill_gflops"] = statistics.fmean(flops) / 1e9
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=extra)

    def vlmprune_records(self) -> list[dict[str, Any]]:
        """Per-prefill-row records so far (what the sidecar holds)."""
        return [dict(r) for r in self._vlmprune.records]
