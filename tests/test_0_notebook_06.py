"""Notebook 06 executed as in test_0_notebooks.py, from a file of its own named to be collected first, so
that with two test workers (`make test`) its long run overlaps the rest of the suite."""

import pytest
from test_0_notebooks import LONGEST, OTHERS, SCRIPTS, kernel_env, run_notebook  # noqa: F401 (a fixture)


def test_every_notebook_runs_in_exactly_one_file():
    assert len(LONGEST) == 1 and sorted(LONGEST + OTHERS) == SCRIPTS


@pytest.mark.parametrize("script", LONGEST, ids=lambda p: p.stem)
def test_notebook_executes(script, kernel_env, tmp_path):  # noqa: F811
    run_notebook(script, tmp_path)
