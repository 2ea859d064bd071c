"""The supported range is declared once and the tested matrix is the one CI runs and README shows."""

from __future__ import annotations

import pathlib
import re

import pytest
from packaging.version import Version

import vlmprune
from vlmprune import _versions

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tested_versions_lie_in_the_supported_range():
    spec = _versions.transformers_requirement().specifier
    assert len(_versions.TESTED) >= 3
    assert all(spec.contains(v) for v in _versions.TESTED)
    assert list(_versions.TESTED) == sorted(_versions.TESTED, key=Version)


def test_pyproject_reads_the_same_requirements_file():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["vlmprune/requirements.txt"]


def test_readme_matrix_matches_ci():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tested-matrix:start -->")[1].split("<!-- tested-matrix:end -->")[0]
    rows = [r for r in block.strip().splitlines()[2:] if r.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == list(_versions.TESTED)
    assert f"`{_versions.supported_range()}`" in text


def test_ci_script_reads_the_matrix_file():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "vlmprune/tested_versions.txt" in script
    assert not re.search(r"transformers==5\.\d+\.\d+", script)  # no release hard-coded beside the file


def test_patch_outside_range_names_the_remedy(monkeypatch):
    from vlmprune.testing import tiny_model

    model = tiny_model("llava")
    monkeypatch.setattr(_versions, "installed_version", lambda: "6.1.0")
    with pytest.raises(vlmprune.UnsupportedVersionError, match=r"6\.1\.0.*pip install 'transformers>=5\.0\.0,<6'"):
        vlmprune.patch(model, method="uniform", keep=0.5)


def test_readme_supported_models_table_is_generated_from_the_registry():
    from vlmprune.patches import supported_models_table

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- supported-models:start (generated: python -m vlmprune.patches) -->\n")[1]
    block = block.split("<!-- supported-models:end -->")[0]
    assert block == supported_models_table(), "regenerate it: python -m vlmprune.patches"
    rows = [r.split("|")[1].strip() for r in block.splitlines()[2:]]
    assert [r.split()[0].strip("`") for r in rows] == sorted(vlmprune.list_supported_models())
