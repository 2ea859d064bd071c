"""Configuration dataclasses: the base :class:`PruneConfig` every method's config extends."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import warnings
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["PruneConfig", "resolve_budget"]

_POSITION_MODES = ("auto", "contiguous", "original")
_warned_keep_one = False


def _user_stacklevel() -> int:
    """Stack level of the first frame outside vlmprune (and outside generated dataclass code)."""
    import os
    import sys

    pkg = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (os.path.abspath(name).startswith(pkg) or name.startswith("<")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _check_keep(keep: Any) -> float | int:
    global _warned_keep_one
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ConfigError(
            f"keep={keep!r} ({type(keep).__name__}) is not valid: pass a float fraction in (0, 1] (e.g. keep=0.25) "
            "or an int count of tokens per image >= 1 (e.g. keep=64)."
        )
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if keep < 1:
            raise ConfigError(f"keep={keep} is not valid: an int keep is a token count per image and must be >= 1.")
        if keep == 1 and not _warned_keep_one:
            _warned_keep_one = True
            warnings.warn(
                "keep=1 (an int) keeps ONE token per image; write keep=1.0 to keep all tokens.",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
        return keep
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ConfigError(
            f"keep={keep!r} is not valid: a float keep is the fraction of each image's vision tokens that reach the "
            "LLM and must lie in (0, 1]; use an int for a token count (e.g. keep=64)."
        )
    return keep


def resolve_budget(keep: float | int, n_tokens: int) -> int:
    """Number of tokens of one image (``n_tokens`` of them) that ``keep`` lets through.

    A float is a fraction, rounded up (0.11 of 576 -> 64, the papers' count); an int is a count, capped at
    ``n_tokens``. Always at least 1 when ``n_tokens >= 1``.
    """
    if n_tokens <= 0:
        return 0
    if isinstance(keep, float):
        k = math.ceil(keep * n_tokens - 1e-9)
    else:
        k = keep
    return max(1, min(int(k), n_tokens))


@dataclasses.dataclass
class PruneConfig:
    """Settings every method shares.

    Attributes:
        keep: float in (0, 1] = fraction of each image's vision tokens that reach the LLM; int >= 1 = count per
            image. ``keep=1.0`` leaves the model's outputs bit-identical to the unpatched model.
        seed: seed for any randomness in the method (randomness is also keyed by image content, never by the
            batch row, so a batch gives the same choices as single samples).
        position_mode: how kept tokens are positioned for 1-D RoPE LLMs (LLaVA). ``"contiguous"`` renumbers
            them 0..L'-1 (the same as feeding the unpatched model only the kept tokens); ``"original"`` keeps
            their original positions (gaps where tokens were dropped). ``"auto"`` = contiguous for 1-D RoPE,
            original for M-RoPE (Qwen), where original positions are the only correct choice.
    """

    name: ClassVar[str] = ""

    keep: float | int = 0.25
    seed: int = 0
    position_mode: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise :class:`~vlmprune.errors.ConfigError` naming the bad value."""
        self.keep = _check_keep(self.keep)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ConfigError(f"seed={self.seed!r} is not valid: pass an int.")
        self.seed = int(self.seed)
        if self.position_mode not in _POSITION_MODES:
            raise ConfigError(f"position_mode={self.position_mode!r} is not valid: choose one of {_POSITION_MODES}.")

    def budget(self, n_tokens: int) -> int:
        """Tokens kept of an image with ``n_tokens`` vision tokens (see :func:`resolve_budget`)."""
        return resolve_budget(self.keep, n_tokens)

    def build(self) -> Any:
        """Return the method object (see :mod:`vlmprune.methods.base`) that this config describes."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description, including the method name (inverse of :meth:`from_dict`)."""
        d = {"method": self.name}
        d.update(dataclasses.asdict(self))
        return d

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> PruneConfig:
        """Build from keyword arguments, rejecting unknown ones with a "did you mean"."""
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k, fields, n=1, cutoff=0.6)
                parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"Unknown option(s) for method {cls.name!r}: {', '.join(parts)}. Valid options: {', '.join(fields)}."
            )
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        """Inverse of :meth:`to_dict` (the ``method`` key, if present, must match)."""
        d = dict(d)
        name = d.pop("method", cls.name)
        if name != cls.name:
            raise ConfigError(f"from_dict got method={name!r} for {cls.__name__} (method {cls.name!r}).")
        return cls.from_kwargs(**d)
