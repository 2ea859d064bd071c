"""``fastv``: FastV (Chen et al., arXiv 2403.06764), training-free, inside the LLM.

The LLM runs its first ``K`` layers on all tokens; then each image keeps the tokens that the **last prompt
token** attends to most in layer ``K - 1`` (attention averaged over heads), and layers ``K ..`` run on the shorter
sequence. Defaults are the paper's ``K = 2, R = 50 %`` (``keep=0.5``). As in the official KV-cache code, the
ranking is done once at prefill: layers ``< K`` cache every token, layers ``>= K`` only the kept ones, and kept
tokens keep their **original** positions (1-D or M-RoPE), so decoding continues from the original positions.

Differences from the official code, all in the direction of correctness: the budget is per image (the official
code takes one hard-coded image span of batch row 0); pad columns are excluded from the ranking softmax; the
layer ``K - 1`` attention is computed for the last token's row only, from that layer's own inputs (the official
code runs the layer eagerly with ``output_attentions``). The paper's text describes the score as the attention
a token receives from *all* tokens; the official code (and this one) uses the last token's row.

Supported: SDPA or eager LLM attention, dynamic caches (static caches are refused: their per-layer write
positions would need translating), greedy / sampling / beam search.
"""

from __future__ import annotations

import dataclasses
import numbers
import weakref
from typing import Any

import torch

from .._ops import cache_of, output_cache, repad_index, top_indices
from ..config import PruneConfig
from ..errors import ConfigError, UnsupportedInputError, UnsupportedModelError
from .base import Method

__all__ = ["FastVConfig", "last_token_attention"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _combine_mrope(t: torch.Tensor, sections: list[int]) -> torch.Tensor:
    """``(3, B, L, d)`` per-axis cos/sin -> ``(B, L, d)`` as multimodal RoPE applies them (older releases)."""
    chunks = t.split([s for s in sections] * 2, dim=-1)
    return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)


def last_token_attention(q_last: torch.Tensor, k: torch.Tensor, scale: float, real: torch.Tensor) -> torch.Tensor:
    """Attention row of one query per sample, averaged over heads.

    Args:
        q_last: ``(B, H, 1, d)`` the query of each sample's last real token (after RoPE).
        k: ``(B, H, L, d)`` keys (after RoPE; KV heads already repeated to ``H``).
        scale: softmax scale.
        real: ``(B, L)`` bool, False for padding (excluded from the softmax).

    Returns:
        ``(B, L)`` float32 probabilities (0 at padding).
    """
    s = (q_last.float() * scale) @ k.float().transpose(-1, -2)  # (B, H, 1, L)
    s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1)[:, :, 0].mean(1)


@dataclasses.dataclass
class FastVConfig(PruneConfig):
    """FastV settings.

    Attributes:
        keep: share (or count) of each image's tokens kept for layers ``>= layer``; paper ``R = 50 %`` -> 0.5.
        layer: ``K`` (>= 1): layers ``0 .. K-1`` see every token, the ranking uses layer ``K - 1``'s attention.
    """

    name = "fastv"

    keep: float | int = 0.5
    layer: int = 2

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 1:
            raise ConfigError(f"layer={self.layer!r} is not valid: FastV's K is an LLM layer index >= 1 (paper: 2).")
        self.layer = int(self.layer)

    def build(self) -> Method:
        return FastVMethod(self)


class FastVMethod(Method):
    prunes_at_entry = False

    def attach(self, ctx: Any) -> None:
        lm = ctx.lm
        layers = lm.layers
        K = self.config.layer
        if K >= len(layers):
            raise ConfigError(f"FastV layer={K} must be smaller than the LLM's {len(layers)} layers.")
        impl = lm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(
                f"FastV in vlmprune runs with SDPA or eager LLM attention (got {impl!r}); flash-attention-2 is not "
                "tested yet. Load the model with attn_implementation='sdpa'."
            )
        self.model, self.lm, self.K, self.impl, self.ctx = ctx.model, lm, K, impl, ctx
        self.plan: Any = None
        self.rec: dict[str, Any] | None = None
        self.mode: str | None = None
        ctx.register(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        ctx.register(lm.register_forward_hook(self._lm_post, with_kwargs=True))
        ctx.register(layers[K - 1].self_attn.register_forward_pre_hook(self._rank, with_kwargs=True))
        for i in range(K, len(layers)):
            ctx.register(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        deepstack = getattr(lm, "_deepstack_process", None)
        if callable(deepstack):  # Qwen3-VL adds ViT features at the vision positions of its first LLM layers
            ctx.shadow(lm, "_deepstack_process", self._make_deepstack(deepstack, ctx.adapter))

    def detach(self) -> None:
        self.plan = self.rec = self.lm = self.model = self.ctx = None

    def plan_prefill(self, plan: list[tuple[Any, int]], real: torch.Tensor, stats: list[dict[str, Any]]) -> None:
        self.plan = (plan, real, stats)

    # ---- per forward --------------------------------------------------------------------------------------
    def _lm_pre(self, mod: Any, args: tuple, kwargs: dict) -> None:
        if self.ctx.passthrough:  # another branch (DAMRO's) runs the LLM; the layer hooks see mode None
            return
        cache = cache_of(kwargs)
        if getattr(cache, "is_compileable", False):
            if getattr(self.model, "_cache", None) is cache:  # generate() keeps static caches for reuse: drop it,
                del self.model._cache  # it was never filled and would break the next static generate()
            raise UnsupportedInputError(
                "FastV keeps fewer tokens in its later layers' cache than in its first layers'; static caches "
                "(cache_implementation='static') are not supported. Use the default dynamic cache."
            )
        if self.plan is not None:
            self.mode, self.rec = "prefill", None
        elif (
            self.rec is not None
            and cache is not None
            and self.rec["cache"] is not None
            and (self.rec["cache"]() is cache)
        ):
            self.mode = "decode"
            emb = kwargs.get("inputs_embeds")
            self.rec["q"] = emb.shape[1] if emb is not None else kwargs["input_ids"].shape[1]
        else:
            self.mode, self.rec = None, None

    def _lm_post(self, mod: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.ctx.passthrough:
            return
        if self.mode == "prefill":
            self.plan = None
            if self.rec is not None:
                cache = output_cache(out)
                self.rec["cache"] = weakref.ref(cache) if cache is not None else None
        elif self.mode == "decode":
            self.rec["seen"] += self.rec["q"]
        self.mode = None

    # ---- ranking at layer K-1 -------------------------------------------------------------------------------
    def _rank(self, mod: Any, args: tuple, kwargs: dict) -> None:
        if self.mode != "prefill" or self.plan is None:
            return
        plan, real, stats = self.plan
        h = kwargs.get("hidden_states", args[0] if args else None)
        B, L, _ = h.shape
        real = real.to(h.device)
        rows = torch.arange(B, device=h.device)
        last = (real.long().cumsum(-1) == real.sum(-1, keepdim=True)).long().argmax(-1)  # last real token
        hd = mod.head_dim
        with torch.no_grad():
            q = mod.q_proj(h[rows, last]).view(B, -1, 1, hd)  # (B, H, 1, d)
            k = mod.k_proj(h).view(B, L, -1, hd).transpose(1, 2)  # (B, KV, L, d)
            cos, sin = kwargs["position_embeddings"]
            if cos.ndim == 4:  # older releases: per-axis M-RoPE tables
                sections = mod.config.rope_parameters["mrope_section"]
                cos, sin = _combine_mrope(cos, sections), _combine_mrope(sin, sections)
            cos, sin = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
            cq, sq = cos[rows, last][:, None, None], sin[rows, last][:, None, None]
            q = q * cq + _rotate_half(q) * sq
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            score = last_token_attention(q, k, float(mod.scaling), real)
        keep = real.clone()
        for i, (seg, budget) in enumerate(plan):
            pos = seg.prunable.to(h.device)  # the always-kept tokens (a prefix, newlines) stay
            keep[seg.row, pos] = False
            top = top_indices(score[seg.row, pos], budget).sort().values
            keep[seg.row, pos[top]] = True
            stats[i]["kept_indices"] = top.tolist()
        if bool((keep == real).all()):
            return
        idx, slot_valid = repad_index(keep, real)  # left re-padding, like the entry cut
        Lp = idx.shape[1]
        self.rec = {
            "idx": idx,
            "slot_valid": slot_valid,
            "L": L,
            "Lp": Lp,
            "seen": Lp,
            "cache": None,
            "q": 0,
            "pruned": None,
        }

    def _make_deepstack(self, original: Any, adapter: Any) -> Any:
        """DeepStack injections after layer K land on the pruned sequence: prune their mask and rows the same way
        (layers < K see every token, as usual)."""

        def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: Any) -> Any:
            rec = self.rec
            # after layer K's cut (whatever the lengths: a longest unpruned row keeps L unchanged)
            cut = self.mode == "prefill" and rec is not None and rec.get("pruned") is not None
            if cut and not self.ctx.passthrough:
                kw = {"visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": [visual_embeds]}
                adapter.gather_extra(kw, rec["idx"], rec["slot_valid"])
                visual_pos_masks, visual_embeds = kw["visual_pos_masks"], kw["deepstack_visual_embeds"][0]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        return deepstack_process

    # ---- layers >= K ----------------------------------------------------------------------------------------
    def _layer_hook(self, i: int) -> Any:
        def hook(mod: Any, args: tuple, kwargs: dict) -> Any:
            rec = self.rec
            if rec is None or self.mode is None:
                return None
            if self.mode == "prefill":
                if i == self.K:
                    rec["pruned"] = self._prune_kwargs(kwargs)
                    hidden = self._gather(args[0] if args else kwargs["hidden_states"], rec["idx"], dim=1)
                    args = (hidden, *args[1:]) if args else args
                    if not args:
                        kwargs = {**kwargs, "hidden_states": hidden}
                return args, {**kwargs, **rec["pruned"]}
            return args, {**kwargs, "attention_mask": self._decode_mask(kwargs.get("attention_mask"), rec)}

        return hook

    @staticmethod
    def _gather(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather ``t`` (sequence at ``dim``, batch at ``dim - 1``) with ``idx`` ``(B, Lp)``."""
        shape = list(t.shape)
        shape[dim - 1], shape[dim] = idx.shape[0], idx.shape[1]
        view = [1] * t.ndim
        view[dim - 1], view[dim] = idx.shape[0], idx.shape[1]
        return t.expand(*t.shape[: dim - 1], idx.shape[0], *t.shape[dim:]).gather(dim, idx.view(view).expand(shape))

    def _prune_kwargs(self, kwargs: dict) -> dict[str, Any]:
        rec = self.rec
        idx, valid, Lp = rec["idx"], rec["slot_valid"], rec["Lp"]
        out: dict[str, Any] = {}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(self._gather(t, idx, dim=t.ndim - 2) for t in pe)
        pos = kwargs.get("position_ids")
        if pos is not None:
            out["position_ids"] = self._gather(pos, idx, dim=pos.ndim - 1)
        if kwargs.get("cache_position") is not None:
            out["cache_position"] = torch.arange(Lp, device=idx.device)
        allowed = torch.ones(Lp, Lp, dtype=torch.bool, device=idx.device).tril()[None] & valid[:, None, :]
        allowed |= torch.eye(Lp, dtype=torch.bool, device=idx.device)[None]  # pad rows: no all-masked row
        out["attention_mask"] = self._as_mask(allowed[:, None], kwargs.get("attention_mask"))
        return out

    def _as_mask(self, allowed: torch.Tensor, like: Any) -> torch.Tensor:
        """A 4-D mask in the form the layer expects: bool for SDPA, additive float for eager."""
        if isinstance(like, torch.Tensor) and like.dtype != torch.bool:
            return torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(like.dtype).min
            )
        if like is None and self.impl == "eager":
            dtype = self.lm.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    def _decode_mask(self, mask: Any, rec: dict[str, Any]) -> Any:
        idx, valid, L, Lp, seen, q = rec["idx"], rec["slot_valid"], rec["L"], rec["Lp"], rec["seen"], rec["q"]
        B = idx.shape[0]
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            mask = mask.expand(B, *mask.shape[1:])
            head = mask[..., :L].gather(-1, idx[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], Lp))
            # filler slots of shorter rows may point at dropped (real) tokens: they hold nothing to attend to
            empty = ~valid[:, None, None, :]
            head = head & ~empty if head.dtype == torch.bool else head.masked_fill(empty, torch.finfo(head.dtype).min)
            return torch.cat([head, mask[..., L:]], dim=-1)
        if mask is not None or bool(valid.all()):
            return mask
        new = seen - Lp  # tokens decoded so far into the pruned layers' cache
        cols = torch.arange(seen + q, device=idx.device)
        causal = cols[None, :] <= (seen + torch.arange(q, device=idx.device))[:, None]  # (q, kv)
        allowed = causal[None] & torch.cat([valid, valid.new_ones(B, new + q)], dim=1)[:, None, :]
        return self._as_mask(allowed[:, None], None)
