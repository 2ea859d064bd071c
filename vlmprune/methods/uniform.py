"""``uniform``: keep tokens on a regular stride over the token grid (baseline)."""

from __future__ import annotations

import dataclasses

import torch

from ..config import PruneConfig
from ._grid import grid_partition
from .base import ImageTokens, Method, Selection

__all__ = ["UniformConfig", "uniform_indices"]


def uniform_indices(grid: tuple[int, int, int], k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Exactly ``k`` tokens spread evenly over a ``(t, h, w)`` grid: the centre of each region of
    :func:`~vlmprune.methods._grid.grid_partition`. When ``k`` tiles the grid evenly this is a plain stride
    (``k=144`` of 24x24 -> every second row and column; ``k=64`` -> every third, starting at the centre).

    Returns:
        ``(k,)`` int64 flat indices, strictly increasing.
    """
    return grid_partition(grid, k, device)[1]


@dataclasses.dataclass
class UniformConfig(PruneConfig):
    """Regular grid stride: the same, content-independent positions for every image of a given grid."""

    name = "uniform"

    def build(self) -> Method:
        return UniformMethod(self)


class UniformMethod(Method):
    def select(self, item: ImageTokens) -> Selection:
        return Selection(uniform_indices(item.grid, item.budget, item.features.device))
