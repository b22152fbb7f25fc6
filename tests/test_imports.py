"""Cold start: a training import pulls in no plotting, tables or checkpointing; the cache folder per JAX."""

import json
import os
import subprocess
import sys

import jax
import jaxlib

from nestlearn.engine import default_cache_dir

HEAVY = ("matplotlib", "pandas", "orbax", "sklearn", "mlxtend", "tensorstore")
TRAINING = ("nestlearn", "nestlearn.engine", "nestlearn.tasks", "nestlearn.nn", "nestlearn.continual",
            "nestlearn.meta", "nestlearn.optim", "nestlearn.levels", "nestlearn.metrics", "nestlearn.experiment")  # fmt: skip

PROBE = """
import importlib, json, sys
heavy, loaded = set(json.loads(sys.argv[1])), {}
for m in sys.argv[2:]:
    importlib.import_module(m)
    loaded[m] = sorted({k.split(".")[0] for k in sys.modules} & heavy)
print(json.dumps(loaded))
"""


def test_training_imports_leave_plotting_tables_and_checkpointing_unloaded():
    # One fresh interpreter imports the subpackages a training run uses, in order, and lists after each
    # which heavy packages have been loaded; they load when a function that needs them runs. The plotting
    # subpackage comes last and does load matplotlib: the probe sees a heavy import where there is one.
    env = {**os.environ, "NESTLEARN_COMPILATION_CACHE": "0"}
    cmd = [sys.executable, "-c", PROBE, json.dumps(HEAVY), *TRAINING, "nestlearn.plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout)
    assert list(loaded) == [*TRAINING, "nestlearn.plot"]
    assert {m: heavy for m, heavy in loaded.items() if heavy} == {"nestlearn.plot": ["matplotlib"]}


def test_default_cache_dir_is_one_folder_per_jax_version(monkeypatch, tmp_path):
    monkeypatch.delenv("NESTLEARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    version = f"{jax.__version__}-{jaxlib.__version__}"
    assert default_cache_dir() == tmp_path / "nestlearn" / "jax" / version
    monkeypatch.setenv("NESTLEARN_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"  # a folder the user names is used as it is
