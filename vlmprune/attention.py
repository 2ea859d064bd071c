"""Attention probabilities recomputed for one layer, from that layer's own queries and keys.

Models keep running with SDPA / flash-attention; a method that needs one ViT layer's attention gets it by
recomputing ``softmax(q k^T * scale)`` for that layer only (transformers 5.x returns no weights under SDPA for
CLIP and *wrong* tensors for Qwen ViTs when asked for ``output_attentions``). Pure tensor functions.
"""

from __future__ import annotations

import torch

__all__ = ["attention_probs", "received_attention"]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Full softmax attention map (no mask), computed in float32.

    Args:
        q: ``(..., H, Nq, d)`` queries (after any rotary embedding).
        k: ``(..., H, Nk, d)`` keys.
        scale: the layer's softmax scale (usually ``d ** -0.5``).

    Returns:
        ``(..., H, Nq, Nk)`` probabilities; each row sums to 1.
    """
    return torch.softmax((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Attention *received* by every key: the map averaged over heads and over all queries.

    This is HiPrune's "global attention" score (paper Eq. 2 up to a constant factor, which does not change any
    ranking). Queries are processed in chunks so a large image never materialises its full ``H x N x N`` map
    (256 queries per chunk keeps the working set cache-sized: 3x faster than one 577-query block on a CPU).

    Args:
        q: ``(..., H, N, d)``; k: ``(..., H, N, d)``.
        scale: softmax scale.
        chunk: queries per chunk.

    Returns:
        ``(..., N)`` float32 scores, summing to 1 over the keys.
    """
    n_q = q.shape[-2]
    total = None
    for start in range(0, n_q, chunk):
        part = attention_probs(q[..., start : start + chunk, :], k, scale).sum(dim=-2)  # (..., H, Nk)
        total = part if total is None else total + part
    return total.mean(dim=-2) / n_q
