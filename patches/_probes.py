"""Attention probes: the attention each vision token *receives* in chosen ViT layers, recomputed for those
layers only, while the tower keeps running with SDPA / flash-attention.

A probe captures the outputs of the chosen attention modules' own query / key projections with forward hooks
(no projection is computed twice) and, when the attention module returns, computes that layer's softmax
attention (:mod:`vlmprune.attention`) and stores one score vector per image, already mapped to the tokens the
LLM receives (CLS dropped for CLIP; 2x2 merge units averaged and window order undone for Qwen). Nothing is kept
of the maps themselves.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..attention import received_attention
from ..errors import PatchBypassedError

__all__ = ["AttentionProbe", "ClipAttentionProbe", "QwenAttentionProbe", "ClipLayerCapture", "ClipClsProbe"]


class AttentionProbe:
    """Base: ``install`` through the patch context, ``reset`` before an encoding, ``collect`` after it.

    Args:
        layers: 0-based indices of the ViT blocks to read.
    """

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        self.model = model
        self.layers = sorted(set(layers))
        self.scores: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}

    def reset(self) -> None:
        self.scores = {i: [] for i in self.layers}

    def collect(self, n_items: int) -> list[dict[int, torch.Tensor]]:
        """Per encoded item, ``{layer: (n_tokens,) float32 scores}``."""
        for layer, got in self.scores.items():
            if len(got) != n_items:
                raise PatchBypassedError(
                    f"the attention probe on vision layer {layer} saw {len(got)} images but the model encoded "
                    f"{n_items}; the layer did not run (e.g. a feature layer before it stops the tower early). "
                    "Choose a layer the vision tower runs."
                )
        return [{layer: self.scores[layer][i] for layer in self.layers} for i in range(n_items)]

    def install(self, ctx: Any) -> None:
        raise NotImplementedError


class ClipAttentionProbe(AttentionProbe):
    """CLIP / SigLIP-style towers (LLaVA): ``layers[i].self_attn`` with ``q_proj`` / ``k_proj``. With ``with_keys``
    each image's entry is ``{"received": (n,), "keys": (n, d)}`` (head-mean keys; VisionZip without a CLS token)."""

    def __init__(self, model: nn.Module, layers: list[int], n_grid: int, with_keys: bool = False) -> None:
        super().__init__(model, layers)
        self.n_grid = n_grid
        self.with_keys = with_keys

    def install(self, ctx: Any) -> None:
        tower = self.model.model.vision_tower
        blocks = getattr(tower, "vision_model", tower).encoder.layers
        for i in self.layers:
            attn = blocks[i].self_attn
            captured: dict[str, torch.Tensor] = {}
            ctx.register(attn.q_proj.register_forward_hook(self._keep(captured, "q")))
            ctx.register(attn.k_proj.register_forward_hook(self._keep(captured, "k")))
            ctx.register(attn.register_forward_hook(self._score(i, captured)))

    @staticmethod
    def _keep(captured: dict, name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            captured[name] = out

        return hook

    def _score(self, layer: int, captured: dict) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            q, k = captured.pop("q"), captured.pop("k")
            B, N, _ = q.shape
            q = q.view(B, N, mod.num_heads, -1).transpose(1, 2)
            k = k.view(B, N, mod.num_heads, -1).transpose(1, 2)
            with torch.no_grad():
                s = received_attention(q, k, float(mod.scale))  # (B, N): mean over heads and ALL queries
                keys = k.mean(1) if self.with_keys else None  # (B, N, d)
            if N == self.n_grid + 1:  # drop the CLS key (after averaging over all queries, CLS row included)
                s = s[:, 1:]
                keys = keys[:, 1:] if keys is not None else None
            if keys is None:
                self.scores[layer].extend(s.unbind(0))
            else:
                self.scores[layer].extend({"received": a, "keys": b} for a, b in zip(s, keys, strict=True))

        return hook


class QwenAttentionProbe(AttentionProbe):
    """Qwen2-VL / Qwen2.5-VL ViTs: fused ``qkv``, vision RoPE, packed images, 2x2 merger; Qwen2.5-VL runs its
    blocks in window-permuted order, undone here. Attention is recomputed densely over each frame (what the
    official HiPrune Qwen code does), whether the block is a window block or not. With ``with_keys`` each
    image's entry is ``{"received": (n,), "keys": (n, d)}`` (head-mean keys averaged over merge units)."""

    def __init__(self, model: nn.Module, layers: list[int], with_keys: bool = False) -> None:
        super().__init__(model, layers)
        self.with_keys = with_keys

    def install(self, ctx: Any) -> None:
        visual = self.model.model.visual
        self.visual = visual
        ctx.register(visual.register_forward_pre_hook(self._visual_pre, with_kwargs=True))
        for i in self.layers:
            attn = visual.blocks[i].attn
            captured: dict[str, Any] = {}
            ctx.register(attn.register_forward_pre_hook(self._keep_rope(captured), with_kwargs=True))
            ctx.register(attn.qkv.register_forward_hook(self._keep_qkv(captured)))
            ctx.register(attn.register_forward_hook(self._hook(i, captured)))
        self.grid: torch.Tensor | None = None
        self.unpermute: torch.Tensor | None = None

    @staticmethod
    def _keep_rope(captured: dict) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is None:  # older releases pass the raw rotary angles
                emb = torch.cat([kwargs["rotary_pos_emb"]] * 2, dim=-1)
                cos_sin = (emb.cos(), emb.sin())
            captured["rope"] = cos_sin

        return hook

    @staticmethod
    def _keep_qkv(captured: dict) -> Any:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            captured["qkv"] = out

        return hook

    def _visual_pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.grid = grid
        self.unpermute = None
        if grid is not None and hasattr(mod, "fullatt_block_indexes"):  # Qwen2.5-VL: window-permuted blocks
            self.unpermute = torch.argsort(self._window_index(mod, grid))

    @staticmethod
    def _window_index(visual: nn.Module, grid: torch.Tensor) -> torch.Tensor:
        if hasattr(visual, "get_window_index"):  # transformers <= ~5.2x
            return visual.get_window_index(grid)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )[0]

    def _hook(self, layer: int, captured: dict) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            qkv, cos_sin = captured.pop("qkv"), captured.pop("rope")
            S = qkv.shape[0]
            q, k, _ = qkv.reshape(S, 3, mod.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            rope = sys.modules[type(mod).__module__].apply_rotary_pos_emb_vision
            q, k = rope(q, k, *cos_sin)
            m2 = self.visual.spatial_merge_size**2
            if self.unpermute is not None:
                idx = self.unpermute.to(qkv.device)
                q = q.reshape(S // m2, m2, *q.shape[1:])[idx].reshape(S, *q.shape[1:])
                k = k.reshape(S // m2, m2, *k.shape[1:])[idx].reshape(S, *k.shape[1:])
            start = 0
            with torch.no_grad():
                for t, hh, ww in self.grid.tolist():
                    frames = []
                    for _ in range(t):
                        qf = q[start : start + hh * ww].transpose(0, 1)  # (H, n, d)
                        kf = k[start : start + hh * ww].transpose(0, 1)
                        frames.append(received_attention(qf, kf, float(mod.scaling)))
                        start += hh * ww
                    # one score per LLM token: the mean over its merge unit (consecutive patches)
                    score = torch.cat(frames).view(-1, m2).mean(-1)
                    if self.with_keys:  # head-mean keys, averaged over each merge unit too
                        n = t * hh * ww
                        kimg = k[start - n : start].mean(1)  # (n, d)
                        score = {"received": score, "keys": kimg.view(-1, m2, kimg.shape[-1]).mean(1)}
                    self.scores[layer].append(score)

        return hook


class ClipLayerCapture(AttentionProbe):
    """One CLIP block, per image: the CLS row of its attention (summed over heads) over the patches, the
    head-mean keys of every token, and the block's output hidden states (CLS included) — what VisionZip reads.
    Captured from the block's own q/k projections and output (no recomputed projection)."""

    def __init__(self, model: nn.Module, layer: int, n_grid: int) -> None:
        super().__init__(model, [layer])
        self.layer = layer
        self.n_grid = n_grid

    def install(self, ctx: Any) -> None:
        tower = self.model.model.vision_tower
        block = getattr(tower, "vision_model", tower).encoder.layers[self.layer]
        attn = block.self_attn
        captured: dict[str, torch.Tensor] = {}
        ctx.register(attn.q_proj.register_forward_hook(ClipAttentionProbe._keep(captured, "q")))
        ctx.register(attn.k_proj.register_forward_hook(ClipAttentionProbe._keep(captured, "k")))
        ctx.register(block.register_forward_hook(self._on_block(attn, captured)))

    def _on_block(self, attn: nn.Module, captured: dict) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            q, k = captured.pop("q"), captured.pop("k")
            B, N, _ = q.shape
            H = attn.num_heads
            if N != self.n_grid + 1:
                raise PatchBypassedError("VisionZip needs a CLS token; this vision tower has none.")
            with torch.no_grad():
                qh = q[:, :1].view(B, 1, H, -1).transpose(1, 2)  # CLS query only: O(N d) per head
                kh = k.view(B, N, H, -1).transpose(1, 2)
                cls_row = torch.softmax((qh.float() * float(attn.scale)) @ kh.float().transpose(-1, -2), -1)
                cls_attn = cls_row[:, :, 0, 1:].sum(1)  # (B, N-1): summed over heads, CLS column dropped
                keys = kh.mean(1)  # (B, N, d): head-mean keys, CLS included
            for b in range(B):
                self.scores[self.layer].append(
                    {"cls_attention": cls_attn[b], "keys": keys[b, 1:], "hidden": hidden[b]}
                )

        return hook


class ClipClsProbe(AttentionProbe):
    """One CLIP block, per image: the CLS token's attention to every patch, as DAMRO scores it
    (:func:`vlmprune.methods.damro.cls_attention_scores`), from the block's own ``q_proj`` / ``k_proj`` outputs.
    Only the CLS query row is computed."""

    def __init__(self, model: nn.Module, layer: int, n_grid: int, mode: str) -> None:
        super().__init__(model, [layer])
        self.layer, self.n_grid, self.mode = layer, n_grid, mode

    def install(self, ctx: Any) -> None:
        tower = self.model.model.vision_tower
        attn = getattr(tower, "vision_model", tower).encoder.layers[self.layer].self_attn
        captured: dict[str, torch.Tensor] = {}
        ctx.register(attn.q_proj.register_forward_hook(ClipAttentionProbe._keep(captured, "q")))
        ctx.register(attn.k_proj.register_forward_hook(ClipAttentionProbe._keep(captured, "k")))
        ctx.register(attn.register_forward_hook(self._score(captured)))

    def _score(self, captured: dict) -> Any:
        from ..methods.damro import cls_attention_scores

        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            q, k = captured.pop("q"), captured.pop("k")
            if k.shape[1] != self.n_grid + 1:
                raise PatchBypassedError(
                    f"DAMRO's CLS score needs a CLS token; vision layer {self.layer} has {k.shape[1]} tokens for a "
                    f"{self.n_grid}-patch grid. Use score='norm'."
                )
            with torch.no_grad():
                s = cls_attention_scores(q[:, 0], k, mod.num_heads, self.mode)  # (B, N)
            self.scores[self.layer].extend(s.unbind(0))

        return hook
