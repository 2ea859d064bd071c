"""``hiprune``: HiPrune (Liu et al., arXiv 2508.00553), training-free, from hierarchical ViT attention.

Two ViT layers are read: a middle *object* layer, whose most-attended tokens are the **anchors**, each taken
with its 4 neighbours (the **buffer** cross), and a deep layer whose most-attended remaining tokens are the
**registers** that fill the budget. A token's score is the attention it *receives* (mean over heads and over all
queries, CLS row included for CLIP; for Qwen the mean over each 2x2 merge unit).

Faithfulness (see the project's ``shared/methods.md`` §1 for the official code's behaviour):

* default layers are the official code's: LLaVA object layer 9 (1-based, of CLIP-L's 24) and deep layer = the
  feature layer (``-2``; the paper says "output layer"); Qwen-VL object layer 16 (of 32) and the last block.
  Towers of another depth (e.g. tiny test models) scale the object layer by depth.
* ``buffer="flat"`` (default) reproduces the official flat-index neighbours: ``idx +- 1`` wraps across rows and
  ``idx +- width`` is clamped to the first / last token; ``buffer="grid"`` is the corrected 2-D cross.
* anchors ``n_a = round(K * alpha / 5)`` with Python's round (round half to even), as the official code.
* registers: the official code subtracts 1 from already chosen tokens' deep scores and takes the top-``n_r``.
  With mean-over-queries scores (< 1) that is exactly "best tokens not yet chosen", which is what we do; with
  the official Qwen code's sum-over-queries scores the "-1" can fail and return fewer than K tokens — we always
  return exactly K.
* the budget is always per image: the official LLaVA code divides it by the number of images in the batch;
  we never let the batch change a sample's budget.
* ties in a ranking go to the lower token index (a stable sort); the official ``torch.topk`` leaves tie order
  unspecified (ties do not occur with real-valued attention).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch

from .._ops import top_indices
from ..config import PruneConfig
from ..errors import ConfigError, UnsupportedInputError
from .base import ImageTokens, Method, Selection

__all__ = ["HiPruneConfig", "hiprune_select", "buffer_cross", "PAPER_LAYERS"]

# model_type -> (object layer, 1-based, in a tower of `depth` blocks, depth) from the official code
# (no official Qwen3-VL setting: its 27-block tower gets the Qwen ratio, block 14)
PAPER_LAYERS: dict[str, tuple[int, int]] = {
    "llava": (9, 24),
    "qwen2_vl": (16, 32),
    "qwen2_5_vl": (16, 32),
    "qwen3_vl": (16, 32),
}


def buffer_cross(anchors: torch.Tensor, grid: tuple[int, int, int], mode: str = "flat") -> torch.Tensor:
    """Anchors plus their 4 neighbours, de-duplicated and sorted.

    Args:
        anchors: ``(n_a,)`` int64 flat indices into a ``(t, h, w)`` raster grid.
        grid: ``(t, h, w)``.
        mode: ``"flat"`` = the official flat arithmetic (``+-1`` wraps across rows, ``+-w`` clamped to
            ``[0, N-1]``; on a video, ``+-1`` / ``+-w`` also cross from a frame's edge into the next or previous
            frame); ``"grid"`` = the 2-D cross within the anchor's frame, neighbours outside it dropped.

    Returns:
        ``(m,)`` int64 sorted unique indices, ``m <= 5 * n_a``.
    """
    t, h, w = grid
    n = t * h * w
    if anchors.numel() == 0:
        return anchors
    if mode == "flat":
        cand = torch.cat([anchors, anchors - 1, anchors + 1, anchors - w, anchors + w]).clamp(0, n - 1)
        return torch.unique(cand)
    frame, rem = anchors // (h * w), anchors % (h * w)
    r, c = rem // w, rem % w
    out = [anchors]
    for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out.append((frame * h * w + rr * w + cc)[ok])
    return torch.unique(torch.cat(out))


def hiprune_select(
    object_score: torch.Tensor,
    deep_score: torch.Tensor,
    k: int,
    grid: tuple[int, int, int],
    alpha: float = 0.1,
    buffer: str = "flat",
) -> torch.Tensor:
    """HiPrune's selection for one image.

    Args:
        object_score: ``(N,)`` attention received by each token in the object layer.
        deep_score: ``(N,)`` the same in the deep layer.
        k: budget, ``1 <= k <= N``.
        grid: ``(t, h, w)`` raster grid of the ``N`` tokens (the buffer cross uses width ``w``).
        alpha: anchor ratio: ``round(k * alpha / 5)`` anchors.
        buffer: ``"flat"`` (official) or ``"grid"`` (corrected), see :func:`buffer_cross`.

    Returns:
        ``(k,)`` int64 kept indices, strictly increasing.
    """
    n = object_score.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    n_anchor = round(k * alpha / 5)  # Python round: half to even, as the official code
    anchors = top_indices(object_score, n_anchor)
    chosen = buffer_cross(anchors, grid, buffer)
    if chosen.numel() > k:  # only for tiny budgets with a large alpha: keep the best by object score
        chosen = chosen[top_indices(object_score[chosen], k)]
    taken = torch.zeros(n, dtype=torch.bool, device=object_score.device)
    taken[chosen] = True
    n_reg = k - int(chosen.numel())
    rest = (~taken).nonzero().squeeze(-1)
    registers = rest[top_indices(deep_score[rest], n_reg)]
    return torch.cat([chosen, registers]).sort().values


@dataclasses.dataclass
class HiPruneConfig(PruneConfig):
    """HiPrune settings; defaults are the official code's (see the module docstring).

    Attributes:
        alpha: anchor ratio in [0, 1] (official 0.1): ``round(K * alpha / 5)`` anchors, each with 4 neighbours.
        object_layer: 1-based ViT block whose attention picks anchors; ``None`` = the official per family
            (LLaVA 9 of 24, Qwen-VL 16 of 32), scaled by depth for towers of another depth.
        deep_layer: Python index of the block whose attention picks registers; ``None`` = the official: LLaVA's
            feature layer (``vision_feature_layer``, -2), Qwen-VL's last block (-1).
        buffer: ``"flat"`` (official flat-index neighbours) or ``"grid"`` (corrected 2-D cross).
    """

    name = "hiprune"

    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None
    buffer: str = "flat"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha!r} is not valid: the anchor ratio is a number in [0, 1] (0.1).")
        self.alpha = float(self.alpha)
        if self.object_layer is not None and (
            isinstance(self.object_layer, bool) or not isinstance(self.object_layer, int) or self.object_layer < 1
        ):
            raise ConfigError(f"object_layer={self.object_layer!r} is not valid: a 1-based block number (>= 1).")
        if self.deep_layer is not None and (isinstance(self.deep_layer, bool) or not isinstance(self.deep_layer, int)):
            raise ConfigError(f"deep_layer={self.deep_layer!r} is not valid: a Python index of a ViT block.")
        if self.buffer not in ("flat", "grid"):
            raise ConfigError(f"buffer={self.buffer!r} is not valid: 'flat' (official) or 'grid' (2-D cross).")

    def build(self) -> Method:
        return HiPruneMethod(self)


class HiPruneMethod(Method):
    requires = frozenset({"vit_attention"})

    def resolve_layers(self, model_type: str, depth: int, feature_layer: int) -> tuple[int, int]:
        """0-based ``(object, deep)`` block indices for a tower of ``depth`` blocks."""
        cfg = self.config
        if cfg.object_layer is not None:
            obj = cfg.object_layer
        else:
            paper, paper_depth = PAPER_LAYERS.get(model_type, (9, 24))
            obj = paper if depth == paper_depth else max(1, round(depth * paper / paper_depth))
        deep = cfg.deep_layer if cfg.deep_layer is not None else feature_layer
        if not 1 <= obj <= depth or not -depth <= deep < depth:
            raise ConfigError(
                f"HiPrune layers object_layer={obj} (1-based) / deep_layer={deep} do not exist in a vision tower "
                f"of {depth} blocks."
            )
        return obj - 1, deep % depth

    def attach(self, ctx: Any) -> None:
        adapter, model = ctx.adapter, ctx.model
        self.layers = self.resolve_layers(
            model.config.model_type, adapter.vit_depth(model), adapter.feature_layer(model)
        )
        self.probe = adapter.attention_probe(model, list(self.layers))
        self.probe.install(ctx)

    def detach(self) -> None:
        self.probe = None

    def begin_encode(self, kind: str) -> None:
        self.probe.reset()

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[dict[str, Any]]:
        obj, deep = self.layers
        return [{"object_score": s[obj], "deep_score": s[deep]} for s in self.probe.collect(len(features))]

    def select(self, item: ImageTokens) -> Selection:
        cfg = self.config
        if "object_score" not in item.extras:
            raise UnsupportedInputError(
                "HiPrune reads the vision tower's attention, so the images must be encoded by the patched model; "
                "pre-computed mm_encoder_outputs carry no attention. Pass pixel_values instead."
            )
        obj, deep = item.extras["object_score"], item.extras["deep_score"]
        if obj.shape[0] != item.num_tokens:
            raise RuntimeError(f"HiPrune got {obj.shape[0]} attention scores for {item.num_tokens} tokens")
        idx = hiprune_select(
            obj.to(item.features.device), deep.to(item.features.device), item.budget, item.grid, cfg.alpha, cfg.buffer
        )
        return Selection(idx, info={"object_layer": self.layers[0] + 1, "deep_layer": self.layers[1]})
