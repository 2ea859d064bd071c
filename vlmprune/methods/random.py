"""``random``: keep a seeded random subset of each image's tokens (baseline)."""

from __future__ import annotations

import dataclasses

import torch

from ..config import PruneConfig
from .base import ImageTokens, Method, Selection

__all__ = ["RandomConfig", "random_indices"]


def random_indices(n: int, k: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)``, sorted, drawn uniformly with a CPU generator seeded by ``seed``.

    Returns:
        ``(k,)`` int64, strictly increasing. Identical for identical ``(n, k, seed)`` on every device.
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=gen)[:k].sort().values.to(device)


@dataclasses.dataclass
class RandomConfig(PruneConfig):
    """Uniformly random token subset per image. The draw is seeded by ``seed`` combined with a hash of the
    image's pixels, so it differs between images, repeats exactly for the same image, and does not depend on
    the batch row."""

    name = "random"

    def build(self) -> Method:
        return RandomMethod(self)


class RandomMethod(Method):
    def select(self, item: ImageTokens) -> Selection:
        seed = (self.config.seed * 0x9E3779B97F4A7C15 + item.key) & 0x7FFF_FFFF_FFFF_FFFF
        return Selection(random_indices(item.num_tokens, item.budget, seed, item.features.device))
