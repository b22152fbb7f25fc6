"""The second half of the notebooks, executed as in test_notebooks.py (a file of its own, so that the
two test workers share the notebooks)."""

import pytest
from test_notebooks import SECOND_HALF, kernel_env, run_notebook  # noqa: F401 (kernel_env: a fixture)


def test_the_halves_cover_every_notebook_once():
    from test_notebooks import FIRST_HALF, SCRIPTS

    assert sorted(FIRST_HALF + SECOND_HALF) == SCRIPTS


@pytest.mark.parametrize("script", SECOND_HALF, ids=lambda p: p.stem)
def test_notebook_executes(script, kernel_env, tmp_path):  # noqa: F811
    run_notebook(script, tmp_path)
