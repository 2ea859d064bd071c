"""The interface between adapters (where to cut) and methods (what to keep).

An adapter hands a method one :class:`ImageTokens` per image (or video) in the batch and receives a
:class:`Selection`. Methods never see the model: only tensors, the token grid, the budget and the extra
signals they declared in :attr:`Method.requires` (e.g. one ViT layer's attention), which the adapter collects
with hooks for that one layer only.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import PruneConfig

__all__ = ["ImageTokens", "Selection", "Method"]


@dataclasses.dataclass
class ImageTokens:
    """The vision tokens of one image (or one video) of one sample, as they are about to enter the LLM.

    Attributes:
        features: ``(N, D)`` the projected features, exactly the rows of ``inputs_embeds`` the LLM would get.
        grid: ``(t, h, w)`` token grid with ``t * h * w == N`` in raster order (t = 1 for images). For LLaVA
            ``(1, 24, 24)``; for Qwen-VL the grid after the 2x2 patch merger.
        budget: number of tokens to keep, ``1 <= budget < N`` (the core never calls a method when all are kept).
        key: an integer derived from the image's pixels (not from its batch row); seed randomness with it so a
            batch gives the same choices as single samples and beams agree.
        kind: ``"image"`` or ``"video"``.
        extras: signals the method declared in :attr:`Method.requires` (documented by the method).
    """

    features: torch.Tensor
    grid: tuple[int, int, int]
    budget: int
    key: int = 0
    kind: str = "image"
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass
class Selection:
    """What a method returns for one image.

    Attributes:
        indices: ``(K,)`` int64, strictly increasing indices into the image's ``N`` tokens. For pruning methods
            the kept tokens; for merging methods the *representative* of each new token, whose original position
            (1-D or M-RoPE) the new token takes.
        tokens: ``(K, D)`` replacement values for merging methods (``tokens[i]`` is placed at
            ``indices[i]``), or ``None`` to keep the original rows.
        info: anything worth showing in :func:`vlmprune.last_stats` (small, JSON-friendly).
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Method:
    """Base class of method objects (built from a config by ``config.build()``).

    Subclasses implement :meth:`select`. ``requires`` lists extra signals the adapter must collect (none for
    the baselines).
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def select(self, item: ImageTokens) -> Selection:
        """Choose ``item.budget`` tokens of ``item``; see :class:`Selection`."""
        raise NotImplementedError
