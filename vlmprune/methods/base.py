"""The interface between adapters (where to cut) and methods (what to keep).

An adapter hands a method one :class:`ImageTokens` per image (or video) in the batch and receives a
:class:`Selection`. The selection itself is a pure function of tensors: the tokens, the token grid, the budget
and the extra signals the method declared in :attr:`Method.requires`.

Three kinds of method fit this interface:

* **selection / merging after the projector** (baselines, VQToken-style clustering): implement :meth:`select`;
  merging methods return new tokens plus the representative whose original position each one takes.
* **methods that need a signal from the vision tower or the LLM** (one ViT layer's attention for HiPrune /
  VisionZip, an LLM layer's attention for FastV): :meth:`attach` receives a :class:`PatchContext` through which
  the method registers its own hooks on exactly the one or two modules it needs (removed with the patch). Vision
  signals are captured per encoding: the patch calls :meth:`begin_encode` before and :meth:`end_encode` after
  every ``get_image_features`` / ``get_video_features`` call (inside ``forward``, or the pre-encoding that
  ``generate()`` does in transformers 5.2x), and what ``end_encode`` returns per item arrives in
  ``item.extras`` at selection time (also after beam expansion).
* **methods that change decoding** (DAMRO's contrastive branch): :meth:`attach` can also shadow instance methods
  (e.g. add a logits processor around ``generate``) through the context, and are undone by ``unpatch``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import PruneConfig

__all__ = ["ImageTokens", "Selection", "Method", "PatchContext"]


@dataclasses.dataclass
class ImageTokens:
    """The vision tokens of one image (or one video) of one sample, as they are about to enter the LLM.

    Attributes:
        features: ``(N, D)`` the projected features, exactly the rows of ``inputs_embeds`` the LLM would get.
        grid: ``(t, h, w)`` token grid with ``t * h * w == N`` in raster order (t = 1 for images). For LLaVA
            ``(1, 24, 24)``; for Qwen-VL the grid after the 2x2 patch merger.
        budget: number of tokens to keep, ``1 <= budget < N`` (the core never calls a method when all are kept,
            except on a part of an item for a method with ``select_whole_parts``, where ``budget == N`` can occur).
        key: an integer derived from the image's pixels (not from its batch row); seed randomness with it so a
            batch gives the same choices as single samples and beams agree.
        kind: ``"image"`` or ``"video"``.
        index: the item's position among this call's items of its ``kind``, in the model's encoding order
            (the order in which vision-tower hooks saw them).
        row: the batch row it sits in (for information only: never let it change the selection).
        extras: signals the method declared in :attr:`Method.requires` (documented by the method).
    """

    features: torch.Tensor
    grid: tuple[int, int, int]
    budget: int
    key: int = 0
    kind: str = "image"
    index: int = 0
    row: int = 0
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass
class Selection:
    """What a method returns for one image.

    Attributes:
        indices: ``(K,)`` int64, strictly increasing indices into the image's ``N`` tokens. For pruning methods
            the kept tokens; for merging methods the *representative* of each new token, whose original position
            (1-D or M-RoPE) the new token takes.
        tokens: ``(K, D)`` replacement values for merging methods (``tokens[i]`` is placed at
            ``indices[i]``), or ``None`` to keep the original rows.
        info: anything worth showing in :func:`vlmprune.last_stats` (small, JSON-friendly).
        grid: ``(t, h', w')`` when the kept tokens *are* a smaller image's token grid (in raster order), as
            ``fastvlm``'s resolution strategy makes them: M-RoPE models then give them that grid's positions and
            move the text after the image accordingly, as the processor would have for the smaller image, instead
            of the original positions of ``indices``. ``None`` (the default): original positions.
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: tuple[int, int, int] | None = None


class PatchContext(Protocol):
    """What a method may touch when it is attached to a patched model (see :meth:`Method.attach`)."""

    model: nn.Module
    adapter: Any
    lm: nn.Module  # the language model (``model.model.language_model``)

    def register(self, handle: Any) -> None:
        """Keep a hook handle (anything with ``.remove()``); it is removed when the model is unpatched."""

    def shadow(self, obj: Any, name: str, fn: Any) -> None:
        """Set ``obj.name = fn`` on the instance; deleted again when the model is unpatched."""

    #: True while a method runs the language model for itself (DAMRO's second branch); every hook a method
    #: registers on the language model must then do nothing.
    passthrough: bool


class Method:
    """Base class of method objects (built from a config by ``config.build()``).

    Subclasses implement :meth:`select`. ``requires`` names extra signals the model's adapter must be able to
    provide (none for the baselines); ``patch()`` refuses, with the reason, an adapter that cannot.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    #: False for methods that prune inside the LLM (FastV): the patch then leaves the LLM input whole and calls
    #: :meth:`plan_prefill` with each image's positions and budget instead of :meth:`select`.
    prunes_at_entry: ClassVar[bool] = True

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        #: False when the method may return fewer tokens than the budget (an adaptive codebook size)
        self.exact_budget = True
        #: True when a part of an item (LLaVA-NeXT's base view / crops) must be selected even when its share of
        #: the budget covers all its tokens (fastvlm's encoder strategies: the part's tokens repeat reduced cells)
        self.select_whole_parts = False

    def plan_prefill(self, plan: list[tuple[Any, int]], real: torch.Tensor, stats: list[dict[str, Any]]) -> None:
        """In-LLM methods only: ``plan`` = ``(segment, budget)`` per image (``segment.row``; ``segment.prunable``
        the positions it may drop, in sequence coordinates; its other positions are always kept), ``real`` the
        ``(B, L)`` non-pad mask, ``stats`` the per-image dicts of :func:`vlmprune.last_stats` to complete."""
        raise NotImplementedError

    def observe_prefill(self, view: Any) -> None:
        """Called in every prefill with images, before any pruning, with the whole LLM input (a
        ``vlmprune.patches._base.PrefillView``: embeddings, non-pad mask, image segments with their extras,
        positions). Decoding methods (DAMRO) build their second branch from it; default: nothing."""

    def attach(self, ctx: PatchContext) -> None:
        """Called once when the model is patched; register any extra hooks through ``ctx`` (default: none)."""

    def detach(self) -> None:
        """Called when the model is unpatched, after the context's hooks were removed; drop captured state."""

    def begin_encode(self, kind: str) -> None:
        """Called right before the model encodes a batch of images (``kind="image"``) or videos."""

    def end_encode(self, kind: str, features: list[torch.Tensor]) -> list[dict[str, Any]] | None:
        """Called right after; return one dict of extras per encoded item (``features[i]`` is ``(n_i, D)``),
        delivered as ``ImageTokens.extras``; ``None`` for nothing."""
        return None

    @property
    def name(self) -> str:
        return self.config.name

    def select(self, item: ImageTokens) -> Selection:
        """Choose ``item.budget`` tokens of ``item``; see :class:`Selection`."""
        raise NotImplementedError
