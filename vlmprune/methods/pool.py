"""``pool``: average-pool the token grid down to the budget (a merging baseline)."""

from __future__ import annotations

import dataclasses

import torch

from ..config import PruneConfig
from ._grid import grid_partition
from .base import ImageTokens, Method, Selection

__all__ = ["PoolConfig", "pool_tokens"]


def pool_tokens(features: torch.Tensor, grid: tuple[int, int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the tokens of each of ``k`` near-equal rectangular regions of the grid.

    Args:
        features: ``(..., N, D)`` tokens in raster order of ``grid``.
        grid: ``(t, h, w)`` with ``t * h * w == N``.
        k: number of output tokens, ``1 <= k <= N``. When ``k`` tiles the grid evenly this is ordinary
            ``s x s`` average pooling (``k=144`` of 24x24 -> 2x2).

    Returns:
        ``tokens`` ``(..., k, D)`` region means (accumulated in float32, returned in ``features.dtype``), and
        ``reps`` ``(k,)`` int64 the centre token of each region, strictly increasing: the original position each
        new token stands for.
    """
    n = features.shape[-2]
    if n != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"features have {n} tokens but grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]}")
    labels, reps = grid_partition(grid, k, features.device)
    acc = features.float()
    sums = acc.new_zeros((*acc.shape[:-2], k, acc.shape[-1])).index_add_(-2, labels, acc)
    counts = torch.bincount(labels, minlength=k).to(acc.dtype)
    return (sums / counts[:, None]).to(features.dtype), reps


@dataclasses.dataclass
class PoolConfig(PruneConfig):
    """Spatial average pooling to the budget; each pooled token takes the position of its region's centre."""

    name = "pool"

    def build(self) -> Method:
        return PoolMethod(self)


class PoolMethod(Method):
    def select(self, item: ImageTokens) -> Selection:
        tokens, reps = pool_tokens(item.features, item.grid, item.budget)
        return Selection(reps, tokens)
