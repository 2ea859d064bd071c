"""The shared cut for transformers' VLM classes: vision tokens are dropped at the entry of the language model.

Adapters decide *where to cut*; methods decide *what to keep*. Every supported family has the same skeleton
(``model.model`` = ``*Model`` with ``get_placeholder_mask`` and ``language_model``, called with keyword arguments
only), so one mechanism serves all of them (see ``shared/engineering.md`` of the project for the measurements):

1. a forward pre-hook on ``model.model`` records the call's image inputs (grids, pixels for seeding);
2. ``model.model.get_placeholder_mask`` is shadowed *on the instance* to record the image / video mask the model
   itself used;
3. a forward pre-hook (with kwargs) on ``model.model.language_model`` rewrites its inputs: in prefill it asks the
   method which vision tokens to keep, then gathers ``inputs_embeds``, ``attention_mask`` and ``position_ids``
   (1-D, or 3/4 rows for M-RoPE) with one index per row, re-padded on the original side; in every decode step it
   translates ``generate()``'s bookkeeping (kept in the original, unpruned coordinates) to the pruned cache;
4. a forward hook on the language model records which cache the prefill filled, so decode steps are recognised
   by cache identity and unrelated calls pass straight through;
5. ``create_masks_for_generate`` is shadowed on the instance so static caches get a translated mask.

Everything is an instance-level hook or instance attribute, removed exactly by :meth:`PatchState.remove`.
Nothing replaces ``forward`` (that would fight accelerate's hooks) and no attention implementation is changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import threading
import time
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from .._ops import cache_of, output_cache, repad_index
from .._versions import TESTED
from ..config import PruneConfig
from ..errors import (
    ConfigError,
    LabelsWhilePruningError,
    PatchBypassedError,
    PlaceholderMismatchError,
    UnsupportedInputError,
    UnsupportedModelError,
)
from ..methods.base import ImageTokens, Method, Selection

__all__ = ["Adapter", "Part", "PatchState", "Segment", "content_key", "split_budget", "STATE_ATTR"]

STATE_ATTR = "_vlmprune_state"


def content_key(t: torch.Tensor | None) -> int:
    """A 63-bit hash of (a fixed subsample of) a tensor's values, used to seed randomness by content.

    Args:
        t: any tensor (typically one image's pixel values); ``None`` gives 0.
    """
    if t is None or t.numel() == 0:
        return 0
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(sample.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclasses.dataclass
class Part:
    """A sub-grid of one item's tokens that is pruned on its own, with its share of the item's budget (LLaVA-NeXT:
    the base view and the unpadded high-resolution crops). Tokens of an item that no part lists are always kept
    (LLaVA-NeXT's image-newline tokens).

    Attributes:
        rows: ``(n_j,)`` int64, increasing indices into the item's tokens, in the raster order of ``grid``.
        grid: ``(t, h, w)`` with ``t * h * w == n_j``.
        name: shown in :func:`vlmprune.last_stats` (``"base"``, ``"crops"``).
    """

    rows: torch.Tensor
    grid: tuple[int, int, int]
    name: str = ""


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split an item's budget ``k`` over parts of ``sizes`` tokens in proportion to their sizes (largest
    remainder; ties to the earlier part), each non-empty part getting at least one token while ``k`` allows.

    Example: ``split_budget(10, [16, 64]) == [2, 8]``.
    """
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    exact = [k * n / total for n in sizes]
    out = [min(n, int(e)) for n, e in zip(sizes, exact, strict=True)]
    order = sorted(range(len(sizes)), key=lambda j: (-(exact[j] - int(exact[j])), j))
    for j in order:
        if sum(out) >= k:
            break
        if out[j] < sizes[j]:
            out[j] += 1
    for j, n in enumerate(sizes):  # never wipe a part out while another has more than one token to give
        if n and out[j] == 0:
            donor = max(range(len(sizes)), key=lambda i: (out[i], -i))
            if out[donor] > 1:
                out[donor] -= 1
                out[j] = 1
    return out


def _part_extras(extras: dict[str, Any], rows: torch.Tensor, n: int) -> dict[str, Any]:
    """One part's view of an item's extras: per-token tensors (first dimension ``n``, or ``n + 1`` with a leading
    CLS row, which every part keeps) are cut to ``rows``; anything else is passed as it is."""
    out: dict[str, Any] = {}
    for name, v in extras.items():
        if isinstance(v, dict):
            out[name] = _part_extras(v, rows, n)
        elif isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] in (n, n + 1):
            lead = int(v.shape[0]) - n
            r = rows.to(v.device) + lead
            out[name] = torch.cat([v[:lead], v[r]]) if lead else v[r]
        else:
            out[name] = v
    return out


@dataclasses.dataclass
class Segment:
    """One image (or video) of the batch as it sits in the LLM input.

    Attributes:
        row: batch row.
        positions: ``(n,)`` sequence positions of its placeholder tokens in ``row``.
        grid: ``(t, h, w)`` of the prunable tokens (the last ``t*h*w`` of ``positions``); with ``parts``, the
            item's nominal grid (shown in stats only).
        kind: ``"image"`` / ``"video"``.
        key: content hash for seeding.
        prefix: leading tokens that are always kept (e.g. CLS under LLaVA's ``"full"`` feature strategy).
        index: position among this call's items of ``kind`` in the model's encoding order.
        parts: sub-grids pruned separately (see :class:`Part`), or ``None`` for one grid after ``prefix``.
    """

    row: int
    positions: torch.Tensor
    grid: tuple[int, int, int]
    kind: str
    key: int
    prefix: int = 0
    index: int = 0
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    parts: list[Part] | None = None

    @property
    def prunable(self) -> torch.Tensor:
        """``(n',)`` the sequence positions of the tokens a method may drop (no prefix, no always-kept token)."""
        if self.parts is None:
            return self.positions[self.prefix :]
        rows = torch.cat([p.rows for p in self.parts]).sort().values
        return self.positions[rows.to(self.positions.device)]


@dataclasses.dataclass
class PrefillView:
    """The whole, unpruned LLM input of a prefill with images, shown to :meth:`Method.observe_prefill`.

    Attributes:
        embeds: ``(B, L, D)`` ``inputs_embeds`` with the vision tokens merged in.
        real: ``(B, L)`` bool, non-pad tokens.
        segments: every image / video in the batch, with its positions and extras.
        position_ids: the positions the model passed (``(B, L)``, or ``(3|4, B, L)`` for M-RoPE), or ``None``.
        right_padded: whether the batch is padded on the right.
        mrope: whether positions are multi-axis (Qwen-VL).
        extra: the LLM's other per-token inputs (Qwen3-VL's ``visual_pos_masks`` / ``deepstack_visual_embeds``),
            to be gathered with ``adapter.gather_extra`` like the sequence.
    """

    embeds: torch.Tensor
    real: torch.Tensor
    segments: list[Segment]
    position_ids: torch.Tensor | None
    right_padded: bool
    mrope: bool
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VisionItem:
    """What an adapter knows about one image of the current call, in the model's global image order."""

    kind: str
    num_tokens: int
    grid: tuple[int, int, int]
    key: int
    prefix: int = 0
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-item values for the method (+ its own)
    parts: list[Part] | None = None  # see Part: sub-grids pruned separately; the other tokens are always kept


@dataclasses.dataclass
class _Call:
    """State of one call of the inner VLM (``model.model``)."""

    expects_vision: bool
    kwargs: dict[str, Any]
    image_mask: torch.Tensor | None = None
    video_mask: torch.Tensor | None = None
    prefill_done: bool = False
    encoded: dict[str, list[VisionItem]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Prefill:
    """What a pruned prefill did, needed to translate every later decode step."""

    idx: torch.Tensor  # [B, Lp] gather index into the original sequence
    slot_valid: torch.Tensor  # [B, Lp] bool: slot holds a kept (real) token
    length: int  # L, original prompt length
    pruned_length: int  # Lp
    dropped: torch.Tensor  # [B] real tokens dropped per row
    contiguous: bool
    next_pos: torch.Tensor | None = None  # [..., B] original position of the first generated token, per row
    last_dropped: int = -1  # largest original index of a dropped token (crops must stay after it)
    cache_ref: Any = None
    seen: int = 0  # tokens in the pruned cache; tracked here because some caches can't report it reliably
    # [B] how far the M-RoPE positions after a re-gridded image (Selection.grid) moved down, per row: decode
    # positions that generate() derives from the original prompt are moved by the same amount
    shift: torch.Tensor | None = None

    def translate_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Map a 2-D mask in original coordinates ``[B, L + t]`` to the pruned cache ``[B, Lp + t]``."""
        idx = self.idx.to(mask.device)
        head = mask[:, : self.length].gather(1, idx) * self.slot_valid.to(mask.device, mask.dtype)
        return torch.cat([head, mask[:, self.length :]], dim=1)

    def shrink(self, n: int) -> None:
        """Forget the last ``n`` prefill tokens (all kept text tokens after the last dropped one)."""
        self.length -= n
        self.pruned_length -= n
        self.idx = self.idx[:, : self.pruned_length]
        self.slot_valid = self.slot_valid[:, : self.pruned_length]
        if self.next_pos is not None:
            self.next_pos = self.next_pos - n

    def decode_mask(self, mask: torch.Tensor | None, clen: int, q: int) -> torch.Tensor | None:
        """The 2-D mask for a step that adds ``q`` tokens to a pruned cache holding ``clen``.

        ``generate()`` keeps masks in original coordinates (``L + clen - Lp + q`` columns), or passes none when
        the prompt had no padding; after a re-padding prune the pad slots must still be masked.
        """
        if mask is None:
            if bool(self.slot_valid.all()):
                return None
            valid = self.slot_valid.long()
            return torch.cat([valid, valid.new_ones(valid.shape[0], clen - self.pruned_length + q)], dim=1)
        original_cols = self.length + (clen - self.pruned_length) + q
        if mask.shape[1] == original_cols:  # generate's bookkeeping: always original coordinates
            return self.translate_mask(mask)
        if mask.shape[1] == clen + q:
            return mask
        raise UnsupportedInputError(
            f"decode step got an attention_mask with {mask.shape[1]} columns; after pruning the cache holds {clen} "
            f"tokens, so {original_cols} (original coordinates) or {clen + q} (pruned) were expected. Continuing a "
            "pruned cache with a longer prompt is not supported: start a new generate() call."
        )


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - legacy tuple caches
        return int(cache[0][0].shape[-2]) if len(cache) else 0


class Adapter:
    """Base adapter. Subclasses set :attr:`model_types` and implement :meth:`describe`.

    Attributes:
        model_types: ``config.model_type`` values handled.
        mrope: whether the LLM uses multi-axis RoPE positions (``[3, B, L]``), which must stay the original ones.
        tested_transformers: human-readable range the adapter was tested on (shown in errors and docs).
        provides: the extra signals (``Method.requires``) this adapter can supply.
        label / hf_class / inputs / positions: what the README's supported-models table shows (generated by
            :func:`vlmprune.patches.supported_models_table`).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = ""
    hf_class: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ("images", "multi-image")
    positions: ClassVar[str] = "`contiguous` (default) or `original`"
    mrope: ClassVar[bool] = False
    tested_transformers: ClassVar[str] = ", ".join(TESTED)
    provides: ClassVar[frozenset[str]] = frozenset()  # extra signals methods may require (see Method.requires)

    # ---- structure -----------------------------------------------------------------------------------------
    def locate(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Return ``(vlm, language_model)``, checking the features the cut relies on (not version numbers)."""
        vlm = getattr(model, "model", None)
        lm = getattr(vlm, "language_model", None)
        missing = [
            name
            for name, ok in (
                ("model.model", isinstance(vlm, nn.Module)),
                ("model.model.language_model", isinstance(lm, nn.Module)),
                ("model.model.get_placeholder_mask", callable(getattr(vlm, "get_placeholder_mask", None))),
            )
            if not ok
        ]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model.config.model_type!r}) lacks {', '.join(missing)}; "
                "vlmprune patches transformers' *ForConditionalGeneration classes (transformers "
                f"{self.tested_transformers}). Pass the ForConditionalGeneration model, not a sub-module."
            )
        return vlm, lm

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        """Describe the images (``kind="image"``) or videos that ``get_{kind}_features`` just encoded.

        Args:
            kind: ``"image"`` or ``"video"``.
            inputs: the arguments ``get_{kind}_features`` was called with, by name (pixels, grids, ...).
            features: its per-item outputs, each ``(n_i, D)``, in the model's order.
        """
        raise NotImplementedError

    def check_config(self, model: nn.Module, config: PruneConfig) -> None:
        """Refuse, with a :class:`ConfigError`, a config this model cannot run (``config``: the one that decides
        budgets, i.e. DAMRO's pruning config). Called before the model is touched; default: accept."""

    def gather_extra(self, kwargs: dict[str, Any], idx: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Prune the LLM's other per-token inputs like the sequence (``idx`` ``(B, L')`` gathers original positions,
        ``slot_valid`` marks real slots), in place in ``kwargs``. Families whose LLM takes some (Qwen3-VL's
        DeepStack) override this; by default such inputs are refused rather than left inconsistent."""
        for name in ("visual_pos_masks", "deepstack_visual_embeds"):
            if kwargs.get(name) is not None:
                raise UnsupportedModelError(
                    f"the language model received {name!r}, which the {type(self).__name__} does not prune "
                    "consistently; use the adapter for this model_type."
                )

    def fallback_item(self, kind: str, feature: torch.Tensor, call: _Call, index: int, model: nn.Module) -> VisionItem:
        """Describe a pre-encoded item the user passed in ``mm_encoder_outputs`` (no pixels seen)."""
        n = int(feature.shape[0])
        return VisionItem(kind, n, (1, 1, n), content_key(feature))


class PatchState:
    """Everything one patch installed on one model; :meth:`remove` undoes all of it."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: PruneConfig, method: Method) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self.method = method
        # the config that decides budgets and positions: the method's own, or (DAMRO) its main-branch pruning's
        self.prune_config: PruneConfig = getattr(method, "prune_config", config)
        self.vlm, self.lm = adapter.locate(model)
        missing = set(method.requires) - set(adapter.provides)
        if missing:
            raise UnsupportedModelError(
                f"method {config.name!r} needs {sorted(missing)}, which the {model.config.model_type!r} adapter "
                f"cannot provide (it provides {sorted(adapter.provides) or 'nothing extra'}). "
                + getattr(
                    method,
                    "unsupported_hint",
                    "Use a method that needs no vision-tower signal on this model (e.g. uniform, pool, random).",
                )
            )
        adapter.check_config(model, self.prune_config)
        mode = self.prune_config.position_mode
        if adapter.mrope:
            if mode == "contiguous":
                raise ConfigError(
                    f"position_mode='contiguous' is not valid for {model.config.model_type!r}: its M-RoPE positions "
                    "encode the image grid, so kept tokens must keep their original positions. Use 'auto' or "
                    "'original'."
                )
            mode = "original"
        elif mode == "auto":
            mode = "contiguous"
        self.position_mode = mode
        self.handles: list[Any] = []
        self.shadowed: list[tuple[Any, str]] = []
        self.call: _Call | None = None
        self.record: _Prefill | None = None
        self.stats: dict[str, Any] = {}
        self._encoded: dict[int, tuple[Any, VisionItem]] = {}
        self._cropped: Any = None
        self._labels_given = False
        #: True while a method runs the language model for itself (DAMRO's contrastive branch): hooks stand aside
        self.passthrough = False
        self._encoding: int | None = None  # the thread inside a get_{image,video}_features call
        self._call_thread: int | None = None  # the thread whose forward is in flight (self.call)
        # every cache a pruned prefill filled (weakly): a decode step on one of them that is not the current
        # record's means two generations were interleaved on this model -> refused, never run unpruned
        self._pruned_caches: weakref.WeakSet = weakref.WeakSet()
        self._vlm_sig = inspect.signature(self.vlm.forward)
        self._top_sig = inspect.signature(model.forward)

    # ---- install / remove ------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register every hook and shadow; on any failure, undo what was done and re-raise."""
        try:
            self._install()
            self.method.attach(self)
        except BaseException:
            self.remove()
            raise

    def _install(self) -> None:
        m, vlm, lm = self.model, self.vlm, self.lm
        self.handles.append(m.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        # always_call: the in-flight call is cleared even when the forward raises (see _vlm_pre's thread check)
        self.handles.append(vlm.register_forward_hook(self._vlm_post, with_kwargs=True, always_call=True))
        self.handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(lm.register_forward_hook(self._lm_post, with_kwargs=True))
        self.shadow(vlm, "get_placeholder_mask", self._make_placeholder_shadow(vlm.get_placeholder_mask))
        for kind in ("image", "video"):
            fn = getattr(vlm, f"get_{kind}_features", None)
            if callable(fn):
                self.shadow(vlm, f"get_{kind}_features", self._make_features_shadow(kind, fn))
        cmfg = getattr(m, "create_masks_for_generate", None)
        if cmfg is None:
            from transformers import masking_utils

            cmfg = getattr(masking_utils, "create_masks_for_generate", None)
        if cmfg is not None:
            self.shadow(m, "create_masks_for_generate", self._make_cmfg_shadow(cmfg))
        setattr(m, STATE_ATTR, self)

    def __deepcopy__(self, memo: dict) -> Any:
        raise UnsupportedInputError(
            "copy.deepcopy of a model patched by vlmprune is not supported (its hooks would still point at the "
            "original). Copy first and patch the copy, or vlmprune.unpatch(model), copy, and patch both."
        )

    # PatchContext (what methods may use in Method.attach)
    def register(self, handle: Any) -> None:
        self.handles.append(handle)

    def shadow(self, obj: Any, name: str, fn: Any) -> None:
        if name in obj.__dict__:
            raise UnsupportedModelError(
                f"{type(obj).__name__}.{name} is already overridden on this instance by another tool; vlmprune will "
                "not stack on top of it. Remove the other patch first."
            )
        obj.__dict__[name] = fn
        self.shadowed.append((obj, name))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for obj, name in self.shadowed:
            obj.__dict__.pop(name, None)
        self.shadowed.clear()
        self.method.detach()
        self.model.__dict__.pop(STATE_ATTR, None)
        self.call = None
        self.record = None
        self._encoded.clear()
        self._unshadow_crop()

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _bind(self, sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:
            return kwargs
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError:
            return kwargs
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}) or {})
        return out

    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = self._bind(self._top_sig, args, kwargs)
        self._labels_given = kw.get("labels") is not None
        if getattr(module, "model", None) is not self.vlm:
            raise PatchBypassedError(
                "model.model was replaced after vlmprune.patch(); the patch no longer sees the images. Call "
                "vlmprune.unpatch(model) and patch again."
            )

    @staticmethod
    def _has_vision(kw: dict[str, Any]) -> bool:
        enc = kw.get("mm_encoder_outputs") or {}
        return (
            kw.get("pixel_values") is not None
            or kw.get("pixel_values_videos") is not None
            or any(v is not None for v in enc.values())
        )

    def _make_features_shadow(self, kind: str, original: Any) -> Any:
        sig = inspect.signature(original)

        @functools.wraps(original)
        def get_features(*args: Any, **kwargs: Any) -> Any:
            me = threading.get_ident()
            if self._encoding is not None and self._encoding != me:
                raise UnsupportedInputError(
                    "this patched model is already encoding images in another thread. A patched model keeps "
                    "per-call state, so one model cannot serve two threads at once: give each thread its own model."
                )
            if self._encoding is not None:  # Qwen3-VL's get_video_features calls get_image_features: the outer
                return original(*args, **kwargs)  # call describes
            self.method.begin_encode(kind)
            self._encoding = me
            try:
                out = original(*args, **kwargs)
            finally:
                self._encoding = None
            feats = getattr(out, "pooler_output", out)
            batched = feats if isinstance(feats, torch.Tensor) else None
            if batched is not None:
                feats = list(feats)  # one batched tensor (FastVLM; older releases)
            elif not (isinstance(feats, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in feats)):
                return out
            inputs = self._bind(sig, args, kwargs) if args else dict(kwargs)
            items = self.adapter.describe(kind, inputs, list(feats), self.model)
            extras = self.method.end_encode(kind, list(feats))
            if extras is not None:  # the method's per-item extras join what the adapter described
                for item, extra in zip(items, extras, strict=True):
                    item.extras = {**item.extras, **extra} if isinstance(extra, dict) else extra
            self._encoded = {k: v for k, v in self._encoded.items() if v[0]() is not None}
            for f, item in zip(feats, items, strict=True):
                self._encoded[id(f)] = (weakref.ref(f), item)
            if batched is not None:  # generate() may hand the batched tensor back in mm_encoder_outputs
                self._encoded[id(batched)] = (weakref.ref(batched), items)
            if self.call is not None:
                self.call.encoded[kind] = items
            return out

        return get_features

    def vision_items(self, call: _Call, kind: str) -> list[VisionItem]:
        """The images / videos of the current call, in the model's order (see :meth:`Adapter.describe`)."""
        if kind in call.encoded:
            return call.encoded[kind]
        enc = (call.kwargs.get("mm_encoder_outputs") or {}).get(kind)
        feats = getattr(enc, "pooler_output", None)
        if feats is None:
            return []
        entry = self._encoded.get(id(feats))
        if isinstance(feats, torch.Tensor) and entry is not None and entry[0]() is feats:
            return entry[1]  # a batched tensor this patch encoded
        items = []
        for i, f in enumerate(feats):
            entry = self._encoded.get(id(f))
            if entry is not None and entry[0]() is f:
                items.append(entry[1])
            else:
                items.append(self.adapter.fallback_item(kind, f, call, i, self.model))
        return items

    def _vlm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        me = threading.get_ident()
        if self.call is not None and self._call_thread != me:
            raise UnsupportedInputError(
                "this patched model is already running a forward in another thread. A patched model keeps per-call "
                "state, so one model cannot serve two threads at once: give each thread its own model (patched "
                "models in different threads are fine), or serialise the calls."
            )
        kw = self._bind(self._vlm_sig, args, kwargs)
        self.call = _Call(expects_vision=self._has_vision(kw), kwargs=kw)
        self._call_thread = me

    def _vlm_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.call is not None and self._call_thread != threading.get_ident():
            return  # a refused forward from another thread: the in-flight call is not ours to clear
        call, self.call = self.call, None
        if output is None:  # the forward raised (always_call): its own error is the one to see
            return
        if call is not None and call.expects_vision and not call.prefill_done:
            raise PatchBypassedError(
                f"Images reached the patched {type(self.model).__name__} but vlmprune's pruning path did not run "
                "(the model no longer calls get_placeholder_mask / language_model as expected). Nothing was "
                "pruned; this transformers release may be unsupported. Run vlmprune.unpatch(model)."
            )

    def _make_placeholder_shadow(self, original: Any) -> Any:
        @functools.wraps(original)
        def get_placeholder_mask(*args: Any, **kwargs: Any) -> Any:
            self._check_counts(args, kwargs)
            out = original(*args, **kwargs)
            call = self.call
            if call is not None:
                if isinstance(out, tuple):
                    image_mask, video_mask = out[0], out[1]
                    if kwargs.get("image_features") is not None:
                        call.image_mask = image_mask
                    if kwargs.get("video_features") is not None:
                        call.video_mask = video_mask
                else:
                    call.image_mask = out
            return out

        return get_placeholder_mask

    def _check_counts(self, args: tuple, kwargs: dict) -> None:
        """Raise a clear error before the model's own terse check when placeholders and features disagree."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None or inputs_embeds is None:
            return
        cfg = self.vlm.config
        for kind, tok_attr in (("image", "image_token_id"), ("video", "video_token_id")):
            feats = kwargs.get(f"{kind}_features")
            tok = getattr(cfg, tok_attr, None)
            if feats is None or tok is None:
                continue
            n_tok = int((input_ids == tok).sum())
            n_feat = feats.numel() // inputs_embeds.shape[-1]
            if n_tok != n_feat:
                raise PlaceholderMismatchError(
                    f"The prompt has {n_tok} {kind} placeholder tokens (id {tok}) but the {kind}s give {n_feat} "
                    f"{kind} tokens. Build inputs with the model's processor so every <{kind}> in the text matches "
                    f"one {kind} passed (and is expanded to its token count); don't truncate prompts."
                )

    def _make_cmfg_shadow(self, original: Any) -> Any:
        @functools.wraps(original)
        def create_masks_for_generate(*args: Any, **kwargs: Any) -> Any:
            cache = cache_of(kwargs)
            mask = kwargs.get("attention_mask")
            if cache is not None and (mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)):
                if _cache_len(cache) == 0:
                    # prefill: the LLM builds the mask itself after our hook has pruned the sequence
                    return mask
                rec = self._record_for(cache)
                if rec is not None:
                    clen = rec.seen
                    embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))  # renamed in 5.x
                    q = int(embeds.shape[1])
                    kwargs["attention_mask"] = rec.decode_mask(mask, clen, q)
                    cp = kwargs.get("cache_position")
                    if cp is not None:  # transformers <= 5.0
                        kwargs["cache_position"] = torch.arange(clen, clen + q, device=cp.device, dtype=cp.dtype)
            return original(*args, **kwargs)

        return create_masks_for_generate

    def _record_for(self, cache: Any) -> _Prefill | None:
        rec = self.record
        if rec is None or cache is None or rec.cache_ref is None or rec.cache_ref() is not cache:
            return None
        return rec

    def _lm_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.passthrough:
            return
        rec = self.record
        if rec is not None and rec.cache_ref is None:
            cache = output_cache(output)
            rec.cache_ref = weakref.ref(cache) if cache is not None else None
            if cache is None:
                self.record = None
            else:
                self._pruned_caches.add(cache)
                self._shadow_crop(cache)

    def _shadow_crop(self, cache: Any) -> None:
        """Assisted / prompt-lookup decoding crops the cache to lengths in original coordinates: translate."""
        self._unshadow_crop()
        original = getattr(cache, "crop", None)
        if not callable(original) or "crop" in getattr(cache, "__dict__", {"crop": None}):
            return

        # transformers >= 5.2x: crop(tokens_to_remove <= 0) is relative; before: crop(max_length) absolute if >= 0
        relative = "tokens_to_remove" in inspect.signature(original).parameters

        def crop(arg: int) -> Any:
            rec = self._record_for(cache)
            if rec is None:
                return original(arg)
            rel = relative or arg < 0
            if not rel:
                raise UnsupportedInputError(
                    "assisted / prompt-lookup decoding crops the cache to absolute lengths on this transformers "
                    "release, which vlmprune does not translate reliably; use transformers >= 5.24 (relative crops) "
                    "or plain greedy / sampling / beam search with a patched model."
                )
            target = rec.seen - abs(arg)
            cut = rec.pruned_length - target
            if cut > 0:  # the crop reaches into the prefill (e.g. rejected candidates prefilled with the prompt)
                if rec.length - cut <= rec.last_dropped:
                    raise UnsupportedInputError(
                        f"the cache was cropped ({arg}) into the pruned part of the prompt; vlmprune cannot undo a "
                        "pruned prefill. Start a new generate() call."
                    )
                rec.shrink(cut)
            out = original(arg)
            rec.seen = target
            return out

        cache.__dict__["crop"] = crop
        self._cropped = weakref.ref(cache)

    def _unshadow_crop(self) -> None:
        cache = self._cropped() if self._cropped is not None else None
        if cache is not None:
            cache.__dict__.pop("crop", None)
        self._cropped = None

    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.passthrough:
            return None
        call = self.call
        if call is not None and (call.image_mask is not None or call.video_mask is not None):
            call.prefill_done = True
            return self._prefill(call, args, kwargs)
        if call is not None and call.expects_vision:
            return None  # _vlm_post raises: images went in but no mask was recorded
        return self._decode(args, kwargs)

    # ---- prefill ---------------------------------------------------------------------------------------------
    def _segments(self, call: _Call, vis: dict[str, torch.Tensor]) -> list[Segment]:
        segs: list[Segment] = []
        for kind, mask in vis.items():
            items = self.vision_items(call, kind)
            counts = mask.sum(-1).tolist()
            total = sum(counts)
            if sum(it.num_tokens for it in items) != total:
                raise PlaceholderMismatchError(
                    f"The prompt has {total} {kind} placeholder tokens but the {len(items)} {kind}(s) passed give "
                    f"{sum(it.num_tokens for it in items)} tokens. Build inputs with the model's processor."
                )
            it_iter = iter(enumerate(items))
            for row, count in enumerate(counts):
                if count == 0:
                    continue
                pos = mask[row].nonzero().squeeze(-1)
                start = 0
                while start < count:
                    index, it = next(it_iter)
                    if start + it.num_tokens > count:
                        raise PlaceholderMismatchError(
                            f"Sample {row} has {count} {kind} placeholder tokens, which does not split into whole "
                            f"{kind}s (next {kind} needs {it.num_tokens}). Build inputs with the model's processor. "
                            "(With num_beams / num_return_sequences > 1 on transformers < ~5.20, generate() repeats "
                            f"per-{kind} inputs once per beam, which gives a sample with several {kind}s of different "
                            "sizes the wrong ones, patched or not: use one per sample there, or a newer release.)"
                        )
                    segs.append(
                        Segment(
                            row,
                            pos[start : start + it.num_tokens],
                            it.grid,
                            kind,
                            it.key,
                            it.prefix,
                            index,
                            it.extras,
                            it.parts,
                        )
                    )
                    start += it.num_tokens
        return segs

    def _select(
        self, seg: Segment, emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], tuple[int, int, int] | None]:
        """Run the method on one segment; return kept positions (sequence coordinates), replacement rows, stats
        and the kept tokens' own grid (:attr:`Selection.grid`, or ``None``)."""
        if seg.parts is not None:
            return self._select_parts(seg, emb)
        grid_pos = seg.positions[seg.prefix :]
        n = int(grid_pos.numel())
        k = self.prune_config.budget(n)
        info: dict[str, Any] = {"row": seg.row, "kind": seg.kind, "grid": list(seg.grid), "tokens_in": n + seg.prefix}
        if k >= n:
            info["tokens_out"] = n + seg.prefix
            return seg.positions, None, info, None
        sel = self._ask(seg, grid_pos, seg.grid, k, seg.key, seg.extras, emb, info, fixed=seg.prefix)
        kept = torch.cat([seg.positions[: seg.prefix], grid_pos[sel.indices.to(grid_pos.device)]])
        tokens = sel.tokens
        if tokens is not None and seg.prefix:
            tokens = torch.cat([emb[seg.row, seg.positions[: seg.prefix]], tokens.to(emb.dtype)])
        grid = None
        if sel.grid is not None and self.adapter.mrope:  # 1-D RoPE: kept tokens are numbered in order anyway
            grid = tuple(int(v) for v in sel.grid)
            if len(grid) != 3 or grid[0] * grid[1] * grid[2] != int(sel.indices.numel()) or seg.prefix:
                raise RuntimeError(
                    f"method {self.config.name!r} returned grid {sel.grid} for {int(sel.indices.numel())} tokens"
                )
        return kept, tokens, info, grid

    def _select_parts(
        self, seg: Segment, emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], None]:
        """:meth:`_select` for an item made of parts: the budget is the item's (over all its parts' tokens),
        split over the parts by :func:`split_budget`; each part is handed to the method as its own grid (with its
        rows of the item's extras); tokens outside every part are kept."""
        n_all = int(seg.positions.numel())
        sizes = [int(p.rows.numel()) for p in seg.parts]
        n = sum(sizes)
        k = self.prune_config.budget(n)
        info: dict[str, Any] = {"row": seg.row, "kind": seg.kind, "grid": list(seg.grid), "tokens_in": n_all}
        if k >= n:
            info["tokens_out"] = n_all
            info["always_kept"] = n_all - n
            return seg.positions, None, info, None
        dev = seg.positions.device
        keep = torch.ones(n_all, dtype=torch.bool, device=dev)
        for p in seg.parts:
            keep[p.rows.to(dev)] = False
        replaced: list[tuple[torch.Tensor, torch.Tensor]] = []
        parts_info = []
        for j, (p, kj) in enumerate(zip(seg.parts, split_budget(k, sizes), strict=True)):
            rows = p.rows.to(dev)
            pinfo: dict[str, Any] = {"part": p.name, "grid": list(p.grid), "tokens_in": sizes[j]}
            if kj == 0 or (kj >= sizes[j] and not self.method.select_whole_parts):
                keep[rows] = kj > 0
                pinfo["tokens_out"] = sizes[j] if kj else 0
                parts_info.append(pinfo)
                continue
            key = (seg.key ^ (j * 0x9E37_79B9_7F4A_7C15)) & 0x7FFF_FFFF_FFFF_FFFF if j else seg.key
            extras = _part_extras(seg.extras, rows, n_all) if isinstance(seg.extras, dict) else {}
            sel = self._ask(seg, seg.positions[rows], p.grid, kj, key, extras, emb, pinfo)
            chosen = rows[sel.indices.to(dev)]
            keep[chosen] = True
            if sel.tokens is not None:
                replaced.append((chosen, sel.tokens))
            parts_info.append(pinfo)
        kept_rows = keep.nonzero().squeeze(-1)
        kept = seg.positions[kept_rows]
        tokens = None
        if replaced:
            tokens = emb[seg.row, kept].clone()
            slot = torch.full((n_all,), -1, dtype=torch.long, device=dev)
            slot[kept_rows] = torch.arange(kept_rows.numel(), device=dev)
            for rows, values in replaced:
                tokens[slot[rows]] = values.to(tokens.dtype)
        info["tokens_out"] = int(kept_rows.numel())
        info["always_kept"] = n_all - n
        info["parts"] = parts_info
        return kept, tokens, info, None

    def _ask(
        self,
        seg: Segment,
        pos: torch.Tensor,
        grid: tuple[int, int, int],
        k: int,
        key: int,
        extras: dict[str, Any],
        emb: torch.Tensor,
        info: dict[str, Any],
        fixed: int = 0,
    ) -> Selection:
        """Ask the method for ``k`` of ``seg``'s tokens at sequence positions ``pos`` (``(n,)``, laid out as
        ``grid``); validate its answer and record ``tokens_out`` (plus ``fixed`` always-kept tokens),
        ``kept_indices`` (relative to ``pos``; merged tokens: their representatives) and the method's own info."""
        item = ImageTokens(emb[seg.row, pos], grid, k, key, seg.kind, seg.index, seg.row, extras)
        sel = self.method.select(item)
        self._validate(sel, int(pos.numel()), k, emb)
        info["tokens_out"] = int(sel.indices.numel()) + fixed
        info["kept_indices"] = sel.indices.tolist()
        if sel.info:
            info.update(sel.info)
        return sel

    def _validate(self, sel: Selection, n: int, k: int, emb: torch.Tensor) -> None:
        idx = sel.indices
        count_ok = idx.numel() == k if self.method.exact_budget else 1 <= idx.numel() <= k
        ok = isinstance(idx, torch.Tensor) and idx.ndim == 1 and count_ok and not idx.is_floating_point()
        if ok and k > 0:
            ok = int(idx[0]) >= 0 and int(idx[-1]) < n and bool((idx[1:] > idx[:-1]).all())
        if not ok:
            raise RuntimeError(
                f"method {self.config.name!r} returned invalid indices (need {k} strictly increasing ints in "
                f"[0, {n})): {idx!r}"
            )
        if sel.tokens is not None and tuple(sel.tokens.shape) != (idx.numel(), emb.shape[-1]):
            raise RuntimeError(
                f"method {self.config.name!r} returned tokens of shape {tuple(sel.tokens.shape)}, need ({k}, "
                f"{emb.shape[-1]})"
            )

    def _prefill(self, call: _Call, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        t0 = time.perf_counter()
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            raise PatchBypassedError("the language model was called without inputs_embeds; cannot prune.")
        cache = cache_of(kwargs)
        clen = _cache_len(cache)
        if clen:
            raise UnsupportedInputError(
                f"Images arrived with a cache that already holds {clen} tokens (chunked prefill, or new images in a "
                "continued conversation). vlmprune prunes a whole prompt at once: start generation from an empty "
                "cache, or unpatch for this call."
            )
        B, L, _ = emb.shape
        dev = emb.device
        am = kwargs.get("attention_mask")
        if am is None:
            real = torch.ones(B, L, dtype=torch.bool, device=dev)
        elif isinstance(am, torch.Tensor) and am.ndim == 2:
            real = am.to(dev).bool()
        else:
            raise UnsupportedInputError(
                "vlmprune needs a 2-D attention_mask (or none) in the prefill that carries images; got "
                f"{type(am).__name__} {getattr(am, 'shape', '')}. Pass the processor's 2-D attention_mask."
            )
        vis = {}
        for kind, m in (("image", call.image_mask), ("video", call.video_mask)):
            if m is not None:
                m = m.to(dev)
                vis[kind] = (m[..., 0] if m.ndim == 3 else m).bool() & real
        keep = real.clone()
        for m in vis.values():
            keep &= ~m
        segments = self._segments(call, vis)
        right_padded = am is not None and bool((~real[:, -1]).any()) and bool(real[:, 0].all())
        extra = {k: kwargs[k] for k in ("visual_pos_masks", "deepstack_visual_embeds") if kwargs.get(k) is not None}
        self.method.observe_prefill(
            PrefillView(emb, real, segments, kwargs.get("position_ids"), right_padded, self.adapter.mrope, extra)
        )
        if not self.method.prunes_at_entry:
            return self._plan_in_llm(segments, real, t0)
        replace: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        regrid: list[tuple[Segment, torch.Tensor, tuple[int, int, int]]] = []
        per_image = []
        for seg in segments:
            kept, tokens, info, grid = self._select(seg, emb)
            keep[seg.row, kept] = True
            if tokens is not None:
                replace.append((seg.row, kept, tokens))
            if grid is not None:
                regrid.append((seg, kept, grid))
            per_image.append(info)

        n_keep = keep.sum(-1)
        n_real = real.sum(-1)
        pruned = bool((n_keep != n_real).any()) or bool(replace)
        self._write_stats(per_image, n_real, n_keep, time.perf_counter() - t0)
        if not pruned:
            self.record = None
            return None
        if self._labels_given:
            raise LabelsWhilePruningError(
                "labels were passed to a model patched by vlmprune: its logits are in pruned coordinates (fewer "
                "positions than input_ids), so a loss against labels would be misaligned. Compute losses on the "
                "unpatched model (vlmprune.unpatch(model) or `with vlmprune.patched(...)` around inference only)."
            )

        if replace:
            emb = emb.clone()
            for row, pos, tokens in replace:
                emb[row, pos] = tokens.to(emb.dtype)
        idx, slot_valid = repad_index(keep, real, right=right_padded)
        Lp = idx.shape[1]
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = emb.gather(1, idx[..., None].expand(-1, -1, emb.shape[-1]))
        if am is not None or not bool(slot_valid.all()):
            dtype = am.dtype if am is not None else torch.long
            kwargs["attention_mask"] = slot_valid.to(dtype)
        contiguous = self.position_mode == "contiguous"
        pos = kwargs.get("position_ids")
        next_pos = None  # original-convention position of the first new token, per row
        if contiguous:  # 1-D RoPE renumbered: kept real tokens are 0..n-1 (None: the LLM numbers them itself)
            if pos is not None:
                new = slot_valid.long().cumsum(-1) - 1
                kwargs["position_ids"] = new.masked_fill(~slot_valid, 0).to(pos.dtype)
                next_pos = keep.sum(-1)
        else:  # original positions ([B, L], or [3|4, B, L] for M-RoPE) gathered at the kept tokens
            if pos is None and self.adapter.mrope:
                raise PatchBypassedError("M-RoPE model called its language model without position_ids; cannot prune.")
            full = pos.to(dev) if pos is not None else torch.arange(L, device=dev).expand(B, L)
            lead = full.shape[:-2]
            full = full.expand(*lead, B, L)
            if regrid and self.adapter.mrope:
                full, shift = self._regrid_positions(full, regrid)
            kwargs["position_ids"] = full.gather(-1, idx.expand(*lead, B, Lp))
            next_pos = full.masked_fill(~real, -1).amax(-1) + 1
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(Lp, device=kwargs["cache_position"].device)
        self.adapter.gather_extra(kwargs, idx, slot_valid)
        dropped_at = (real & ~keep).nonzero()
        last_dropped = int(dropped_at[:, 1].max()) if dropped_at.numel() else -1
        self.record = _Prefill(idx, slot_valid, L, Lp, n_real - n_keep, contiguous, next_pos, last_dropped, seen=Lp)
        if regrid and self.adapter.mrope and not contiguous:
            self.record.shift = shift
        return args, kwargs

    @staticmethod
    def _regrid_positions(
        full: torch.Tensor, regrid: list[tuple[Segment, torch.Tensor, tuple[int, int, int]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions for images whose kept tokens form a smaller grid (:attr:`Selection.grid`).

        ``full`` is ``(3|4, B, L)`` (the last three rows are the temporal, height and width ids; a leading text
        row is left alone). The kept tokens of each such image get ``h`` / ``w`` ids ``first + i'`` / ``first + j'``
        on their new ``(t, h', w')`` grid (``first``: the image's first id on that axis; the temporal id is the
        representative's own), and every later token of the row moves down by as much as the image's largest id
        fell, so the text after it continues right after the smaller image, as Qwen-VL's ``get_rope_index``
        numbers a prompt built for the smaller image. Returns the new positions and the total move per row.
        """
        full = full.clone()
        shift = torch.zeros(full.shape[-2], dtype=full.dtype, device=full.device)
        for seg, kept, (t2, h2, w2) in sorted(regrid, key=lambda x: (x[0].row, int(x[0].positions[0]))):
            r = seg.row
            axes = full[-3:, r]  # (3, L) view
            orig = axes[:, seg.positions]
            k = torch.arange(t2 * h2 * w2, device=full.device)
            axes[1, kept] = orig[1, 0] + (k % (h2 * w2)) // w2
            axes[2, kept] = orig[2, 0] + k % w2
            delta = orig.max() - axes[:, kept].max()
            last = int(seg.positions[-1])
            axes[:, last + 1 :] -= delta
            shift[r] += delta
        return full, shift

    def _plan_in_llm(self, segments: list[Segment], real: torch.Tensor, t0: float) -> None:
        """Methods that prune inside the LLM (FastV): the LLM input stays whole; hand the method each image's
        positions and budget, which it applies at its own layer (see ``Method.plan_prefill``)."""
        plan, per_image = [], []
        n_drop = torch.zeros(real.shape[0], dtype=torch.long, device=real.device)
        for seg in segments:
            n = int(seg.prunable.numel())
            fixed = int(seg.positions.numel()) - n  # always-kept tokens (a prefix, LLaVA-NeXT's newlines)
            k = self.prune_config.budget(n)
            plan.append((seg, k))
            n_drop[seg.row] += n - k
            per_image.append(
                {
                    "row": seg.row,
                    "kind": seg.kind,
                    "grid": list(seg.grid),
                    "tokens_in": n + fixed,
                    "tokens_out": k + fixed,
                    **({"always_kept": fixed} if seg.parts is not None else {}),
                }
            )
        n_real = real.sum(-1)
        self._write_stats(per_image, n_real, n_real - n_drop, time.perf_counter() - t0)
        self.record = None
        if self._labels_given and bool((n_drop > 0).any()):
            raise LabelsWhilePruningError(
                "labels were passed to a model patched by vlmprune: its logits are in pruned coordinates, so a loss "
                "against labels would be misaligned. Compute losses on the unpatched model."
            )
        self.method.plan_prefill(plan, real, per_image)
        return None

    def _write_stats(self, per_image: list[dict], n_real: torch.Tensor, n_keep: torch.Tensor, dt: float) -> None:
        self.stats = {
            "method": self.config.name,
            "keep": self.prune_config.keep,
            "model_type": self.model.config.model_type,
            "position_mode": self.position_mode,
            "images": per_image,
            "vision_tokens_in": sum(i["tokens_in"] for i in per_image),
            "vision_tokens_out": sum(i["tokens_out"] for i in per_image),
            "seq_len_in": n_real.tolist(),
            "seq_len_out": n_keep.tolist(),
            "selection_s": dt,
        }

    # ---- decode ----------------------------------------------------------------------------------------------
    def _decode(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = cache_of(kwargs)
        clen = _cache_len(cache)
        rec = self._record_for(cache)
        if clen == 0:  # a fresh (or reset, reused static) cache starts a new, unpruned sequence
            if cache is not None:
                self._pruned_caches.discard(cache)
            if rec is not None or (self.record is not None and self.record.cache_ref is None):
                self.record = None  # only the recorded cache's own restart (or a record its forward never bound)
            return None
        if rec is None and cache in self._pruned_caches:
            raise UnsupportedInputError(
                "this decode step continues a pruned generation that a later prefill with images on the same model "
                "has replaced (two generations interleaved, e.g. from two threads or a hand-written loop). vlmprune "
                "follows one pruned generation per model at a time: finish it first, or use a second model."
            )
        if rec is None:
            return None
        emb = kwargs.get("inputs_embeds")
        q = emb.shape[1] if emb is not None else kwargs["input_ids"].shape[1]
        # StaticCache.get_seq_length() counts non-zero keys of row 0 on transformers <= 5.0, which miscounts
        # zero-embedding pad slots: use our own count of what the pruned prefill and decode steps wrote.
        clen = rec.seen
        rec.seen += q
        kwargs = dict(kwargs)
        am = kwargs.get("attention_mask")
        if am is None or (isinstance(am, torch.Tensor) and am.ndim == 2):
            kwargs["attention_mask"] = rec.decode_mask(am, clen, q)
        call = self.call
        pos = kwargs.get("position_ids")
        if call is not None and call.kwargs.get("position_ids") is None and rec.next_pos is not None:
            # a hand-written decode loop: the model derived positions from the (shorter) pruned cache; give the
            # ones generate() would pass, continuing from the prompt's last position in the patch's convention
            kwargs["position_ids"] = self._next_positions(rec, pos, clen, q)
        elif rec.contiguous and isinstance(pos, torch.Tensor) and pos.ndim == 2:
            # generate's positions count the dropped tokens; contiguous numbering does not
            kwargs["position_ids"] = pos - rec.dropped.to(pos.device, pos.dtype)[:, None]
        elif rec.shift is not None and isinstance(pos, torch.Tensor) and pos.ndim == 3:
            # generate's M-RoPE positions continue the original prompt; a re-gridded image moved the text down
            pos = pos.clone()
            pos[-3:] -= rec.shift.to(pos.device, pos.dtype)[None, :, None]
            kwargs["position_ids"] = pos
        if kwargs.get("cache_position") is not None:
            cp = kwargs["cache_position"]
            kwargs["cache_position"] = torch.arange(clen, clen + q, device=cp.device, dtype=cp.dtype)
        return args, kwargs

    @staticmethod
    def _next_positions(rec: _Prefill, current: torch.Tensor | None, clen: int, q: int) -> torch.Tensor:
        nxt = rec.next_pos
        if current is not None and current.ndim == 3 and nxt.ndim == 2 and nxt.shape[0] == current.shape[0] + 1:
            nxt = nxt[1:]  # generate's 4-row layout (text row first) vs the model's own 3 M-RoPE rows
        steps = clen - rec.pruned_length
        offs = torch.arange(q, device=nxt.device)
        out = nxt[..., None] + steps + offs
        return out.to(current.dtype) if current is not None else out
