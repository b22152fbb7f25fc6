"""Notebooks run: every jupytext pair is stripped and in sync, and executes top to bottom at the small size.

A notebook is a percent script ``notebooks/NAME.py`` paired with ``notebooks/NAME.ipynb``. The ``.ipynb``
is committed without outputs or execution counts, and its cells must equal the script's (edit the
script, then ``jupytext --sync notebooks/NAME.py``). Execution uses ``NESTLEARN_SMALL=1``, which every
notebook reads to shrink itself, in a kernel on this interpreter (``sys.executable``), with four fake
CPU devices so that sharding paths run, and with XLA's backend optimisations off: the small runs are
dominated by compilation, which this halves.
"""

import json
import pathlib
import sys

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("*.py"))
CELL_TIMEOUT_S = 600
# Notebooks whose training runs through nestlearn's host loops (Learner.run, SeqTrainer, engine.Progress).
PROGRESS_BARS = {"01_forgetting_curves", "04_maml_initialisations", "06_memory_models", "07_nested_learning"}

# Appended to the executed copy: proves the kernel runs the test's interpreter and environment.
_PROBE = "import os, sys\nprint(sys.prefix)\nprint(os.environ.get('NESTLEARN_SMALL'))"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_notebooks_are_found():
    assert SCRIPTS, f"no notebook scripts in {NOTEBOOKS}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_pair_is_stripped_and_in_sync(script):
    paired = script.with_suffix(".ipynb")
    assert paired.is_file(), f"{script.name} has no paired {paired.name}: run jupytext --sync {script}"
    text = jupytext.reads(script.read_text(), fmt="py:percent")
    formats = text.metadata.get("jupytext", {}).get("formats", "")
    assert set(formats.split(",")) == {"ipynb", "py:percent"}, f"{script.name} pairs as {formats!r}"
    assert text.metadata["kernelspec"]["name"] == "python3"

    notebook = nbformat.read(paired, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{paired.name} has no code cells"
    for k, cell in enumerate(code):
        assert cell.outputs == [], f"{paired.name}: code cell {k} has outputs (strip them before committing)"
        assert cell.execution_count is None, f"{paired.name}: code cell {k} has an execution count"
    assert _cells(notebook) == _cells(jupytext.read(script)), (
        f"{paired.name} is out of sync with {script.name}: run jupytext --sync {script}"
    )


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec on this interpreter, found first, and the small-size environment."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (nestlearn tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before user and sys.prefix
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("NESTLEARN_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebooks ask for the inline backend themselves
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("NESTLEARN_PROGRESS", "1")  # notebooks show their progress bars, as for a user
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    )


# Each of `make test`'s two workers takes whole files, in collection order (--no-loadscope-reorder).
# Notebook 06, by far the longest at the small size, runs from tests/test_0_notebook_06.py, first in the
# collection, and the other notebooks from this file, second: the two workers start on them, and the many
# short files fill in behind instead of a long file running alone at the end.
LONGEST = [s for s in SCRIPTS if s.stem.startswith("06_")]
OTHERS = [s for s in SCRIPTS if s not in LONGEST]


@pytest.mark.parametrize("script", OTHERS, ids=lambda p: p.stem)
def test_notebook_executes(script, kernel_env, tmp_path):
    run_notebook(script, tmp_path)


def run_notebook(script: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Executes the paired notebook at the small size and checks its outputs (needs ``kernel_env``)."""
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell
    nbformat.write(notebook, tmp_path / f"{script.stem}.executed.ipynb")  # kept for inspection

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{script.name}: {errors[0].ename}: {errors[0].evalue}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{script.name} showed no figure"
    if script.stem in PROGRESS_BARS:  # training cells report progress as a bar that renders in Jupyter
        bars = [out for out in outputs if "<progress" in out.get("data", {}).get("text/html", "")]
        assert bars, f"{script.name} showed no progress bar"
        assert all('max="' in b["data"]["text/html"] and "ETA" in b["data"]["text/html"] for b in bars)

    probe = "".join(out.text for out in notebook.cells[-1].outputs if out.output_type == "stream")
    assert probe.split("\n")[:2] == [sys.prefix, "1"], (
        f"kernel ran elsewhere or without the small size: {probe!r}"
    )
