"""``damro``: DAMRO (Gong et al., arXiv 2410.04514), training-free outlier-token contrastive decoding.

A few vision tokens that the ViT's CLS token attends to most ("outliers", high-norm artifacts) also draw most of
the LLM's attention and carry little local content. DAMRO decodes by contrasting the model's next-token logits
given the whole image with the logits given *only those outlier tokens*::

    l      = logits(y_t | all vision tokens, text, y_<t)        # the main branch
    l_cd   = logits(y_t | the k outlier tokens only, text, y_<t) # the contrastive branch, its own KV cache
    keep   = l >= log(beta) + max(l)                             # adaptive plausibility (p >= beta * p_max)
    l_out  = (1 + alpha) * l - alpha * l_cd   on keep, -inf elsewhere (here: a finite floor far below, see below)

It is a decoding method, not a token-reduction one: the main branch keeps every token unless ``prune`` names a
pruning method, which then prunes the main branch exactly as that method alone would (DAMRO on top of fewer
tokens). The contrastive branch is short (the text plus ``top_k`` tokens per image) and costs one extra LLM pass
over it plus one extra decode step per generated token.

Faithfulness (see the project's ``shared/methods.md`` §4 for the official code):

* LLaVA (CLIP, with CLS): ``score="cls_merged"`` (default) reproduces the official score exactly: the CLS query
  and the patch keys of the feature layer (``vision_feature_layer``, -2) taken from ``q_proj`` / ``k_proj`` with
  all heads concatenated (one merged "head" over the full width ``C``), ``softmax(q k^T / sqrt(C))`` over all
  keys, CLS column dropped. ``"cls_heads"`` is the per-head softmax averaged over heads (the paper's wording and
  the official InstructBLIP code). Defaults: ``alpha=2, beta=0.1, top_k=10`` (the official ``run_*.py``).
* Outliers enter the contrastive branch in descending score order (``order="score"``, official; ``"raster"``
  keeps image order). With LLaVA's 1-D RoPE the branch is numbered contiguously, exactly as the official code
  builds a fresh, shorter sequence.
* Qwen2-VL / Qwen2.5-VL have **no CLS token**. Our documented rule (``score="received"``, the default there):
  outliers are the LLM tokens (2x2 merge units) that receive the most attention, averaged over heads and all
  queries, in the last ViT block. That is what a CLS row measures in CLIP: the global "sink" tokens every
  query attends to, which are the high-norm artifacts DAMRO describes. ``score="norm"`` (the L2 norm of each
  token as the LLM receives it) needs no attention at all and works on every family. Outliers keep their
  original M-RoPE positions (positions encode the grid; there is no grid for ``k`` scattered tokens).
* The official decoding loop **disables every logits processor** (temperature, top-p, repetition penalty are
  silently ignored; sampling at T=1). Here the contrast is applied to the raw logits and then ``generate()``'s
  own processors run as configured, so ``temperature`` / ``top_p`` / ``repetition_penalty`` / greedy work as
  users expect. To reproduce the paper's sampler call ``generate(do_sample=True, temperature=1.0, top_p=1.0,
  top_k=0)``.
* ``alpha=0`` switches DAMRO off entirely (no plausibility cut, no second branch): outputs equal the underlying
  (or pruned) model's exactly, greedy or sampled.
* Implausible tokens get a finite floor far below every plausible one instead of ``-inf`` (identical for any
  sampler or argmax), so a later processor that bans every plausible token falls back to the main branch's ranking
  rather than producing an all ``-inf`` row (see :func:`contrast_logits`).
* Contrast applies to ``generate()`` (greedy and sampling, left-padded batches, ``num_return_sequences``, static
  caches); rows without an image in a mixed batch are not contrasted (as when run alone). A plain
  ``model(**inputs)`` call returns the underlying (or pruned) model's logits. Beam search, assisted decoding and
  right-padded batches are refused with a clear error (the second cache would not follow beam reordering / crops;
  generate() reads every row's next token from the last column).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

from .._ops import top_indices
from ..config import PruneConfig
from ..errors import ConfigError
from .base import ImageTokens, Method, Selection

__all__ = ["DamroConfig", "cls_attention_scores", "select_outliers", "contrast_logits", "SCORES"]

SCORES = ("auto", "cls_merged", "cls_heads", "received", "norm")
_ORDERS = ("score", "raster")


def cls_attention_scores(
    q_cls: torch.Tensor, k: torch.Tensor, num_heads: int, mode: str = "cls_merged"
) -> torch.Tensor:
    """CLS-to-patch attention of one ViT layer, from that layer's own query / key projections.

    Args:
        q_cls: ``(..., C)`` the CLS token's ``q_proj`` output (all heads concatenated, not yet scaled).
        k: ``(..., N + 1, C)`` every token's ``k_proj`` output, CLS first.
        num_heads: the layer's head count (``C`` must be divisible by it).
        mode: ``"cls_merged"`` = ``softmax(q k^T / sqrt(C))`` with all heads merged into one (the official DAMRO
            LLaVA score); ``"cls_heads"`` = per-head ``softmax(q_h k_h^T / sqrt(C / H))`` averaged over heads.

    Returns:
        ``(..., N)`` float32 attention of CLS to each patch (CLS's own column dropped after the softmax).
    """
    q, kk = q_cls.float(), k.float()
    C = q.shape[-1]
    if mode == "cls_merged":
        logits = (kk @ q[..., None])[..., 0] / math.sqrt(C)  # (..., N + 1)
        return torch.softmax(logits, dim=-1)[..., 1:]
    if mode == "cls_heads":
        d = C // num_heads
        qh = q.reshape(*q.shape[:-1], num_heads, 1, d)  # (..., H, 1, d)
        kh = kk.reshape(*kk.shape[:-1], num_heads, d).transpose(-2, -3)  # (..., H, N + 1, d)
        probs = torch.softmax((qh @ kh.transpose(-1, -2))[..., 0, :] / math.sqrt(d), dim=-1)  # (..., H, N + 1)
        return probs.mean(dim=-2)[..., 1:]
    raise ValueError(f"mode={mode!r}: 'cls_merged' or 'cls_heads'")


def select_outliers(scores: torch.Tensor, k: int, order: str = "score") -> torch.Tensor:
    """The ``k`` highest-scoring tokens of one image.

    Args:
        scores: ``(N,)`` outlier scores.
        k: how many (capped at ``N``).
        order: ``"score"`` = best first (the official order); ``"raster"`` = ascending token index.

    Returns:
        ``(min(k, N),)`` int64 indices; ties go to the lower index (a stable sort).
    """
    idx = top_indices(scores, min(k, int(scores.shape[-1])))
    return idx.sort().values if order == "raster" else idx


#: how far below the lowest plausible contrastive logit the implausible tokens are put (see contrast_logits)
FLOOR_MARGIN = 1e4


def contrast_logits(logits: torch.Tensor, logits_cd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """DAMRO / VCD contrastive logits with the adaptive plausibility constraint.

    Args:
        logits: ``(..., V)`` next-token logits of the main branch (all vision tokens).
        logits_cd: ``(..., V)`` next-token logits of the contrastive branch (outlier tokens only).
        alpha: contrast weight ``>= 0``.
        beta: plausibility cut-off in ``[0, 1]``: tokens with ``p < beta * max p`` under the main branch get
            ``-inf`` (``beta=0`` keeps all).

    Returns:
        ``(..., V)`` float32 ``(1 + alpha) * logits - alpha * logits_cd`` on the plausible set (which always holds the
        main branch's most likely token). The paper sets the other tokens to ``-inf``; here they get a finite
        floor, ``FLOOR_MARGIN`` (1e4) below the lowest plausible value and ordered by the main branch's logits:
        no softmax or argmax can tell the difference (``exp(-1e4)`` is 0 in float32), but when a later logits
        processor bans every plausible token (``suppress_tokens``, ``no_repeat_ngram_size``, ``min_new_tokens``
        blocking EOS) decoding falls back to the main branch's ranking instead of an all ``-inf`` row (greedy would
        emit token 0, sampling would crash).
    """
    main, cd = logits.float(), logits_cd.float()
    out = (1.0 + alpha) * main - alpha * cd
    if beta > 0:
        top = main.amax(dim=-1, keepdim=True)
        implausible = main < math.log(beta) + top
        lowest = out.masked_fill(implausible, float("inf")).amin(dim=-1, keepdim=True)
        out = torch.where(implausible, lowest - FLOOR_MARGIN + (main - top), out)
    return out


@dataclasses.dataclass
class DamroConfig(PruneConfig):
    """DAMRO settings (defaults = the official code's ``run_*.py``: alpha 2, beta 0.1, 10 outliers per image).

    Attributes:
        keep: budget of the *main* branch's pruning (see ``prune``). Default: every token without ``prune`` (as the
            paper), the pruning method's own default with it (e.g. FastV's 0.5).
        top_k: outlier tokens per image fed to the contrastive branch (official 10 of LLaVA's 576; 4 for
            InstructBLIP's 256).
        alpha: contrast weight (``0`` turns DAMRO off and gives the underlying model's outputs exactly).
        beta: adaptive plausibility cut-off in ``[0, 1]``.
        score: outlier criterion: ``"auto"`` (``cls_merged`` on towers with a CLS token, ``received`` on
            Qwen-VL), ``"cls_merged"``, ``"cls_heads"``, ``"received"`` or ``"norm"`` (module docstring).
        layer: Python index of the ViT block scored; ``None`` = the feature layer (LLaVA ``-2``, Qwen last block).
        order: ``"score"`` (official) or ``"raster"``: order of the outliers in the contrastive branch.
        prune: a pruning method applied to the main branch: a name (built with this config's ``keep``, ``seed``
            and ``position_mode``) or a config object (which then carries its own ``keep``). ``None`` = no pruning.
    """

    name = "damro"

    keep: float | int | None = None
    top_k: int = 10
    alpha: float = 2.0
    beta: float = 0.1
    score: str = "auto"
    layer: int | None = None
    order: str = "score"
    prune: str | PruneConfig | None = None

    def validate(self) -> None:
        if not (self.prune is None or isinstance(self.prune, (str, dict, PruneConfig))):
            raise ConfigError(
                f"prune={self.prune!r} is not valid: a pruning method's name (e.g. 'hiprune'), its config object "
                "(e.g. vlmprune.HiPruneConfig(keep=0.11)), or None."
            )
        if isinstance(self.prune, dict):  # from_dict / JSON round trip
            from ..api import make_config

            d = dict(self.prune)
            self.prune = make_config(d.pop("method", None), **d)
        if isinstance(self.prune, PruneConfig):
            if isinstance(self.prune, DamroConfig):
                raise ConfigError("prune= cannot be another DAMRO config; name a pruning method (e.g. 'hiprune').")
            self.prune.validate()
            if self.keep is not None and self.keep != self.prune.keep:
                raise ConfigError(
                    f"keep={self.keep!r} conflicts with the prune config's keep={self.prune.keep!r}: with a config "
                    "object in prune=, set keep on that object."
                )
            if self.position_mode not in ("auto", self.prune.position_mode):
                raise ConfigError(
                    f"position_mode={self.position_mode!r} conflicts with the prune config's "
                    f"{self.prune.position_mode!r}: with a config object in prune=, set it on that object."
                )
            self.keep = self.prune.keep
        elif self.keep is None:  # every token without pruning; the pruning method's own default with it
            if isinstance(self.prune, str):
                from ..methods import METHODS

                if self.prune == "damro":
                    raise ConfigError("prune='damro' is not valid: name a pruning method (e.g. 'hiprune').")
                self.keep = METHODS.get(self.prune)().keep
            else:
                self.keep = 1.0
        super().validate()
        pc = self.prune_config()
        if pc is not None and pc.name == "fastvlm" and getattr(pc, "strategy", "pool") != "pool":
            raise ConfigError(
                f"prune=fastvlm with strategy={pc.strategy!r} shrinks the vision tower's own grid, but DAMRO reads "
                "its outliers from the full tower (CLS attention / received attention / norms per patch): use "
                "prune=vlmprune.FastVLMConfig(strategy='pool', ...) or another pruning method."
            )
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ConfigError(f"top_k={k!r} is not valid: an int >= 1 (outlier tokens per image; official 10).")
        self.top_k = int(k)
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ConfigError(f"{name}={v!r} is not valid: a number.")
            setattr(self, name, float(v))
        if self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha} is not valid: >= 0 (0 turns DAMRO off; official 2.0).")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} is not valid: in [0, 1] (official 0.1).")
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r} is not valid: choose one of {SCORES}.")
        if self.order not in _ORDERS:
            raise ConfigError(f"order={self.order!r} is not valid: choose one of {_ORDERS}.")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer={self.layer!r} is not valid: a Python index of a ViT block, or None.")
        if self.prune is None and (isinstance(self.keep, int) or self.keep != 1.0):  # (an int 1 is ONE token)
            raise ConfigError(
                f"keep={self.keep!r} needs a pruning method for the main branch: DAMRO itself keeps every token. "
                "Pass prune='uniform' (or 'hiprune', 'visionzip', ...) together with keep."
            )
        if isinstance(self.prune, str):
            from ..methods import METHODS

            if self.prune == "damro":
                raise ConfigError("prune='damro' is not valid: name a pruning method (e.g. 'hiprune').")
            METHODS.get(self.prune)  # unknown names raise with "did you mean"

    def prune_config(self) -> PruneConfig | None:
        """The main branch's pruning config (``None`` when DAMRO runs on the whole image)."""
        if self.prune is None:
            return None
        if isinstance(self.prune, PruneConfig):
            return self.prune
        from ..methods import METHODS

        return METHODS.get(self.prune).from_kwargs(keep=self.keep, seed=self.seed, position_mode=self.position_mode)

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.name}
        for f in dataclasses.fields(self):
            d[f.name] = getattr(self, f.name)
        if isinstance(self.prune, PruneConfig):
            d["prune"] = self.prune.to_dict()
        return d

    def build(self) -> Method:
        return DamroMethod(self)


class DamroMethod(Method):
    """Delegates token selection to the main branch's pruning method (if any) and adds the contrastive branch.

    Outlier scores arrive per image as ``item.extras["damro"]``; the branch itself lives in the patch core
    (``vlmprune.patches._contrast``), which runs the language model on the text plus the outliers.
    """

    def __init__(self, config: DamroConfig) -> None:
        super().__init__(config)
        pc = config.prune_config()
        self.inner: Method | None = pc.build() if pc is not None else None
        self.prune_config: PruneConfig = pc if pc is not None else config
        if self.inner is not None:
            self.requires = self.inner.requires
            self.prunes_at_entry = self.inner.prunes_at_entry
            self.exact_budget = self.inner.exact_budget
            self.select_whole_parts = self.inner.select_whole_parts
        self.branch: Any = None

    def attach(self, ctx: Any) -> None:
        if self.inner is not None:
            self.inner.attach(ctx)
        from ..patches._contrast import ContrastBranch

        self.branch = ContrastBranch(ctx, self.config)
        self.branch.install()

    def detach(self) -> None:
        if self.inner is not None:
            self.inner.detach()
        self.branch = None

    def begin_encode(self, kind: str) -> None:
        if self.inner is not None:
            self.inner.begin_encode(kind)
        if self.branch is not None:
            self.branch.begin_encode(kind)

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        inner = self.inner.end_encode(kind, features) if self.inner is not None else None
        own = self.branch.end_encode(kind, features) if self.branch is not None else None
        if own is None:
            return inner
        inner = inner if inner is not None else [{} for _ in features]
        return [dict(a, damro=b) for a, b in zip(inner, own, strict=True)]

    def observe_prefill(self, view: Any) -> None:
        if self.branch is not None:
            self.branch.observe_prefill(view)

    def plan_prefill(self, plan: list[tuple[Any, int]], real: torch.Tensor, stats: list[dict[str, Any]]) -> None:
        self.inner.plan_prefill(plan, real, stats)

    def select(self, item: ImageTokens) -> Selection:
        if self.inner is None:  # unreachable: the core never asks when every token is kept
            raise RuntimeError("DAMRO without prune= keeps every token")
        return self.inner.select(item)
