"""The README documents every command-line flag, and public functions and classes have docstrings."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("command", [["tfkd.train"], ["tfkd.export"], ["tfkd.compress"],
                                     ["tfkd.bench", "accuracy"], ["tfkd.bench", "speed"],
                                     ["tfkd.bench", "pipeline"], ["tfkd.bench", "deploy"]])
def test_readme_names_every_flag_of_every_command(command):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True,
                            timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""})
    assert result.returncode == 0, result.stderr[-500:]
    usage = result.stdout.split("\n\n")[0] + "\n" + result.stdout.split("options:")[-1].split("Every option")[0]
    flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", usage)) - {"--help"})
    missing = [f for f in flags if f"`{f}" not in README and f"{f} " not in README and f"{f}`" not in README]
    assert flags and not missing, f"python -m {' '.join(command)}: README lacks {missing}"


def test_public_functions_and_classes_have_docstrings():
    missing = []
    for path in sorted((REPO / "tfkd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if ast.get_docstring(node) is None and node.name not in OVERRIDES:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not missing, missing


#: Keras hooks whose contract Keras documents, the hooks of ``tfkd.distill.terms.Term``, of the
#: data contract (``tfkd.data.base.Data``, ``tfkd.data.streaming.Records``) and of ONNX Runtime's
#: calibration reader, which their base classes document (a docstring on each override would
#: repeat it).
OVERRIDES = {"call", "get_config", "from_config", "build", "compute_output_shape", "train_step",
             "test_step", "compile", "on_epoch_begin", "on_epoch_end", "on_train_batch_end",
             "on_test_begin", "on_train_end", "on_train_begin", "reduce", "metrics", "main",
             "compute", "config", "weight_at", "prepare", "auxiliary_step", "auxiliary_variables",
             "auxiliary_optimizer", "labels", "count", "elements", "indices", "train_dataset",
             "sample", "spread", "get_next", "rewind"}


def test_the_readmes_notebook_command_is_installed(tmp_path):
    """`jupyter nbconvert --clear-output --inplace` (the README's way to commit a notebook)
    comes with `make` (the dev extra)."""
    import shutil

    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=1, outputs=[
        nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)])])
    nbformat.write(notebook, tmp_path / "n.ipynb")
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent))
    assert jupyter, "jupyter is not installed beside this Python"
    result = subprocess.run([jupyter, "nbconvert", "--clear-output", "--inplace", str(tmp_path / "n.ipynb")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    cell = nbformat.read(tmp_path / "n.ipynb", as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None
