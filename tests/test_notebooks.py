"""Execute every notebook in notebooks/ top to bottom (quick parameters); a failing cell fails the test.

The notebooks read PAGED_GENERATE_NOTEBOOK_QUICK=1 and shrink their parameters, so all of them together run in well
under a minute on a 2-core CPU machine (most of it kernel start-up and imports). Each cell has a time limit too.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the dev extra: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="the notebook tests need the dev extra: pip install -e '.[dev]'")
pytest.importorskip("matplotlib", reason="the notebook tests need the dev extra: pip install -e '.[dev]'")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 60  # one cell; quick parameters keep each under a few seconds
NOTEBOOK_BUDGET_S = 45  # one notebook, kernel start included
# Notebooks using an optional extra (CI installs it): skipped only where the package is absent.
EXTRAS = {"06_rl_rollouts": ("rl", ["trl", "datasets"])}


def test_every_notebook_is_listed_in_the_index():
    index = (NOTEBOOK_DIR / "README.md").read_text()
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        assert path.name in index, f"{path.name} is missing from notebooks/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    extra, modules = EXTRAS.get(path.stem, (None, []))
    for module in modules:
        pytest.importorskip(module, reason=f"{path.name} needs the `{extra}` extra: pip install -e '.[{extra}]'")
    monkeypatch.setenv("PAGED_GENERATE_NOTEBOOK_QUICK", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    seconds = time.perf_counter() - start
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s; keep its quick parameters small"
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_are_small(path):
    """Outputs are cleared before committing (or at most a few small figures)."""
    assert path.stat().st_size < 200_000
    notebook = nbformat.read(path, as_version=4)
    assert sum(len(cell.get("outputs", [])) for cell in notebook.cells if cell.cell_type == "code") <= 3
