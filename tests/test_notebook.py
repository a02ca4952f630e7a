"""The notebooks run headless in CI (nbclient + this interpreter's ipykernel); a failing cell fails the build."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel; raises CellExecutionError on the first cell that fails."""
    # jupyter_client starts the "python3" kernel with sys.executable, so the kernel sees this venv.
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_explore_shards_notebook_runs_on_the_world_sample(tmp_path, monkeypatch):
    monkeypatch.delenv("GROUNDING_SHARDS", raising=False)  # build the sample, as CI does
    nb = execute(nbformat.read(NOTEBOOKS / "explore_shards.ipynb", as_version=4), tmp_path)
    text = _text(nb)
    assert "images             48" in text
    assert "top_heads: The $limit most frequent head nouns" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the contact sheet
    assert "'images': 10" in text  # the balanced export (cap 6, min 3, seed 0) of the 48-image sample


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import sys; assert sys.executable == {sys.executable!r}"),
        nbformat.v4.new_code_cell("raise RuntimeError('cell two breaks')"),
        nbformat.v4.new_code_cell("print('never runs')"),
    ])
    with pytest.raises(CellExecutionError, match="cell two breaks"):
        execute(nb, tmp_path)
    assert nb.cells[0].outputs == [] and not nb.cells[2].outputs
