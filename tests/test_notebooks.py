"""The notebooks run top to bottom (fast setting) and are committed without outputs."""

import shutil
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_every_cell(path, tmp_path, monkeypatch, cifar10_dir):
    from nbclient import NotebookClient

    monkeypatch.setenv("TFKD_FAST", "1")  # tiny epochs and data: checks every step runs
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    notebook = nbformat.read(copy, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # a failing cell raises
    pictures = [cell for cell in notebook.cells if cell.cell_type == "code"
                and ("plt.show()" in cell.source or "display(Image" in cell.source)]
    assert pictures
    for cell in pictures:  # every picture is shown (a library call must not break inline plots)
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]
