"""Preemption: SIGTERM stops a run at the next chunk boundary with a checkpoint, exit code 4, and --resume
continues it bit-identically (inside a task too). The 20-drill version is benchmarks/preemption_drill.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

import nestlearn
from nestlearn import engine
from nestlearn.engine import _preempt

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.n_tasks=2", "model.hidden=16", "train.steps_per_task=12", "train.batch_size=16",
    "train.evals_per_task=3", "seeds=4", "strategies=naive,ewc",
]  # fmt: skip
FIELDS = ("acc_matrix", "acc_init", "curve_acc", "train_loss", "train_acc", "diverged_step")


def _config():
    from nestlearn.experiment import ExperimentConfig
    from nestlearn.experiment._config import override

    return override(ExperimentConfig(), TINY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from nestlearn.experiment._run import run_experiment

    out = tmp_path_factory.mktemp("ref") / "run"
    return run_experiment(_config(), out, make_figures=False, log=lambda m: None).results


def _sigterm_at(monkeypatch, call: int) -> None:
    """A real SIGTERM to this process just before the ``call``-th chunk-boundary check (1-based)."""
    real, calls = _preempt.requested, [0]

    def requested():
        calls[0] += 1
        if calls[0] == call:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            time.sleep(0.001)  # the handler runs when the main thread regains the interpreter
        return real()

    monkeypatch.setattr(_preempt, "requested", requested)


def _assert_same(results, reference):
    assert list(results) == list(reference)
    for name in reference:
        for f in FIELDS:
            np.testing.assert_array_equal(
                getattr(results[name], f), getattr(reference[name], f), err_msg=f"{name}.{f}"
            )


# 2 strategies x 2 tasks x 3 chunks: boundary checks per task are after chunks 1 and 2 (inside) and at its
# end (checks 1-3 are task 1 of naive, 4-6 task 2, 7-9 task 1 of ewc; the last task's end is not a check).
@pytest.mark.parametrize(
    ("calls", "stops"),
    [
        ((2,), ["inside task 1/2 of 'naive', after chunk 2/3; checkpoint 1"]),
        ((3,), ["after task 1/2 of 'naive'; checkpoint 1"]),
        # preempted twice inside the same task: the second part-done checkpoint replaces the first
        (
            (7, 1),
            ["inside task 1/2 of 'ewc', after chunk 1/3; checkpoint 3", "after chunk 2/3; checkpoint 3"],
        ),
    ],
)
def test_sigterm_stops_at_a_chunk_and_resume_is_bit_identical(tmp_path, monkeypatch, reference, calls, stops):
    from nestlearn.experiment._run import run_experiment

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    for i, (call, stop) in enumerate(zip(calls, stops)):
        _sigterm_at(monkeypatch, call)
        with pytest.raises(nestlearn.Preempted, match=stop) as e:
            run_experiment(_config(), out, resume=i > 0, make_figures=False, log=lambda m: None)
        assert e.value.step == int(stop.rsplit(" ", 1)[1])
        assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is gone again
        assert not (out / "status.json").exists()
    monkeypatch.setattr(_preempt, "requested", _real_requested)
    lines: list[str] = []
    resumed = run_experiment(_config(), out, resume=True, make_figures=False, log=lines.append)
    _assert_same(resumed.results, reference)
    if "inside" in stops[-1]:
        assert any("resumed inside task" in line for line in lines), lines
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4  # 4 tasks done in all: the part-done checkpoints were replaced by task ends


_real_requested = _preempt.requested


class Counter(flax.struct.PyTreeNode):
    x: jax.Array
    step: jax.Array
    diverged_step: jax.Array


def _doubling():
    def step(s, rate):
        return s.replace(x=s.x * rate), {"loss": s.x}

    return engine.Engine(step, length=3, in_axes=(0,))


def _counter():
    return Counter(jnp.asarray([1.0, 0.5], jnp.float32), jnp.zeros(2, jnp.int32), jnp.full(2, -1, jnp.int32))


def test_run_chunks_stops_after_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    rate = jnp.asarray([1.5, 0.5], jnp.float32)
    eng = _doubling()
    whole_state, whole = engine.run_chunks(eng, _counter(), rate, n_chunks=5, progress=False)
    _sigterm_at(monkeypatch, 2)
    with _preempt.handling(), engine.Checkpoints(tmp_path / "ck") as ck:
        with pytest.raises(nestlearn.Preempted, match=r"after chunk 2/5; checkpoint 2 saved") as e:
            engine.run_chunks(eng, _counter(), rate, n_chunks=5, checkpoints=ck, progress=False)
    assert e.value.step == 2
    monkeypatch.setattr(_preempt, "requested", _real_requested)
    with engine.Checkpoints(tmp_path / "ck") as ck:
        assert ck.latest() == 2
        state, chunks = engine.run_chunks(eng, _counter(), rate, n_chunks=5, checkpoints=ck, progress=False)
    np.testing.assert_array_equal(state.x, whole_state.x)  # 1.5**15 and 0.5**16 * ... exactly
    np.testing.assert_array_equal(state.x, np.float32([1.5**15, 0.5 * 0.5**15]))
    for a, b in zip(chunks, whole):
        np.testing.assert_array_equal(a["loss"], b["loss"])


def test_the_handler_is_installed_for_the_run_only():
    with _preempt.handling():
        assert signal.getsignal(signal.SIGTERM) is _preempt._handler
        assert not _preempt.requested()
        _preempt.request("drill")
        assert _preempt.requested() and _preempt.notice() == "drill"
    assert signal.getsignal(signal.SIGTERM) is not _preempt._handler


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "NESTLEARN_PROGRESS": "0",
        "XLA_FLAGS": xla_flags(4),
    }
    sets = [a for s in TINY for a in ("--set", s)]
    cmd = [sys.executable, "-m", "nestlearn.experiment._cli", "run", "permuted_mnist_forgetting", *sets]
    cmd += ["--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_line_exits_4_with_one_line_and_resumes(tmp_path, monkeypatch, capsys, reference):
    from nestlearn.experiment._cli import EXIT_PREEMPTED, main
    from nestlearn.experiment._rundir import load_result

    args = [
        "run",
        "permuted_mnist_forgetting",
        *[a for s in TINY for a in ("--set", s)],
        "--out",
        str(tmp_path),
    ]
    _sigterm_at(monkeypatch, 5)  # inside task 2 of naive, after its second chunk
    assert main(args) == EXIT_PREEMPTED == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"nestlearn: preempted (SIGTERM) inside task 2/2 of 'naive', after chunk 2/3; checkpoint 2 saved in "
        f"{tmp_path / 'checkpoints'}; continue with --resume"
    )
    monkeypatch.setattr(_preempt, "requested", _real_requested)
    assert main([*args, "--resume"]) == 0
    _assert_same({n: load_result(tmp_path / "results" / f"{n}.npz") for n in reference}, reference)


@pytest.mark.slow
def test_sigterm_to_nestlearn_run_exits_4_and_resume_is_identical(tmp_path, reference):
    from nestlearn.experiment._rundir import load_result

    out = tmp_path / "run"
    proc = _cli(out)
    ckpt = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(np.random.default_rng().uniform(0.0, 0.5))  # a random moment after the first checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # the run had finished before the signal: nothing to resume
        assert (out / "status.json").exists()
    else:
        assert proc.returncode == 4, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("nestlearn: preempted (SIGTERM)") and last.endswith("continue with --resume")
        resumed = _cli(out, "--resume")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
    _assert_same({n: load_result(out / "results" / f"{n}.npz") for n in reference}, reference)


def test_resume_if_started_starts_a_run_that_never_began_and_continues_one_that_did(tmp_path):
    # The TPU launcher relaunches with --resume-if-started: a preemption can come before the run directory
    # exists (nothing to resume: start it), or after (continue it; a plain start would refuse).
    from nestlearn.experiment import _cli

    out = tmp_path / "run"
    parse = lambda *extra: _cli._parser().parse_args(["run", "x", "--out", str(out), *extra])
    assert not _cli.resume_wanted(parse("--resume-if-started"), out)
    out.mkdir()
    assert not _cli.resume_wanted(parse("--resume-if-started"), out)  # created, but nothing started in it
    (out / "config.json").write_text("{}")
    assert _cli.resume_wanted(parse("--resume-if-started"), out)
    assert not _cli.resume_wanted(parse(), out)
    assert _cli.resume_wanted(parse("--resume"), tmp_path / "elsewhere")  # --resume insists (and errs there)
