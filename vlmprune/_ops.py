"""Small tensor operations shared by the patch core and the methods."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["top_indices", "repad_index", "cache_of", "output_cache", "cache_bytes"]


def top_indices(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest entries of the last dim of ``score``, best first, ties to the lower index
    (a stable sort; ``torch.topk`` leaves tie order unspecified)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]


def repad_index(keep: torch.Tensor, real: torch.Tensor, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One gather index per row that keeps the ``keep`` tokens in their original order, re-padded.

    Args:
        keep: ``(B, L)`` bool, tokens to keep (a subset of ``real``).
        real: ``(B, L)`` bool, non-pad tokens.
        right: pad on the right (kept tokens first) instead of the left.

    Returns:
        ``idx`` ``(B, L')`` with ``L' = max kept per row``, and ``slot_valid`` ``(B, L')`` bool (slot holds a kept
        token). A stable sort does it: with left padding pads come first, then kept tokens, and the dropped ones
        sort before both and are cut off; with keep == real and left padding ``idx`` is the identity.
    """
    L = keep.shape[1]
    n = int(keep.sum(-1).max())
    if right:
        key = torch.where(keep, 0, torch.where(real, 2, 1))
        idx = torch.sort(key, dim=-1, stable=True).indices[:, :n]
    else:
        key = torch.where(keep, 2, torch.where(real, 0, 1))
        idx = torch.sort(key, dim=-1, stable=True).indices[:, L - n :]
    return idx, keep.gather(1, idx)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's kwargs (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``.cache`` from 5.24, ``.past_key_values`` before), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by a KV cache's key and value tensors (``None`` for no cache or an unknown layout)."""
    if cache is None:
        return None
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total or None
