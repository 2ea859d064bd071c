"""The transformers range vlmprune supports, declared once.

The install requirement comes from ``requirements.txt`` beside this file (pyproject reads the same file), and
:func:`check_transformers` enforces it at ``patch()`` time with a remedy. ``TESTED`` lists the releases CI
runs, read from ``tested_versions.txt`` (which ``scripts/test.sh`` reads too); a release inside the range but
newer than the newest tested one gets a warning, not an error.
"""

from __future__ import annotations

import functools
import importlib.resources
import warnings

from packaging.requirements import Requirement
from packaging.version import Version

from .errors import UnsupportedVersionError

__all__ = ["TESTED", "transformers_requirement", "supported_range", "check_transformers"]


def _read_tested() -> tuple[str, ...]:
    text = importlib.resources.files("vlmprune").joinpath("tested_versions.txt").read_text()
    versions = [ln.split("#")[0].strip() for ln in text.splitlines()]
    return tuple(sorted((v for v in versions if v), key=Version))


TESTED: tuple[str, ...] = _read_tested()


@functools.lru_cache(maxsize=1)
def transformers_requirement() -> Requirement:
    """The ``transformers`` line of the package's requirements (the supported range)."""
    text = importlib.resources.files("vlmprune").joinpath("requirements.txt").read_text()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.name == "transformers":
                return req
    raise RuntimeError("vlmprune/requirements.txt has no transformers line")


def supported_range() -> str:
    """The supported range as text, lower bound first (e.g. ``">=5.0.0,<6"``)."""
    specs = sorted(transformers_requirement().specifier, key=lambda s: (not s.operator.startswith(">"), str(s)))
    return ",".join(str(s) for s in specs)


_warned: set[str] = set()


def installed_version() -> str:
    """The installed transformers release (from the module, so a checkout on ``sys.path`` counts as it is)."""
    import sys

    import transformers

    # transformers' lazy module may replace itself in sys.modules: read the live one
    return str(sys.modules.get("transformers", transformers).__version__)


def check_transformers(version: str | None = None) -> None:
    """Raise :class:`UnsupportedVersionError` if ``version`` (default: installed) is outside the supported range."""
    if version is None:
        version = installed_version()
    req = transformers_requirement()
    spec = supported_range()
    v = Version(version)
    if not req.specifier.contains(v, prereleases=True):
        raise UnsupportedVersionError(
            f"transformers {version} is not supported by vlmprune (supported: transformers{spec}; tested: "
            f"{', '.join(TESTED)}). Remedy: pip install 'transformers{spec}' (e.g. "
            f"transformers=={TESTED[-1]})."
        )
    if v > Version(TESTED[-1]) and version not in _warned:
        _warned.add(version)
        warnings.warn(
            f"transformers {version} is newer than the newest release vlmprune was tested on ({TESTED[-1]}); "
            "patching will self-check at run time and raise if the model's structure changed.",
            UserWarning,
            stacklevel=3,
        )
