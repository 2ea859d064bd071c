"""A small registry of lazily imported targets, used for methods and for model adapters.

Entries are registered as ``"module:attr"`` strings so that listing what is available imports nothing; the
target is imported the first time it is resolved.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Name -> lazily imported object, with collision checks and "did you mean" errors.

    Args:
        kind: what the entries are, used in messages (e.g. ``"method"``).
        error: the exception class raised for unknown names.
    """

    def __init__(self, kind: str, error: type[Exception] = KeyError) -> None:
        self.kind = kind
        self.error = error
        self._targets: dict[str, str | Any] = {}
        self._resolved: dict[str, T] = {}

    def register(self, name: str, target: str | T, *, replace: bool = False) -> None:
        """Register ``target`` (an object or a ``"module:attr"`` string) under ``name``.

        Raises:
            ValueError: ``name`` is already registered and ``replace`` is false.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._targets and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (to {self._targets[name]!r}); "
                "pass replace=True to override it"
            )
        self._targets[name] = target
        self._resolved.pop(name, None)

    def unregister(self, name: str) -> None:
        """Remove ``name``; unknown names raise like :meth:`get`."""
        self._check(name)
        del self._targets[name]
        self._resolved.pop(name, None)

    def names(self) -> list[str]:
        """Sorted registered names (imports nothing)."""
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def _check(self, name: str) -> None:
        if name in self._targets:
            return
        close = difflib.get_close_matches(str(name), self._targets, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise self.error(f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}.")

    def get(self, name: str) -> T:
        """Return the object registered under ``name``, importing it on first use."""
        self._check(name)
        if name not in self._resolved:
            target = self._targets[name]
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                obj: Any = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                target = obj
            self._resolved[name] = target
        return self._resolved[name]
