"""The example notebooks: stored without outputs, and every one of them executes, top to bottom, offline."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def _need(module: str):
    """Import ``module``; skip without it, except under scripts/test.sh (which installs the examples extra and sets
    VLMPRUNE_REQUIRE_EXAMPLES=1, so a broken install fails instead of skipping silently)."""
    if os.environ.get("VLMPRUNE_REQUIRE_EXAMPLES") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="the examples extra (pip install -e '.[examples]') is not installed")


nbformat = _need("nbformat")


def test_there_are_numbered_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert len(names) >= 3
    assert all(n[:2].isdigit() and n[2] == "_" for n in names), names
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(len(names))], "numbers must run 00, 01, ..."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "first cell: a title + purpose"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"cell {i} of {path.name} has outputs: clear them"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    if "lmms" in path.stem and os.environ.get("VLMPRUNE_REQUIRE_LMMS") != "1":
        # the lmms extra lives in its own venv (scripts/test.sh runs this notebook there, where it must pass)
        pytest.importorskip("lmms_eval", reason="the lmms extra is not installed")
    nbclient = _need("nbclient")
    _need("ipykernel")
    _need("matplotlib")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
