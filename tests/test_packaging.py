"""pyproject.toml and environment.yml declare the same dependencies, as lower bounds."""

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _conda_pip():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip section"
    return pip[0]


def test_environment_yml_lists_exactly_the_pyproject_dependencies():
    project = _pyproject()
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    conda = set(_conda_pip()) - {"-e ."}
    assert conda == declared, (
        f"only in environment.yml: {conda - declared}; only in pyproject: {declared - conda}"
    )
    assert "-e ." in _conda_pip()


def test_core_stack_is_declared_with_lower_bounds_not_pins():
    deps = _pyproject()["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for d in deps}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "jupyterlab", "matplotlib", "mlxtend"} <= names
    assert all(">=" in d and "==" not in d for d in deps), deps


def test_python_and_conda_agree_on_the_interpreter():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python>=3.11" in env["dependencies"]
    assert _pyproject()["requires-python"] == ">=3.11"
