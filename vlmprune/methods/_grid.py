"""Partition of a token grid into exactly ``k`` near-equal rectangular regions (shared by uniform and pool)."""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["grid_partition", "split_sizes"]


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` contiguous segment lengths differing by at most one (``parts <= total``)."""
    bounds = [(i * total) // parts for i in range(parts + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _regions(sizes: tuple[int, ...], k: int) -> list[list[tuple[int, int]]]:
    """Boxes (one ``(start, stop)`` per dim) of a partition of the grid ``sizes`` into exactly ``k`` regions.

    The first dim is cut into ``b`` bands, with ``b`` chosen so the reduction is about the same along every dim,
    and the budget is spread over the bands (``k // b`` or one more each); each band is partitioned recursively.
    When ``k`` factors like the grid (e.g. 144 of 24x24) this is a plain strided tiling (2x2 blocks).
    """
    n0 = sizes[0]
    if len(sizes) == 1:
        out, start = [], 0
        for s in split_sizes(n0, k):
            out.append([(start, start + s)])
            start += s
        return out
    rest = math.prod(sizes[1:])
    factor = (math.prod(sizes) / k) ** (1.0 / len(sizes))
    bands = round(n0 / factor)
    bands = min(max(bands, math.ceil(k / rest), 1), n0, k)
    out, start = [], 0
    for size, kb in zip(split_sizes(n0, bands), [k // bands + (i < k % bands) for i in range(bands)], strict=True):
        for sub in _regions(sizes[1:], kb):
            out.append([(start, start + size), *sub])
        start += size
    return out


@functools.lru_cache(maxsize=256)
def _partition_cpu(grid: tuple[int, int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, w = grid
    labels = torch.empty((t, h, w), dtype=torch.long)
    reps = torch.empty(k, dtype=torch.long)
    for r, ((t0, t1), (h0, h1), (w0, w1)) in enumerate(_regions((t, h, w), k)):
        labels[t0:t1, h0:h1, w0:w1] = r
        # the representative is the region's centre token (upper-left of the centre for even sizes)
        ct, ch, cw = t0 + (t1 - t0 - 1) // 2, h0 + (h1 - h0 - 1) // 2, w0 + (w1 - w0 - 1) // 2
        reps[r] = (ct * h + ch) * w + cw
    return labels.reshape(-1), reps


def grid_partition(
    grid: tuple[int, int, int], k: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition a ``(t, h, w)`` token grid into exactly ``k`` rectangular regions of near-equal size.

    Args:
        grid: ``(t, h, w)``, ``N = t * h * w`` tokens in raster order.
        k: number of regions, ``1 <= k <= N``.
        device: where to put the returned tensors.

    Returns:
        ``labels`` ``(N,)`` int64 region id of every token, and ``reps`` ``(k,)`` int64 flat index of each
        region's centre token; region ids follow raster order, so ``reps`` is strictly increasing.
    """
    t, h, w = (int(x) for x in grid)
    n = t * h * w
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}] for grid {grid}")
    labels, reps = _partition_cpu((t, h, w), int(k))
    return labels.to(device), reps.to(device)
