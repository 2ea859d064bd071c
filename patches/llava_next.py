"""Adapter for LLaVA-NeXT (``model_type="llava_next"``, ``LlavaNextForConditionalGeneration``): anyres images.

LLaVA-NeXT encodes each image as several CLIP crops: a low-resolution *base* view of the whole image and the tiles
of a high-resolution grid (``image_grid_pinpoints``). ``pack_image_features`` then lays one image out as the base
view's ``s x s`` tokens, followed by the tiles' tokens stitched into one ``H x W`` grid, *unpadded* (the rows or
columns that only cover the letterbox padding are cut), with one ``image_newline`` token after every row of that
grid. How vlmprune treats that layout:

* **Parts.** Each image is one item of two parts, pruned separately: the base view (grid ``(1, s, s)``) and the
  high-resolution crops (grid ``(1, H', W')``, after unpadding). The budget is the image's: ``keep`` applies to
  all its grid tokens (base + crops, newlines excluded) and is split between the two parts in proportion to their
  token counts (largest remainder, each part keeps at least one token), e.g. 0.11 of 576 + 2304 grid tokens keeps
  63 + 254. This is HiPrune's and VisionZip's per-image retention "split over the crops", except that here the
  crops are one unpadded grid, as the model sees them (the official codes prune each tile without unpadding and
  drop the newlines, which changes the sequence vanilla LLaVA-NeXT was trained on).
* **Newlines.** The ``image_newline`` tokens are always kept, where the model expects them (one per row of the
  high-resolution grid, or one after the base view when an image has no crops); they count in ``tokens_out``
  but not in the budget. A method never sees them.
* **Signals from the tower.** The tower runs once per crop; the attention probes (HiPrune, VisionZip, DAMRO's CLS
  score) capture one entry per crop, which is packed exactly like the features, by the model's own
  ``pack_image_features`` (the layout itself comes from packing ones with a NaN newline), so every score lines up
  with its token. Scores of different tiles come from separate softmaxes (each tile is its own CLIP input). VisionZip's
  CLS token is the base view's. DAMRO's contrastive branch uses the base view's outliers, as the official code.
* **Positions.** 1-D RoPE: ``position_mode="contiguous"`` (default) or ``"original"``, as for LLaVA-1.5.

* **fastvlm's encoder strategies** (``resolution``, ``encoder_pool``): every tower input (base view and crops)
  shrinks alike, to the grid ``keep`` gives one CLIP input (``keep=0.11``: 24x24 -> 8x8, so the tower runs on
  64 patches per crop instead of 576); the projector's output is spread back over the full grids before the
  model packs them, and one token per reduced cell that survives the unpadding is kept, within each part's share
  of the budget (cells the unpadding cut most go first when a share is smaller; among equally covered cells the
  dropped ones are spread evenly, :func:`~vlmprune.methods.fastvlm.best_covered`: at 0.11 of a 672 x 672 image 3 of
  the 320 reduced cells). ``keep`` must be a fraction.
  ``strategy="pool"`` pools each part after the encoder.

LLaVA-OneVision (:mod:`vlmprune.patches.llava_onevision`) subclasses this adapter; its SigLIP tower and bilinear
grid shrinking leave it ``strategy="pool"`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PatchBypassedError, UnsupportedInputError
from ..methods.fastvlm import unpool_index
from ..stats import anyres_crops
from ._base import Part, VisionItem, _Call, content_key
from .llava import LlavaAdapter

__all__ = ["LlavaNextAdapter"]


class _Layout:
    """Where each token of one packed image (or video) sits, and how to lay per-tower-input values out the same way.

    Built from the model's own packing code: ``packer(values, newline)`` packs ``values`` ``(n_units, unit_rows, C)``
    (one row block per tower input, as the projector's output) exactly like the model packs its features, with
    ``newline`` ``(C,)`` at the newline tokens; it is run once on ones with a NaN newline to find the newline tokens.

    Attributes:
        n: tokens of the item.
        n_units: tower inputs (LLaVA-NeXT / OneVision images: base view + crops; OneVision videos: frames).
        unit_rows: rows per tower input that reach the projector (``cells``, plus CLS under ``"full"``).
        cells: patches per tower input (``s * s``).
        newline: ``(n,)`` bool, the image-newline tokens.
        parts: see :class:`vlmprune.patches._base.Part`.
    """

    def __init__(
        self,
        packer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        n_units: int,
        unit_rows: int,
        cells: int,
        side: int,
        video_grid: tuple[int, int, int] | None = None,
    ) -> None:
        self.packer, self.n_units, self.unit_rows, self.cells = packer, n_units, unit_rows, cells
        self._reduced: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        ones = torch.ones(n_units, unit_rows, 1, dtype=torch.float64)
        newline = packer(ones, torch.full((1,), float("nan"), dtype=torch.float64))[:, 0].isnan()
        self.newline, self.n = newline, int(newline.numel())
        idx = torch.arange(self.n)
        if video_grid is not None:  # frames, pooled: one part, the newline(s) after it kept
            frames = (~newline).nonzero().squeeze(-1)
            t, h, w = video_grid
            grid = video_grid if t * h * w == frames.numel() else (1, 1, int(frames.numel()))
            self.parts = [Part(frames, grid, "frames")]
            return
        # the base view's rows come first (its CLS, under "full", is always kept); then the crops' stitched grid
        base = idx[(idx >= unit_rows - cells) & (idx < unit_rows) & ~newline]
        self.parts = [
            Part(base, (1, side, side) if base.numel() == side * side else (1, 1, int(base.numel())), "base")
        ]
        high = idx[(idx >= unit_rows) & ~newline]
        if high.numel():
            rows = int(newline[int(high[0]) :].sum())  # one newline closes every row of the stitched grid
            cols = high.numel() // rows if rows else 0
            grid = (1, rows, cols) if rows and rows * cols == high.numel() else (1, 1, int(high.numel()))
            self.parts.append(Part(high, grid, "crops"))

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.parts[-1].grid

    def reduced(self, new: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``fastvlm``'s reduced tokens sit once packed: every tower input's ``s x s`` patch grid shrunk to
        ``new`` and spread back over it (nearest cell, :func:`vlmprune.methods.fastvlm.unpool_index`, as the
        encoder hooks do), then packed by the model's code (which may cut cells with the unpadding).

        Returns:
            ``rep`` ``(n,)`` bool: one token per reduced cell that survives the packing (its centre slot, or its
            first surviving token where the unpadding cut the centre); ``cover`` ``(n,)`` float32: at each ``rep``
            token, how many of the item's tokens carry that cell (0 elsewhere).

        Raises:
            UnsupportedInputError: the packing mixes neighbouring values (OneVision's bilinear shrinking of large
                grids), so a reduced cell has no tokens of its own.
        """
        if new not in self._reduced:
            side = math.isqrt(self.cells)
            src, centres = unpool_index((side, side), new)
            m = new[0] * new[1]
            ids = (torch.arange(self.n_units)[:, None] * m + src[None, :] + 1).double()  # 0: not a patch cell
            centre = torch.zeros(self.n_units, self.cells, dtype=torch.float64)
            centre[:, centres] = 1.0
            values = torch.stack([ids, centre], -1)  # (U, cells, 2)
            if self.unit_rows > self.cells:  # the CLS row under "full": no cell
                values = torch.cat([values.new_zeros(self.n_units, self.unit_rows - self.cells, 2), values], 1)
            packed = self.packer(values, values.new_zeros(2))
            if not torch.equal(packed, packed.round()):
                raise UnsupportedInputError(
                    "fastvlm's encoder strategies need a packing that moves tokens without mixing them; this model "
                    "interpolates its high-resolution grid: use strategy='pool'."
                )
            gid, is_centre = packed[:, 0].long() - 1, packed[:, 1] > 0
            valid = gid >= 0
            counts = torch.bincount(gid[valid], minlength=self.n_units * m)
            idx = torch.arange(self.n)
            rank = torch.where(is_centre, idx - self.n, idx)  # a cell's centre first, else its first token
            best = torch.full((self.n_units * m,), self.n, dtype=torch.long)
            best.scatter_reduce_(0, gid[valid], rank[valid], reduce="amin")
            present = counts > 0
            chosen = best[present] % self.n
            rep = torch.zeros(self.n, dtype=torch.bool)
            rep[chosen] = True
            cover = torch.zeros(self.n, dtype=torch.float32)
            cover[chosen] = counts[present].float()
            self._reduced[new] = (rep, cover)
        return self._reduced[new]

    def pack(self, per_unit: list[Any]) -> Any:
        """Lay per-tower-input probe entries out like the item's tokens.

        Args:
            per_unit: one entry per tower input: a tensor whose first dimension is the input's ``cells`` patches
                (after ``lead`` leading rows, e.g. CLS), or a dict of such entries.
        Returns:
            The same structure for the item: tensors of first dimension ``n`` (packed like the features,
            interpolated where the model interpolates; zero at newline / CLS tokens), after the first input's
            ``lead`` leading rows. Other values: the first input's.
        """
        first = per_unit[0]
        if isinstance(first, dict):
            return {k: self.pack([e[k] for e in per_unit]) for k in first}
        if not isinstance(first, torch.Tensor) or first.ndim == 0 or not first.is_floating_point():
            return first
        lead = int(first.shape[0]) - self.cells
        if lead not in (0, 1):
            return first
        stacked = torch.stack(per_unit)  # (U, lead + cells, ...)
        trailing = stacked.shape[2:]
        flat = stacked[:, lead:].reshape(self.n_units, self.cells, -1).float()
        if self.unit_rows > self.cells:  # the projector also saw the CLS row: a zero row in its place
            flat = torch.cat([flat.new_zeros(self.n_units, self.unit_rows - self.cells, flat.shape[-1]), flat], 1)
        packed = self.packer(flat, flat.new_zeros(flat.shape[-1]))
        packed = packed.masked_fill(self.newline.to(packed.device)[:, None], 0.0)
        packed = packed.reshape(self.n, *trailing).to(first.dtype)
        return torch.cat([stacked[0, :lead], packed]) if lead else packed


class _PackedProbe:
    """Wraps a LLaVA probe (one entry per tower input, i.e. per crop) so that ``collect`` gives one entry per
    image, packed like its tokens (the layouts come from the adapter's last ``describe``)."""

    def __init__(self, inner: Any, adapter: LlavaNextAdapter) -> None:
        self.inner, self.adapter = inner, adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def install(self, ctx: Any) -> None:
        self.inner.install(ctx)

    def reset(self) -> None:
        self.inner.reset()

    def collect(self, n_items: int) -> list[Any]:
        layouts = self.adapter.last_layouts
        if len(layouts) != n_items:
            raise PatchBypassedError(
                f"LLaVA-NeXT probe: {n_items} images were encoded but their layout is known for {len(layouts)}."
            )
        units = self.inner.collect(sum(lay.n_units for lay in layouts))
        out, start = [], 0
        for lay in layouts:
            out.append(lay.pack(units[start : start + lay.n_units]))
            start += lay.n_units
        return out


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    label = "LLaVA-NeXT"
    hf_class = "LlavaNextForConditionalGeneration"
    positions = "`contiguous` (default) or `original`; newline tokens always kept"
    mrope = False
    provides = frozenset({"vit_attention", "vit_cls_attention", "encoder_resize", "encoder_pool"})

    def __init__(self) -> None:
        self.last_layouts: list[_Layout] = []
        self._cache: dict[tuple, _Layout] = {}
        self._encoder_grid: tuple[int, int] | None = None  # fastvlm's reduced grid per tower input, when installed

    # ---- layout ------------------------------------------------------------------------------------------------
    @staticmethod
    def _hw(image_size: Any) -> tuple[int, ...]:
        return tuple(int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size))

    @staticmethod
    def _side(model: nn.Module) -> int:
        vc = model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def _unit_rows(self, model: nn.Module, strategy: str) -> int:
        """Rows per tower input that reach the projector: the tower's tokens (CLIP: CLS + patches; SigLIP: patches),
        less the first one under ``"default"``."""
        side = self._side(model)
        tower = model.model.vision_tower
        emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        has_cls = getattr(emb, "class_embedding", None) is not None
        return side * side + (1 if has_cls else 0) - (1 if strategy == "default" else 0)

    def layout(self, model: nn.Module, image_size: Any, strategy: str) -> _Layout:
        """The packed layout of one image of ``image_size`` ``(H, W)``, from the model's own packing code."""
        hw = self._hw(image_size)
        key = (hw, strategy)
        if key not in self._cache:
            vlm, side = model.model, self._side(model)
            size = torch.tensor([hw])

            def packer(values: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
                return vlm.pack_image_features([values], size, strategy, image_newline=newline)[0][0]

            n_crops = anyres_crops(model.config, [hw])[0]
            self._cache[key] = _Layout(packer, n_crops, self._unit_rows(model, strategy), side * side, side)
        return self._cache[key]

    @staticmethod
    def _strategy(inputs: dict[str, Any], model: nn.Module) -> str:
        return inputs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy

    def _item(self, kind: str, lay: _Layout | None, n: int, key: int) -> VisionItem:
        if lay is None or lay.n != n:
            return VisionItem(kind, n, (1, 1, n), key)
        return VisionItem(kind, n, lay.grid, key, parts=lay.parts)

    def item_layouts(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> tuple[list[_Layout], torch.Tensor | None]:
        """The layout of every item ``get_{kind}_features`` just encoded, and the pixels it encoded (5-D: one row
        per item, padded to the batch's largest crop count). LLaVA-NeXT: images, from ``image_sizes``."""
        sizes = inputs.get("image_sizes")
        if sizes is None or len(sizes) != len(features):
            raise PatchBypassedError(
                f"{self.label}: {len(features)} images encoded but image_sizes describes "
                f"{None if sizes is None else len(sizes)}; cannot lay the tokens out. Build inputs with the model's "
                "processor."
            )
        strategy = self._strategy(inputs, model)
        return [self.layout(model, hw, strategy) for hw in sizes], inputs.get("pixel_values")

    def describe(
        self, kind: str, inputs: dict[str, Any], features: list[torch.Tensor], model: nn.Module
    ) -> list[VisionItem]:
        layouts, pixels = self.item_layouts(kind, inputs, features, model)
        items = []
        for i, (f, lay) in enumerate(zip(features, layouts, strict=True)):
            n = int(f.shape[0])
            # the tower inputs this item really has (5-D pixels are padded to the batch's largest count)
            key = content_key(pixels[i][: lay.n_units] if pixels is not None and pixels.ndim == 5 else f)
            if kind == "video" and lay.n == n + 1:
                # OneVision on transformers <= ~5.12 appends the video's newline in forward, after
                # get_video_features: the item still spans it (its placeholders do)
                n = lay.n
            if lay.n != n:
                raise PatchBypassedError(
                    f"{self.label} {kind} {i} has {n} tokens, but its packed layout has {lay.n}; this transformers "
                    "release packs them differently. Run vlmprune.unpatch(model)."
                )
            item = self._item(kind, lay, n, key)
            if self._encoder_grid is not None and item.parts is not None:
                rep, cover = lay.reduced(self._encoder_grid)
                item.extras = {"fastvlm_rep": rep, "fastvlm_cover": cover, "fastvlm_unit_grid": self._encoder_grid}
            items.append(item)
        self.last_layouts = layouts
        return items

    def fallback_item(self, kind: str, feature: torch.Tensor, call: _Call, index: int, model: nn.Module) -> VisionItem:
        n = int(feature.shape[0])
        sizes = call.kwargs.get("image_sizes")
        lay = None
        if sizes is not None and index < len(sizes):
            lay = self.layout(model, sizes[index], self._strategy(call.kwargs, model))
        return self._item(kind, lay, n, content_key(feature))

    # ---- probes: one entry per crop in the tower, packed per image ------------------------------------------------
    def attention_probe(self, model: nn.Module, layers: list[int]) -> Any:
        return _PackedProbe(super().attention_probe(model, layers), self)

    def layer_capture(self, model: nn.Module, layer: int) -> Any:
        return _PackedProbe(super().layer_capture(model, layer), self)

    def cls_probe(self, model: nn.Module, layer: int, mode: str) -> Any:
        return _PackedProbe(super().cls_probe(model, layer, mode), self)

    def check_config(self, model: nn.Module, config: Any) -> None:
        """fastvlm's encoder strategies need a fractional ``keep`` here (see :meth:`install_encoder_reduction`)."""
        if getattr(config, "name", None) != "fastvlm" or config.strategy == "pool":
            return
        if isinstance(config.keep, int) and not isinstance(config.keep, bool):
            raise ConfigError(
                f"keep={config.keep} is a token count per image, but fastvlm's {config.strategy!r} strategy shrinks "
                f"every {self.label} crop alike (all crops of a batch go through the tower at one resolution), so the "
                "count cannot follow each image's crop number: pass keep as a fraction (e.g. keep=0.11), or use "
                "strategy='pool'."
            )

    def install_encoder_reduction(self, ctx: Any, method: Any) -> None:
        """``fastvlm``'s encoder side on anyres images. LLaVA-1.5's hooks
        (:meth:`LlavaAdapter.install_encoder_reduction`) shrink *every* tower input alike (base view and crops: a
        smaller input, or a pooled grid after one block), and the projector's output is spread back over each
        input's full grid, so the model's own packing (crops stitched, unpadded, newlines) and the processor's
        placeholders are unchanged. :meth:`describe` then marks one packed token per reduced cell that survives the
        unpadding (``fastvlm_rep``), which the method keeps within each part's share of the image's budget.
        ``keep`` must be a fraction: every crop of every image in a batch goes through the tower in one call, at
        one resolution."""
        super().install_encoder_reduction(ctx, method)
        side = self._side(ctx.model)
        grid = method.reduced_grid(side, side)
        self._encoder_grid = None if grid == (side, side) else grid
