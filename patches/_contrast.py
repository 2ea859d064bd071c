"""DAMRO's contrastive branch on a patched model: a second, short pass of the same language model that sees the
text plus each image's outlier tokens only, with its own KV cache, combined with the main branch at the logits.

Mechanics (all instance-level, removed by ``unpatch``):

* ``generate`` is shadowed on the instance only to open a *session* (and refuse beam search / assisted
  decoding); plain ``model(**inputs)`` calls are never contrasted.
* the outlier scores come from a probe on one ViT layer (or from the features' norms), per image, through the
  method's ``end_encode``;
* in the prefill, the patch core shows the method the whole unpruned LLM input (``observe_prefill``); the branch
  gathers text + outliers from it (re-padded, positions contiguous for 1-D RoPE, original for M-RoPE);
* a forward hook on the top-level model runs the branch's prefill or decode step right after the main forward
  and replaces the last position's logits with the contrastive ones, so ``generate()``'s own logits processors
  (temperature, top-p, repetition penalty, ...) and its greedy / sampling choice apply afterwards. While the branch
  runs, the patch's own hooks (and in-LLM methods' hooks) stand aside (``PatchState.passthrough``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from .._ops import cache_bytes, cache_of, output_cache
from ..errors import ConfigError, PatchBypassedError, UnsupportedInputError, UnsupportedModelError
from ..methods.damro import DamroConfig, contrast_logits, select_outliers

__all__ = ["ContrastBranch"]


@dataclasses.dataclass
class _Session:
    """One ``generate()`` call."""

    pending: dict[str, Any] | None = None  # the branch's prefill inputs, built in observe_prefill
    cache: Any = None  # the branch's KV cache
    main_cache: Any = None  # the main branch's cache (decode steps are recognised by its identity)
    valid: torch.Tensor | None = None  # (B, Lc) slot holds a real token of the branch's prompt
    length: int = 0  # L, the main prompt's original length (generate's masks grow from it)
    next_pos: torch.Tensor | None = None  # position of the first generated token in the branch, per row
    steps: int = 0
    has_image: torch.Tensor | None = None  # (B,) rows with at least one image (the others are not contrasted)


class ContrastBranch:
    """Installed by :class:`vlmprune.methods.damro.DamroMethod` through the patch context ``ctx``."""

    def __init__(self, ctx: Any, config: DamroConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.model, self.lm, self.adapter = ctx.model, ctx.lm, ctx.adapter
        self.session: _Session | None = None
        self.probe: Any = None
        self.score = config.score
        self.layer: int | None = None

    # ---- install ----------------------------------------------------------------------------------------------
    def install(self) -> None:
        cfg, adapter, model = self.config, self.adapter, self.model
        provides = adapter.provides
        has_cls = "vit_cls_attention" in provides and callable(getattr(adapter, "cls_probe", None))
        score = cfg.score
        if score == "auto":
            score = "cls_merged" if has_cls else ("received" if "vit_attention" in provides else "norm")
        if score.startswith("cls_") and not has_cls:
            raise UnsupportedModelError(
                f"DAMRO score={score!r} reads the ViT's CLS token, which {model.config.model_type!r} does not have. "
                "Use score='auto', 'received' (attention received in the ViT) or 'norm'."
            )
        if score == "received" and "vit_attention" not in provides:
            raise UnsupportedModelError(
                f"DAMRO score='received' needs the ViT's attention, which the {model.config.model_type!r} adapter "
                "cannot provide. Use score='norm'."
            )
        self.score = score
        if score != "norm":
            depth = adapter.vit_depth(model)
            layer = cfg.layer if cfg.layer is not None else adapter.feature_layer(model)
            if not -depth <= layer < depth:
                raise ConfigError(f"DAMRO layer={layer} does not exist in a vision tower of {depth} blocks.")
            self.layer = layer % depth
            if score.startswith("cls_"):
                self.probe = adapter.cls_probe(model, self.layer, score)
            else:
                self.probe = adapter.attention_probe(model, [self.layer])
            self.probe.install(self.ctx)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.ctx.register(model.register_forward_hook(self._on_output, with_kwargs=True))
        self.ctx.shadow(model, "generate", self._make_generate(model.generate))

    def _make_generate(self, original: Any) -> Any:
        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if self.config.alpha == 0:
                return original(*args, **kwargs)
            gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
            if beams > 1:
                raise UnsupportedInputError(
                    f"DAMRO contrastive decoding supports greedy decoding and sampling, not beam search (num_beams="
                    f"{beams}): the contrastive branch's cache would not follow the beams. Use num_beams=1."
                )
            if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
                raise UnsupportedInputError(
                    "DAMRO does not support assisted / prompt-lookup decoding (the contrastive branch scores one "
                    "token per step). Drop assistant_model / prompt_lookup_num_tokens."
                )
            gc_has = hasattr(gc, "disable_compile") if gc is not None else False
            if gc_has and "disable_compile" not in kwargs and kwargs.get("generation_config") is None:
                # the branch runs inside the model's forward: keep generate() from compiling it (static caches)
                kwargs["disable_compile"] = True
            with self.contrasting():
                return original(*args, **kwargs)

        return generate

    @contextlib.contextmanager
    def contrasting(self) -> Iterator[None]:
        """Contrast the forwards inside the block as ``generate()`` does: the first one with images runs the
        branch's prefill, later ones whose cache is that prefill's run a branch decode step. ``generate()`` opens
        this itself; the harness uses it to time one contrasted prefill."""
        outer, self.session = self.session, _Session()
        try:
            yield
        finally:
            self.session = outer

    # ---- outlier scores ------------------------------------------------------------------------------------
    def begin_encode(self, kind: str) -> None:
        if self.probe is not None:
            self.probe.reset()

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.probe is None:  # "norm": the L2 norm of each token as the LLM receives it
            return [f.detach().float().norm(dim=-1) for f in features]
        return [s[self.layer] for s in self.probe.collect(len(features))]

    # ---- prefill ---------------------------------------------------------------------------------------------
    def observe_prefill(self, view: Any) -> None:
        s = self.session
        if s is None or self.config.alpha == 0:
            return
        emb, real = view.embeds, view.real
        B, L, _ = emb.shape
        dev = real.device
        if view.right_padded:
            raise UnsupportedInputError(
                "DAMRO contrasts the next-token logits of every row, which generate() reads from the last column: pad "
                "the batch on the left (processor.tokenizer.padding_side = 'left'), as generate() expects anyway."
            )
        if view.mrope and view.position_ids is None:
            raise PatchBypassedError("M-RoPE model called its language model without position_ids; cannot contrast.")
        keep = real.clone()
        for seg in view.segments:
            keep[seg.row, seg.positions] = False
        order_key = torch.arange(L, device=dev, dtype=torch.float64).expand(B, L).clone()
        outliers = []
        has_image = torch.zeros(B, dtype=torch.bool, device=dev)
        for seg in view.segments:
            has_image[seg.row] = True
            scores = seg.extras.get("damro") if isinstance(seg.extras, dict) else None
            if scores is None:
                raise UnsupportedInputError(
                    "DAMRO scores outlier tokens in the vision tower, so images must be encoded by the patched "
                    "model; pre-computed mm_encoder_outputs carry no scores. Pass pixel_values instead."
                )
            if seg.parts is not None:  # LLaVA-NeXT: the base view's outliers only, as the official code
                rows = seg.parts[0].rows.to(dev)
                lead = scores.numel() - seg.positions.numel()  # a leading CLS score, if any
                scores = scores.to(dev)[lead:][rows] if lead in (0, 1) else scores
                grid_pos = seg.positions.to(dev)[rows]
            else:
                grid_pos = seg.positions[seg.prefix :].to(dev)
            n = int(grid_pos.numel())
            if scores.numel() == n + seg.prefix and seg.parts is None:
                scores = scores[seg.prefix :]
            if scores.numel() != n:
                raise UnsupportedInputError(f"DAMRO got {scores.numel()} outlier scores for an image of {n} tokens.")
            sel = select_outliers(scores.to(dev), self.config.top_k, self.config.order)
            pos = grid_pos[sel]
            keep[seg.row, pos] = True
            # outliers take the image's place in the sequence, in the chosen order
            rank = torch.arange(sel.numel(), device=dev, dtype=torch.float64)
            order_key[seg.row, pos] = float(grid_pos[0]) + rank / (sel.numel() + 1)
            outliers.append({"row": seg.row, "kind": seg.kind, "indices": sel.tolist()})
        n = int(keep.sum(-1).max())
        key = torch.where(keep, order_key, torch.where(real, -2.0, -1.0).to(torch.float64))  # left padded
        idx = torch.sort(key, dim=-1, stable=True).indices[:, L - n :]
        valid = keep.gather(1, idx)
        if view.mrope:
            full = view.position_ids.to(dev)
            lead = full.shape[:-2]
            full = full.expand(*lead, B, L)
            pos_ids = full.gather(-1, idx.expand(*lead, B, n))
            next_pos = full.masked_fill(~real, -1).amax(-1) + 1
        else:  # a fresh, shorter sequence, numbered 0.. (the official code)
            pos_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
            next_pos = valid.long().sum(-1)
        extra = dict(view.extra)  # Qwen3-VL: the outliers keep their own DeepStack rows
        if extra:
            self.adapter.gather_extra(extra, idx, valid)
        s.pending = {
            "extra": extra,
            "embeds": emb.gather(1, idx[..., None].expand(-1, -1, emb.shape[-1])),
            "mask": valid.long(),
            "positions": pos_ids,
            "info": {"outliers": outliers, "branch_tokens": valid.sum(-1).tolist()},
        }
        s.valid, s.length, s.next_pos, s.steps, s.has_image = valid, L, next_pos, 0, has_image

    # ---- the branch's forward and the contrast -------------------------------------------------------------
    def _run_lm(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, **extra: Any
    ) -> Any:
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            **extra,
        }
        if cache is not None:
            kwargs[self.cache_kw] = cache
        self.ctx.passthrough = True
        try:
            with torch.no_grad():
                return self.lm(**kwargs)
        finally:
            self.ctx.passthrough = False

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)

    def _on_output(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        s = self.session
        if s is None or self.ctx.passthrough or getattr(output, "logits", None) is None:
            return None
        if s.pending is not None:
            p, s.pending = s.pending, None
            out = self._run_lm(p["embeds"], p["mask"], p["positions"], None, **p["extra"])
            h = out.last_hidden_state[:, -1]
            s.cache, s.main_cache = output_cache(out), output_cache(output)
            self.ctx.stats["damro"] = {
                "branch_kv_bytes": cache_bytes(s.cache),
                "score": self.score,
                "top_k": self.config.top_k,
                "alpha": self.config.alpha,
                "beta": self.config.beta,
                **p["info"],
            }
        elif s.cache is not None and s.main_cache is not None and cache_of(kwargs) is s.main_cache:
            ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
            q = int((emb if emb is not None else ids).shape[1])
            if q != 1:
                raise UnsupportedInputError(
                    f"DAMRO scores one new token per decode step; this step brought {q}. Use plain greedy or "
                    "sampling generate()."
                )
            if emb is None:
                emb = self.model.get_input_embeddings()(ids)
            am = kwargs.get("attention_mask")
            B = emb.shape[0]
            if isinstance(am, torch.Tensor) and am.ndim == 2 and am.shape[1] == s.length + s.steps + 1:
                tail = am[:, s.length :].to(s.valid.device, torch.long)
            else:
                tail = torch.ones(B, s.steps + 1, dtype=torch.long, device=s.valid.device)
            mask = torch.cat([s.valid.long(), tail], dim=1)
            pos = (s.next_pos + s.steps)[..., None]
            out = self._run_lm(emb, mask, pos, s.cache)
            h = out.last_hidden_state[:, -1]
            s.steps += 1
        else:
            return None  # no image in this generate() call (nothing to contrast), or an unrelated forward
        cd = self._logits(h)
        logits = output.logits
        mixed = contrast_logits(logits[:, -1], cd, self.config.alpha, self.config.beta)
        # a text-only row of a mixed batch has nothing to contrast: its logits stay as they are, as when alone
        mixed = torch.where(s.has_image.to(mixed.device)[:, None], mixed, logits[:, -1].float())
        if logits.shape[1] == 1:
            output.logits = mixed[:, None]
        else:
            logits = logits.clone()
            logits[:, -1] = mixed.to(logits.dtype)
            output.logits = logits
        return output
