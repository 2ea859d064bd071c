"""Exceptions raised by vlmprune.

Every error names the offending value, what would have been valid, and what to do about it. All of them derive
from :class:`VlmpruneError`; those caused by a bad argument are also ``ValueError`` / ``TypeError`` so that
generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "VlmpruneError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "ConfigError",
    "AlreadyPatchedError",
    "NotPatchedError",
    "PlaceholderMismatchError",
    "LabelsWhilePruningError",
    "PatchBypassedError",
    "UnsupportedInputError",
]


class VlmpruneError(Exception):
    """Base class of every exception raised by vlmprune."""


class UnknownMethodError(VlmpruneError, ValueError):
    """``method=`` names no registered method."""


class UnsupportedModelError(VlmpruneError, ValueError):
    """The model's ``config.model_type`` (or its structure) is not one vlmprune can patch."""


class UnsupportedVersionError(VlmpruneError, RuntimeError):
    """The installed transformers release is outside the range vlmprune supports."""


class ConfigError(VlmpruneError, ValueError):
    """A method configuration value is invalid (wrong type, out of range, unknown field)."""


class AlreadyPatchedError(VlmpruneError, RuntimeError):
    """``patch()`` was called on a model that is already patched and ``replace=True`` was not given."""


class NotPatchedError(VlmpruneError, RuntimeError):
    """An operation that needs a patched model got an unpatched one."""


class PlaceholderMismatchError(VlmpruneError, ValueError):
    """The number of image placeholder tokens in the prompt does not match the images passed."""


class LabelsWhilePruningError(VlmpruneError, ValueError):
    """``labels`` were passed to a pruned model: its outputs are in pruned coordinates and would be misaligned."""


class PatchBypassedError(VlmpruneError, RuntimeError):
    """Images reached a patched model but its pruning path did not run (a silent no-op is never allowed)."""


class UnsupportedInputError(VlmpruneError, ValueError):
    """A call pattern the patch cannot handle (chunked prefill, new images after a filled cache, ...)."""
