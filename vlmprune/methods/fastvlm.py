"""``fastvlm``: FastVLM-style compression, training-free — fewer vision tokens *and* a cheaper vision encoder.

FastVLM (Vasu et al., CVPR 2025, arXiv 2412.13303) replaces the ViT with FastViTHD, a *trained* hierarchical
encoder that downsamples inside the network (stride 64), and scales the input resolution instead of pruning:
the encoder itself emits few tokens, so its own cost falls too. That encoder needs training; this method is the
training-free analogue for existing LLaVA / Qwen-VL checkpoints, with three strategies:

* ``resolution`` — run the unchanged encoder on a smaller image so it emits about ``keep`` of the tokens.
  Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the image is resampled to the smaller patch grid (a multiple of the 2x2
  merge, as the processor's dynamic resolution would give) and the ViT runs natively on it, with its own rotary
  positions and windows (Qwen3-VL's DeepStack features follow); the LLM gives an image's tokens the M-RoPE
  positions of the smaller grid and continues the text after it (positions recomputed, not borrowed; video
  frames keep their cells' original positions). LLaVA (CLIP, fixed 336 px): the image is resized and CLIP's position
  embeddings are interpolated (``interpolate_pos_encoding``) — off the training distribution, as methods.md warns.
  LLaVA-NeXT (anyres): every tower input (base view and each crop) is resized alike, so the tower runs on about
  ``keep`` of its patches per crop (see ``patches/llava_next.py`` for how the packed, unpadded layout is kept).
* ``encoder_pool`` — FastViTHD's idea inside a plain ViT: after block ``layer`` the patch-token grid is average-
  pooled to the target grid (``k x k`` when it divides: 24 -> 12 is 2x2; CLS kept) and the remaining blocks run
  on the fewer tokens. LLaVA-1.5 / LLaVA-NeXT (CLIP; NeXT: every crop) only: Qwen's ViT carries per-patch rotary
  positions and attention windows through every block (use ``resolution`` there). The default ``layer`` is half
  way to the block LLaVA reads (FastViTHD downsamples between stages; an earlier cut saves more and costs more
  accuracy).
* ``pool`` — average pooling after the encoder (the ``pool`` baseline's :func:`pool_tokens`): the encoder pays in
  full, only the LLM saves. The reference point the other two must beat in TTFT at equal tokens.

Budget: the token grid shrinks by ``sqrt(budget / tokens)`` per side, rounded, never above the budget
(``keep=0.25`` of 24x24 -> 12x12 = 144; ``keep=0.11`` -> 8x8 = 64; an int ``keep`` is a token count per image), so
the count is the largest such grid within the budget, not always the exact budget (``last_stats`` reports it).
LLaVA-NeXT: each crop gets the grid of one CLIP input under ``keep`` (a fraction there), and each part of the
image (base view, crops) keeps one token per reduced cell, at most its share of the image's budget.
The reduced tokens enter the LLM at the slots of their cells' centres (1-D RoPE models renumber them
contiguously anyway).

The functions here are pure tensor code with documented shapes; the adapters install them where they cut
(``patches/llava.py``, ``patches/qwen2_vl.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PruneConfig, _check_keep
from ..errors import ConfigError, UnsupportedInputError
from .base import ImageTokens, Method, Selection
from .pool import pool_tokens

__all__ = [
    "FastVLMConfig",
    "cell_map",
    "patchify_qwen",
    "pool_patch_tokens",
    "target_side",
    "unpatchify_qwen",
    "unpool_index",
]

STRATEGIES = ("resolution", "encoder_pool", "pool")


def target_side(h: int, w: int, budget: int) -> tuple[int, int]:
    """The reduced ``(h', w')`` of a ``(h, w)`` token grid for a budget of ``budget`` tokens: each side scaled by
    ``sqrt(budget / (h*w))`` and rounded (at least 1, at most the side), then the longer side shortened until
    ``h' * w' <= budget``. ``(24, 24)`` with 144 -> ``(12, 12)``; with 64 -> ``(8, 8)``."""
    s = math.sqrt(min(1.0, budget / (h * w)))
    h2, w2 = max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))
    while h2 * w2 > max(1, budget):
        if h2 >= w2 and h2 > 1:
            h2 -= 1
        elif w2 > 1:
            w2 -= 1
        else:
            break
    return h2, w2


def cell_map(n: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How ``n`` cells along one axis fall into ``n_new <= n`` reduced cells.

    Returns:
        ``assign`` ``(n,)`` int64: the reduced cell of each cell (``floor(i * n_new / n)``, contiguous runs), and
        ``centre`` ``(n_new,)`` int64: the centre cell of each run (upper of the two middles for even runs), the
        slot where the reduced token enters the LLM.
    """
    assign = torch.arange(n) * n_new // n
    counts = torch.bincount(assign, minlength=n_new)
    starts = torch.cumsum(counts, 0) - counts
    return assign, starts + (counts - 1) // 2


def unpool_index(grid: tuple[int, int], new: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest mapping between a ``(h, w)`` raster grid and its reduced ``(h', w')`` grid.

    Returns:
        ``src`` ``(h*w,)`` int64: for every cell of the full grid, the reduced token covering it (so
        ``reduced[src]`` spreads ``(h'*w', D)`` tokens back over ``(h*w, D)``), and ``reps`` ``(h'*w',)`` int64,
        strictly increasing: the full-grid cell where each reduced token sits (its region's centre).
    """
    (h, w), (h2, w2) = grid, new
    ah, ch = cell_map(h, h2)
    aw, cw = cell_map(w, w2)
    src = (ah[:, None] * w2 + aw[None, :]).reshape(-1)
    reps = (ch[:, None] * w + cw[None, :]).reshape(-1)
    return src, reps


def pool_patch_tokens(hidden: torch.Tensor, side: tuple[int, int], new: tuple[int, int], prefix: int) -> torch.Tensor:
    """Average-pool a ViT's patch tokens to a smaller grid, keeping the leading ``prefix`` tokens (CLS).

    Args:
        hidden: ``(B, prefix + h*w, D)`` hidden states, patches in raster order.
        side: ``(h, w)`` patch grid; ``new``: ``(h', w')`` target grid (``k x k`` pooling when ``k`` divides the
            sides, adaptive average pooling otherwise).
        prefix: leading non-patch tokens, passed through.

    Returns:
        ``(B, prefix + h'*w', D)`` in ``hidden.dtype`` (averaged in float32).
    """
    (h, w), (h2, w2) = side, new
    B, _, D = hidden.shape
    grid = hidden[:, prefix:].float().transpose(1, 2).reshape(B, D, h, w)
    pooled = F.adaptive_avg_pool2d(grid, (h2, w2)).reshape(B, D, h2 * w2).transpose(1, 2).to(hidden.dtype)
    return torch.cat([hidden[:, :prefix], pooled], dim=1)


def unpatchify_qwen(
    patches: torch.Tensor, grid: tuple[int, int, int], channels: int, temporal: int, patch: int, merge: int
) -> torch.Tensor:
    """Qwen-VL's flattened patches of one image / video back to frames (inverse of its image processor).

    Args:
        patches: ``(t*h*w, channels*temporal*patch*patch)`` rows in the processor's order (merge-unit blocks:
            ``t, h/m, w/m, m, m``), features ordered ``channels, temporal, patch, patch``.
        grid: ``(t, h, w)`` in patches.

    Returns:
        ``(t*temporal, channels, h*patch, w*patch)`` normalised pixels.
    """
    t, h, w = grid
    x = patches.reshape(t, h // merge, w // merge, merge, merge, channels, temporal, patch, patch)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, T, C, h/m, m, p, w/m, m, p
    return x.reshape(t * temporal, channels, h * patch, w * patch)


def patchify_qwen(frames: torch.Tensor, temporal: int, patch: int, merge: int) -> torch.Tensor:
    """Inverse of :func:`unpatchify_qwen`: ``(t*temporal, C, H, W)`` frames (``H``, ``W`` multiples of
    ``patch * merge``) -> ``(t*h*w, C*temporal*patch*patch)`` rows in the processor's order."""
    tT, C, H, W = frames.shape
    t, h, w = tT // temporal, H // patch, W // patch
    x = frames.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, T, p, p
    return x.reshape(t * h * w, C * temporal * patch * patch)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(N, C, H, W)`` frames to ``size``, computed in float32."""
    return F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(
        frames.dtype
    )


@dataclasses.dataclass
class FastVLMConfig(PruneConfig):
    """FastVLM-style compression (training-free; see the module docstring).

    Attributes:
        strategy: ``"resolution"`` (smaller input, native encoder), ``"encoder_pool"`` (pool inside the ViT after
            block ``layer``, LLaVA-1.5 / NeXT only) or ``"pool"`` (after the encoder).
        layer: ``encoder_pool`` only: the 0-based ViT block after which the grid is pooled (must come before the
            block whose output the LLM reads); ``None`` = half way to that block (11 on CLIP-L, read at 22).
    """

    name = "fastvlm"

    strategy: str = "resolution"
    layer: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r} is not valid: choose one of {STRATEGIES}.")
        if self.layer is not None:
            if self.strategy != "encoder_pool":
                raise ConfigError(f"layer={self.layer} applies to strategy='encoder_pool' only.")
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
                raise ConfigError(f"layer={self.layer!r} is not valid: pass a ViT block index >= 0 (or None).")
        _check_keep(self.keep)

    def build(self) -> Method:
        return FastVLMMethod(self)


def best_covered(cover: torch.Tensor, k: int) -> torch.Tensor:
    """Which ``k`` of the reduced cells to keep: the best covered, spread evenly among equals.

    Args:
        cover: ``(n,)`` how many packed tokens each cell covers, cells in token order.
        k: cells to keep, ``0 <= k <= n``.

    Returns:
        ``(k,)`` int64 positions into ``cover``, ascending. Every cell covering more than the ``k``-th best is
        kept; among the cells that tie with it, an evenly spaced subset (centred: ``floor((i + 1/2) * t / m)`` of
        ``t`` ties for ``m`` places), so an uncut grid loses cells spread over the image, not its last rows.
    """
    n = cover.numel()
    if k >= n:
        return torch.arange(n, device=cover.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=cover.device)
    cut = cover.sort(descending=True).values[k - 1]
    above = (cover > cut).nonzero().squeeze(-1)
    ties = (cover == cut).nonzero().squeeze(-1)
    m = k - above.numel()
    pick = ties[((2 * torch.arange(m, device=cover.device) + 1) * ties.numel()) // (2 * m)]
    return torch.cat([above, pick]).sort().values


class FastVLMMethod(Method):
    """Selection side of ``fastvlm``: the adapter's encoder hooks (``resolution`` / ``encoder_pool``) leave the
    reduced tokens at their cells' centre slots of the full grid; :meth:`select` keeps exactly those."""

    def __init__(self, config: FastVLMConfig) -> None:
        super().__init__(config)
        self.exact_budget = False  # the nearest grid to the budget (see the module docstring)
        self.select_whole_parts = config.strategy != "pool"  # anyres parts repeat the reduced cells (LLaVA-NeXT)
        self.requires = {
            "resolution": frozenset({"encoder_resize"}),
            "encoder_pool": frozenset({"encoder_pool"}),
            "pool": frozenset(),
        }[config.strategy]
        self.reduced_now = False
        self.unsupported_hint = {
            "resolution": "strategy='resolution' resizes the input of LLaVA-1.5's / LLaVA-NeXT's CLIP tower or of a "
            "Qwen-VL ViT; on this model use strategy='pool'.",
            "encoder_pool": "strategy='encoder_pool' pools inside LLaVA-1.5's / LLaVA-NeXT's CLIP tower only; on "
            "Qwen-VL use strategy='resolution' (the ViT runs natively on a smaller grid), elsewhere 'pool'.",
            "pool": "",
        }[config.strategy]

    def reduced_grid(self, h: int, w: int, t: int = 1) -> tuple[int, int]:
        """The reduced ``(h', w')`` of a ``(t, h, w)`` token grid under this config (the budget is per image or
        video, spread over its ``t`` frames: every frame keeps at least one token).

        Raises:
            UnsupportedInputError: a video's budget is smaller than its number of frames.
        """
        budget = self.config.budget(t * h * w)
        if budget < t:
            raise UnsupportedInputError(
                f"fastvlm reduces each frame's grid, so a video of {t} frames keeps at least {t} tokens, but the "
                f"budget is {budget} (keep={self.config.keep!r} of {t * h * w}): raise keep, or use another method "
                "for this video."
            )
        return target_side(h, w, budget // t)

    def begin_encode(self, kind: str) -> None:
        self.reduced_now = False  # set by the adapter's encoder hooks when they shrink this encoding

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        if self.config.strategy == "pool":
            return None
        return [{"fastvlm_reduced": self.reduced_now} for _ in features]

    def attach(self, ctx: Any) -> None:
        if self.config.strategy != "pool":  # the hooks go through ctx.register: unpatch removes them
            ctx.adapter.install_encoder_reduction(ctx, self)

    def select(self, item: ImageTokens) -> Selection:
        t, h, w = item.grid
        if self.config.strategy == "pool":
            tokens, reps = pool_tokens(item.features, item.grid, item.budget)
            return Selection(reps, tokens)
        if not item.extras.get("fastvlm_reduced"):
            raise UnsupportedInputError(
                f"fastvlm's {self.config.strategy!r} strategy reduces inside the vision encoder, but these "
                f"{item.kind} features did not come through the patched encoder (features encoded before patching, "
                "e.g. passed as mm_encoder_outputs): encode them with the patched model, or use strategy='pool'."
            )
        rep = item.extras.get("fastvlm_rep")
        if rep is not None:  # anyres (LLaVA-NeXT): the adapter marks the packed token of every reduced cell
            idx = rep.nonzero().squeeze(-1)
            if idx.numel() > item.budget:  # this part's share is smaller: the cells unpadding cut most go first
                idx = idx[best_covered(item.extras["fastvlm_cover"][idx], item.budget)]
            unit = [1, *item.extras["fastvlm_unit_grid"]]
            info = {"reduced_grid": unit, "reduced_cells": int(rep.sum())}
            return Selection(idx.to(item.features.device), None, info)
        h2, w2 = self.reduced_grid(h, w, t)
        _, reps = unpool_index((h, w), (h2, w2))
        reps = (torch.arange(t)[:, None] * (h * w) + reps[None, :]).reshape(-1).to(item.features.device)
        # images get the smaller grid's positions; a video's frames keep their cells' original positions (the
        # releases number the text after a video differently, by the largest id or by its spatial extent)
        grid = (t, h2, w2) if t == 1 else None
        return Selection(reps, None, {"reduced_grid": [t, h2, w2]}, grid=grid)
