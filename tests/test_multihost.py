"""Multi-host runs on one machine: 2 processes (a localhost coordinator, gloo collectives), 2 fake CPU
devices each, run `nestlearn run` as on a TPU slice; their results equal the single-process run on 4."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_flags

import nestlearn
from nestlearn import ConfigError, engine
from nestlearn.engine import _checkpoint, _distributed

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.n_tasks=2", "model.hidden=16", "train.steps_per_task=12", "train.batch_size=16",
    "train.evals_per_task=3", "seeds=4", "strategies=naive",
]  # fmt: skip
ARRAYS = ("acc_matrix", "acc_init", "curve_acc", "train_loss", "train_acc", "diverged_step")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out: Path, n: int, devices: int, *extra: str, sets=TINY) -> list[subprocess.Popen]:
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "NESTLEARN_PROGRESS": "0",
        "XLA_FLAGS": xla_flags(devices),
        "NESTLEARN_COORDINATOR": f"localhost:{port}",  # the environment's way; flags would do the same
        "NESTLEARN_NUM_PROCESSES": str(n),
    }
    cmd = [sys.executable, "-m", "nestlearn.experiment._cli", "run", "permuted_mnist_forgetting"]
    cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(out), *extra]
    return [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "NESTLEARN_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=400)
        out.append((p.returncode, err))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same runs in this process, on its 4 devices."""
    from nestlearn.experiment import ExperimentConfig
    from nestlearn.experiment._config import override
    from nestlearn.experiment._run import run_experiment

    assert jax.device_count() == 4
    out = tmp_path_factory.mktemp("single") / "run"
    return run_experiment(override(ExperimentConfig(), TINY), out, make_figures=False, log=lambda m: None)


def _same_results(directory: Path, single) -> None:
    from nestlearn.experiment._rundir import load_result

    for name, ref in single.results.items():
        got = load_result(directory / "results" / f"{name}.npz")
        assert got.runs == ref.runs
        for f in ARRAYS:
            np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f"{name}.{f}")


def test_two_processes_equal_one_process_on_four_devices(tmp_path, single):
    out = tmp_path / "run"
    (rc0, err0), (rc1, err1) = _wait(_launch(out, 2, 2))
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    _same_results(out, single)
    # Written once, by process 0; logged once, by process 0; checkpoints saved by both and verified.
    assert "[naive] final average accuracy" in err0 and "[naive] task" not in err1 and "final" not in err1
    assert json.loads((out / "status.json").read_text())["complete"] is True
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2] and all(_checkpoint.verify(out / "checkpoints" / str(s)) is None for s in steps)
    assert not [p for p in out.rglob("*.tmp")]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_chunk_and_resume_is_identical(tmp_path, single):
    out = tmp_path / "run"
    procs = _launch(out, 2, 2)
    ckpt = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.is_dir() and (ckpt / "1" / _checkpoint.MANIFEST).exists()):
        assert all(p.poll() is None for p in procs), _wait(procs)
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    results = _wait(procs)
    if all(rc == 0 for rc, _ in results):  # finished before the notice took effect
        _same_results(out, single)
        return
    assert [rc for rc, _ in results] == [4, 4], results
    assert "nestlearn: preempted" in results[0][1]
    (rc0, err0), (rc1, err1) = _wait(_launch(out, 2, 2, "--resume"))
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    _same_results(out, single)


def test_partial_or_malformed_settings_are_refused(monkeypatch):
    for name in _distributed._ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="missing --num-processes, --process-id"):
        _distributed.initialize("localhost:1234")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        _distributed.initialize("localhost", 2, 0)
    with pytest.raises(ConfigError, match=r"--process-id must be in \[0, 1\], got 2"):
        _distributed.initialize("localhost:1234", 2, 2)
    monkeypatch.setenv("NESTLEARN_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="NESTLEARN_NUM_PROCESSES must be an integer, got 'two'"):
        _distributed.initialize()
    monkeypatch.delenv("NESTLEARN_NUM_PROCESSES")
    monkeypatch.setenv("NESTLEARN_DISTRIBUTED", "0")
    assert _distributed.initialize() is False and not _distributed.is_initialized()
    assert _distributed.is_primary() and _distributed.process_count() == 1


def test_global_array_equals_device_put_on_one_process():
    mesh = engine.run_mesh(4)
    sharding = engine.run_sharding(mesh)
    keys = engine.run_keys([0, 1, 2, 3])
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    got = _distributed.global_array(values, sharding)
    assert got.sharding == sharding and [s.data.shape for s in got.addressable_shards] == [(1, 2)] * 4
    np.testing.assert_array_equal(_distributed.to_host(got), values)
    k = _distributed.global_array(keys, sharding)
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(keys))
    assert nestlearn.Preempted.__mro__[1] is nestlearn.NestlearnError
