"""``visionzip``: VisionZip (Yang et al., arXiv 2412.04467), training-free: dominant + contextual tokens.

**Dominant** tokens are the patches the CLS token attends to most in the feature layer (LLaVA: CLIP layer -2,
CLS-row attention summed over heads); the remaining tokens are **merged** into a few **contextual** tokens: a
uniform stride over the remaining tokens (in raster order) picks the targets, every other remaining token joins
the target whose head-mean key is most cosine-similar, and each contextual token is ``target + mean(members)``
(the official code adds; ``contextual="mean"`` averages target and members instead).

Faithfulness (see the project's ``shared/methods.md`` §2):

* LLaVA: the official code feeds the **CLS token** to the LLM and counts it in the dominant budget
  (``dominant=54`` -> 53 patches + CLS; 54 + 10 contextual = 64). ``feed_cls=True`` (default) reproduces it:
  the LLM sees ``[CLS, dominant patches in raster order, contextual tokens in target order]``; CLS and the
  contextual tokens are merged in the vision tower's hidden space and then passed through LLaVA's projector,
  exactly as the official code does before its projector. The K tokens occupy K placeholder slots in that
  order, so with LLaVA's default ``position_mode="contiguous"`` they get consecutive positions, as upstream.
* the dominant / contextual split is the paper's 54:10 (= 108:20 = 162:30) for every budget: ``dominant_ratio``.
* Qwen-VL has **no CLS** (the official repo has no Qwen code; community ports read row 0 as if it were CLS). Our
  documented rule: dominant tokens by the attention they *receive* (mean over heads and all queries) in the
  last ViT block, per LLM token (2x2 merge units averaged); keys averaged over heads and merge units; merging
  on the merged LLM-space tokens; every token keeps the M-RoPE position of the token it stands on (dominant:
  its own; contextual: its target's).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from .._ops import top_indices
from ..config import PruneConfig
from ..errors import ConfigError, UnsupportedInputError
from .base import ImageTokens, Method, Selection

__all__ = ["VisionZipConfig", "visionzip_split", "contextual_groups", "merge_contextual"]


def visionzip_split(k: int, dominant_ratio: float, cls_counts: bool) -> tuple[int, int]:
    """``(dominant patches, contextual tokens)`` for a budget of ``k`` LLM tokens.

    The paper's split is ``round(k * dominant_ratio)`` dominant tokens (54 of 64); when the CLS token is fed to
    the LLM it is one of them (the official ``dominant - 1``).
    """
    n_dom = min(k, max(1, round(k * dominant_ratio)))
    n_ctx = k - n_dom
    return (n_dom - 1 if cls_counts else n_dom), n_ctx


def contextual_groups(
    keys: torch.Tensor, remaining: torch.Tensor, n_contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets and member assignment among the non-dominant tokens (official VisionZip rule).

    Args:
        keys: ``(N, d)`` head-mean keys of all tokens.
        remaining: ``(R,)`` int64 ascending indices of the non-dominant tokens.
        n_contextual: number of targets ``C`` (``1 <= C <= R``).

    Returns:
        ``targets`` ``(C,)`` indices (a uniform stride over ``remaining``: every ``max(1, R // C)``-th),
        ``members`` ``(R - C,)`` the other remaining indices, ``assign`` ``(R - C,)`` the target slot
        (0..C-1) of each member: the most cosine-similar target key (first one on ties, as ``argmax``).
    """
    r = remaining.numel()
    step = max(1, r // n_contextual)
    slots = torch.arange(0, r, step, device=remaining.device)[:n_contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=remaining.device)
    is_target[slots] = True
    targets, members = remaining[is_target], remaining[~is_target]
    m = F.normalize(keys.float(), dim=-1)
    sim = m[members] @ m[targets].T
    return targets, members, sim.argmax(-1)


def merge_contextual(
    hidden: torch.Tensor, targets: torch.Tensor, members: torch.Tensor, assign: torch.Tensor, mode: str = "add"
) -> torch.Tensor:
    """Contextual tokens from targets and their members.

    Args:
        hidden: ``(N, D)`` token values to merge.
        targets, members, assign: from :func:`contextual_groups`.
        mode: ``"add"`` = ``target + mean(members)`` (official; ``+ 0`` for a target with no member),
            ``"mean"`` = mean of the target and its members.

    Returns:
        ``(C, D)`` in ``hidden.dtype`` (accumulated in float32).
    """
    c = targets.numel()
    acc = hidden.float()
    sums = acc.new_zeros(c, acc.shape[-1]).index_add_(0, assign, acc[members])
    counts = torch.bincount(assign, minlength=c).to(acc.dtype)
    if mode == "add":
        out = acc[targets] + sums / counts.clamp(min=1)[:, None]
    else:
        out = (acc[targets] + sums) / (counts + 1)[:, None]
    return out.to(hidden.dtype)


@dataclasses.dataclass
class VisionZipConfig(PruneConfig):
    """VisionZip settings (defaults = the official code's LLaVA-1.5 setting).

    Attributes:
        dominant_ratio: share of the budget given to dominant tokens (official 54/64 = 0.84375).
        feed_cls: LLaVA only: feed the CLS token to the LLM as one of the dominant tokens (official).
        contextual: ``"add"`` (official ``target + mean(members)``) or ``"mean"``.
        layer: Python index of the ViT block read; ``None`` = the feature layer (LLaVA -2, Qwen last block).
    """

    name = "visionzip"

    dominant_ratio: float = 54 / 64
    feed_cls: bool = True
    contextual: str = "add"
    layer: int | None = None

    def validate(self) -> None:
        super().validate()
        r = self.dominant_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r <= 1:
            raise ConfigError(f"dominant_ratio={r!r} is not valid: a number in (0, 1] (official 54/64).")
        self.dominant_ratio = float(r)
        if not isinstance(self.feed_cls, bool):
            raise ConfigError(f"feed_cls={self.feed_cls!r} is not valid: True or False.")
        if self.contextual not in ("add", "mean"):
            raise ConfigError(f"contextual={self.contextual!r} is not valid: 'add' (official) or 'mean'.")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer={self.layer!r} is not valid: a Python index of a ViT block.")

    def build(self) -> Method:
        return VisionZipMethod(self)


class VisionZipMethod(Method):
    requires = frozenset({"vit_attention"})

    def attach(self, ctx: Any) -> None:
        adapter, model = ctx.adapter, ctx.model
        depth = adapter.vit_depth(model)
        layer = self.config.layer if self.config.layer is not None else adapter.feature_layer(model)
        if not -depth <= layer < depth:
            raise ConfigError(f"VisionZip layer={layer} does not exist in a vision tower of {depth} blocks.")
        self.layer = layer % depth
        self.capture = adapter.layer_capture(model, self.layer)
        self.capture.install(ctx)
        self.has_cls = "vit_cls_attention" in adapter.provides
        self.project = (lambda h: adapter.project(model, h)) if self.has_cls else None

    def detach(self) -> None:
        self.capture = None
        self.project = None

    def begin_encode(self, kind: str) -> None:
        self.capture.reset()

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [s[self.layer] for s in self.capture.collect(len(features))]

    def select(self, item: ImageTokens) -> Selection:
        cfg, ex = self.config, item.extras
        if "keys" not in ex:
            raise UnsupportedInputError(
                "VisionZip reads the vision tower's attention, so the images must be encoded by the patched model; "
                "pre-computed mm_encoder_outputs carry none. Pass pixel_values instead."
            )
        n, k, dev = item.num_tokens, item.budget, item.features.device
        use_cls = self.has_cls and cfg.feed_cls
        score = ex["cls_attention"] if self.has_cls else ex["received"]
        n_dom, n_ctx = visionzip_split(k, cfg.dominant_ratio, use_cls)
        dominant = top_indices(score.to(dev), n_dom).sort().values
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[dominant] = False
        remaining = rest.nonzero().squeeze(-1)
        n_ctx = min(n_ctx, remaining.numel())
        if n_ctx:
            targets, members, assign = contextual_groups(ex["keys"].to(dev), remaining, n_ctx)
        else:
            targets = members = assign = remaining[:0]
        info = {"dominant": dominant.tolist(), "contextual_targets": targets.tolist()}
        if self.has_cls:  # merge in the tower's hidden space, then LLaVA's projector (as upstream)
            hidden = ex["hidden"].to(dev)  # (N + 1, D_vision), CLS first
            parts = [item.features[dominant]]
            if n_ctx:
                ctx_hidden = merge_contextual(hidden[1:], targets, members, assign, self._mode())
                parts.append(self.project(ctx_hidden).to(item.features.dtype))
            if use_cls:
                parts.insert(0, self.project(hidden[:1]).to(item.features.dtype))
            tokens = torch.cat(parts)
            # K slots, filled in upstream order [CLS, dominant (raster), contextual (target order)]
            slots = torch.cat([dominant, targets])
            if use_cls:
                free = torch.ones(n, dtype=torch.bool, device=dev)
                free[slots] = False
                slots = torch.cat([slots, free.nonzero()[:1, 0]])
            return Selection(slots.sort().values, tokens, info)
        # Qwen-VL (no CLS): merge in LLM space; every token stays on the slot (M-RoPE position) it stands for
        indices = torch.cat([dominant, targets])
        tokens = item.features[indices]
        if n_ctx:
            tokens[n_dom:] = merge_contextual(item.features, targets, members, assign, self._mode())
        order = torch.argsort(indices)
        return Selection(indices[order], tokens[order], info)

    def _mode(self) -> str:
        return "add" if self.config.contextual == "add" else "mean"
