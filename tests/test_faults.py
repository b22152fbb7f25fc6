"""Fault drills: damaged checkpoints fall back to the newest good one or are refused in one line, never resumed.

A small guarded engine runs 6 chunks uninterrupted (the reference), then again with verified checkpoints,
killed after chunk 4 (checkpoints 2, 3 and 4 kept). Checkpoint 4 is then damaged in one way per drill and
the run resumed; it must either fall back to checkpoint 3 and finish bit-identical to the reference, or
refuse with a :class:`~nestlearn.CheckpointError`. ``test_checkpoint_drills_never_resume_silently_different``
prints the counts (faults tried, fell back, refused, silently different) that the issue asks to measure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from test_run_engine import counter, grow

from nestlearn import CheckpointError, engine
from nestlearn.engine._checkpoint import MANIFEST, verify

RATE = jnp.asarray([1.1, 0.9], jnp.float32)
N_CHUNKS = 6


class Killed(Exception):
    pass


def _engine():
    return engine.Engine(grow, length=3, in_axes=(0,))


def _run(directory: Path | None, *, kill_after: int | None = None, reports: list | None = None):
    def on_chunk(c, state, metrics):
        if c == kill_after:
            raise Killed

    if directory is None:
        return engine.run_chunks(_engine(), counter([1.0, 2.0]), RATE, n_chunks=N_CHUNKS, progress=False)
    with engine.Checkpoints(directory, keep=3, report=(reports if reports is not None else []).append) as ck:
        return engine.run_chunks(
            _engine(),
            counter([1.0, 2.0]),
            RATE,
            n_chunks=N_CHUNKS,
            checkpoints=ck,
            progress=False,
            on_chunk=on_chunk,
        )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint directory of a run killed after chunk 4 (steps 2, 3, 4) and the uninterrupted result."""
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    with pytest.raises(Killed):
        _run(directory, kill_after=3)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [2, 3, 4]
    return directory, _run(None)


def _same(a, b) -> bool:
    (sa, ma), (sb, mb) = a, b
    if not all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb))
    ):
        return False
    return all(
        np.array_equal(np.asarray(ca[k]), np.asarray(cb[k]), equal_nan=True)
        for ca, cb in zip(ma, mb)
        for k in ca
    )


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _drills(step_dir: Path, rng: np.random.Generator):
    """(name, damage) pairs; ``damage()`` applies one fault to ``step_dir``."""
    files = _files(step_dir)

    def flip(path_index, byte_fraction, n_bytes=0):  # n_bytes=0: one bit; else that many bytes inverted
        def damage():
            path = _files(step_dir)[path_index]
            data = bytearray(path.read_bytes())
            span = min(max(n_bytes, 1), len(data))
            at = min(int(byte_fraction * len(data)), len(data) - span)
            for i in range(span):
                data[at + i] ^= 0xFF if n_bytes else 0x10
            path.write_bytes(bytes(data))

        return damage

    def truncate(path_index):
        def damage():
            path = _files(step_dir)[path_index]
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        return damage

    def delete(path_index):
        return lambda: _files(step_dir)[path_index].unlink()

    def empty():
        for p in step_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def add():
        (step_dir / "state" / "stray").write_bytes(b"\0")

    drills = []
    for i in range(20):  # one flipped bit in 20 places, array data and metadata alike
        drills.append((f"bit flip {i}", flip(int(rng.integers(len(files))), float(rng.random()))))
    for i in range(5):  # 64 bytes inverted
        drills.append(
            (f"64 bytes inverted {i}", flip(int(rng.integers(len(files))), float(rng.random()), 64))
        )
    for i in range(5):
        drills.append((f"truncated file {i}", truncate(int(rng.integers(len(files))))))
    for i in range(5):
        drills.append((f"deleted file {i}", delete(int(rng.integers(len(files))))))
    drills.append(("empty step directory", empty))
    drills.append(("deleted manifest", lambda: (step_dir / MANIFEST).unlink()))
    drills.append(("stray file added", add))
    return drills


def test_checkpoint_drills_never_resume_silently_different(pristine, tmp_path, capsys):
    source, reference = pristine
    counts = {"tried": 0, "fell back": 0, "refused": 0, "silently different": 0}
    for i in range(len(_drills(source / "4", np.random.default_rng(0)))):
        directory = tmp_path / f"drill{i}"
        shutil.copytree(source, directory)
        name, damage = _drills(directory / "4", np.random.default_rng(0))[i]  # the same drills, on the copy
        damage()
        counts["tried"] += 1
        assert verify(directory / "4") is not None, f"{name}: the damage went undetected by the manifest"
        reports: list[str] = []
        try:
            result = _run(directory, reports=reports)
        except CheckpointError:
            counts["refused"] += 1
            continue
        if not _same(result, reference):
            counts["silently different"] += 1
            continue
        assert (
            len(reports) == 1 and "checkpoint 4" in reports[0] and "resuming from checkpoint 3" in reports[0]
        )
        assert (directory / "damaged" / "4").is_dir()  # kept aside, not deleted
        counts["fell back"] += 1
    with capsys.disabled():
        print(f"\ncheckpoint drills: {counts}")
    assert counts["silently different"] == 0
    assert counts["tried"] == 38 and counts["fell back"] == 38  # a good checkpoint 3 is always there


def test_every_checkpoint_damaged_is_refused_in_one_line_and_nothing_moves(pristine, tmp_path):
    source, _ = pristine
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    for step in (2, 3, 4):
        (directory / str(step) / MANIFEST).unlink()
    with pytest.raises(CheckpointError) as err:
        _run(directory)
    message = str(err.value)
    assert "\n" not in message and "all 3 are damaged" in message and "--force" in message
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3", "4"]


def test_a_killed_write_without_manifest_resumes_from_the_previous_checkpoint(pristine, tmp_path):
    # Orbax renames a step into place, then the manifest is written: a kill in between leaves step 4
    # without a manifest, which is treated as unfinished.
    source, reference = pristine
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    (directory / "4" / MANIFEST).unlink()
    reports: list[str] = []
    assert _same(_run(directory, reports=reports), reference)
    assert "no manifest" in reports[0]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be a positive int"):
        engine.Checkpoints(tmp_path, keep=0)


# -- bad inputs: one line, exit code 2, nothing written ----------------------------------------------------

PERMUTED = "permuted_mnist_forgetting"
BAD_INPUTS = [
    (PERMUTED, "ewc.lam=-5", "ewc.lam"),
    (PERMUTED, "ewc.lam=nan", "ewc.lam"),
    (PERMUTED, "ewc.lam=inf", "ewc.lam"),
    (PERMUTED, "optim.lr=inf", "optim.lr"),
    (PERMUTED, "optim.lr=1e999", "optim.lr"),
    (PERMUTED, "optim.lr=0", "optim.lr"),
    (PERMUTED, "optim.lr=-0.1", "optim.lr"),
    (PERMUTED, "optim.lr=fast", "optim.lr"),
    (PERMUTED, "optim.momentum=1", "optim.momentum"),
    (PERMUTED, "optim.momentum=-0.5", "optim.momentum"),
    (PERMUTED, "optim.name=lion", "optim.name"),
    (PERMUTED, "optim.reset_per_task=maybe", "optim.reset_per_task"),
    (PERMUTED, "train.epochs=inf", "train.epochs"),
    (PERMUTED, "train.epochs=1e12", "train"),
    (PERMUTED, "train.epochs=0", "train.epochs"),
    (PERMUTED, "train.epochs=-1", "train.epochs"),
    (PERMUTED, "train.steps_per_task=-3", "train.steps_per_task"),
    (PERMUTED, "train.steps_per_task=3000000000", "train.steps_per_task"),
    (PERMUTED, "train.batch_size=100000000", "train.batch_size"),
    (PERMUTED, "train.batch_size=0", "train.batch_size"),
    (PERMUTED, "train.batch_size=1.5", "train.batch_size"),
    (PERMUTED, "train.evals_per_task=0", "train.evals_per_task"),
    (PERMUTED, "model.hidden=100000000", "model.hidden"),
    (PERMUTED, "model.hidden=0", "model.hidden"),
    (PERMUTED, "model.hidden=-8", "model.hidden"),
    (PERMUTED, "model.init=xavier", "model.init"),
    (PERMUTED, "data.n_tasks=1000000", "data.n_tasks"),
    (PERMUTED, "data.n_tasks=0", "data.n_tasks"),
    (PERMUTED, "data.stream=cifar", "data.stream"),
    (PERMUTED, "data.scenario=open", "data.scenario"),
    (PERMUTED, "data.seed=-1", "data.seed"),
    (PERMUTED, "data.seed=4294967296", "data.seed"),
    (PERMUTED, "seeds=100000000", "seeds"),
    (PERMUTED, "seeds=0", "seeds"),
    (PERMUTED, "seeds=-2", "seeds"),
    (PERMUTED, "first_seed=4294967295", "seeds"),
    (PERMUTED, "first_seed=-1", "first_seed"),
    (PERMUTED, "strategies=naive,naive", "strategies"),
    (PERMUTED, "strategies=naive,magic", "strategies"),
    (PERMUTED, "sweep.ewc=1,-1", "sweep.ewc"),
    (PERMUTED, "sweep.ewc=1,nan", "sweep.ewc"),
    (PERMUTED, "sweep.si=1", "sweep.si"),
    (PERMUTED, "si.c=-1", "si.c"),
    (PERMUTED, "replay.buffer_size=-5", "replay.buffer_size"),
    (PERMUTED, "lwf.alpha=-1", "lwf.alpha"),
    (PERMUTED, "mas.lam=inf", "mas.lam"),
    (PERMUTED, "nosuch=1", "nosuch"),
    (PERMUTED, "optim.nosuch=1", "optim.nosuch"),
    ("split_mnist_class_forgetting", "data.n_tasks=11", "n_tasks"),
    ("loss_of_plasticity", "steps=0", "steps"),
    ("loss_of_plasticity", "bin=7", "bin"),
    ("loss_of_plasticity", "seeds=4294967296", "seeds"),
    ("loss_of_plasticity", "steps=99999999999", "steps"),
    ("maml_sinusoid", "n_iters=0", "n_iters"),
    ("maml_sinusoid", "seeds=-1", "seeds"),
    ("orthogonal_regression", "steps_per_task=0", "steps_per_task"),
    ("orthogonal_regression", "seeds=nan", "seeds"),
    ("memory_recall", "steps=0", "steps"),
    ("memory_recall", "widths=0", "widths"),
    ("memory_recall", "seeds=", "seeds"),
    ("cms_streams", "bases=inf", "bases"),
    ("cms_streams", "n_tasks=0", "n_tasks"),
    ("maml_continual", "n_iters=-1", "n_iters"),
]


@pytest.mark.parametrize(("experiment", "assignment", "names"), BAD_INPUTS, ids=[b for _, b, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, experiment, assignment, names):
    from nestlearn.experiment._cli import main

    out = tmp_path / "run"
    rc = main(["run", experiment, "--quick", "--set", assignment, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("nestlearn: error:") and "Traceback" not in err
    assert names.lower() in err.lower(), err
    assert not out.exists()


def test_the_bad_input_table_is_large_and_distinct():
    assert len({(e, a) for e, _a, _ in BAD_INPUTS for a in [_a]}) == len(BAD_INPUTS) >= 50


# -- divergence in a sweep, file modes, operating faults ---------------------------------------------------

TINY = [
    "data.n_tasks=2", "model.hidden=16", "train.steps_per_task=12", "train.batch_size=16",
    "train.evals_per_task=2", "seeds=2", "strategies=ewc",
]  # fmt: skip


def _tiny(sweep: str):
    from nestlearn.experiment import ExperimentConfig
    from nestlearn.experiment._config import override

    return override(ExperimentConfig(), [*TINY, f"sweep.ewc={sweep}"])


def test_a_sweep_with_a_diverging_run_exits_0_lists_it_and_leaves_the_others_bit_identical(tmp_path, capsys):
    from nestlearn.experiment._cli import main
    from nestlearn.experiment._run import run_experiment

    lines: list[str] = []
    both = run_experiment(
        _tiny("1,1e30"), tmp_path / "both", log=lines.append, make_figures=False, progress=False
    )
    alone = run_experiment(_tiny("1"), tmp_path / "alone", log=[].append, make_figures=False, progress=False)
    r, ref = both.results["ewc"], alone.results["ewc"]
    lam = np.array([run["lam"] for run in r.runs])
    np.testing.assert_array_equal(r.acc_matrix[lam == 1], ref.acc_matrix)  # the same runs, bit for bit
    np.testing.assert_array_equal(r.curve_acc[lam == 1], ref.curve_acc)
    assert (r.diverged_step[lam == 1e30] >= 0).all() and (r.diverged_step[lam == 1] == -1).all()
    assert np.isnan(r.acc_matrix[lam == 1e30][:, -1]).all()  # after divergence: NaN, never chance level
    assert any(line.startswith("[ewc lam=1e+30] DIVERGED (2 of 2 runs") for line in lines), lines
    assert any(line.startswith("[ewc lam=1] final average accuracy") for line in lines), lines
    table = pd.read_csv(both.tables["accuracy_matrix"])
    diverged = table[table["lam"] == 1e30]
    assert (diverged["diverged_step"] >= 0).all() and diverged["accuracy"].isna().any()
    summary = pd.read_csv(both.tables["summary"])
    assert summary.loc[summary["lam"] == 1e30, "average_accuracy"].isna().all()
    # the command line: exit 0 with the DIVERGED line
    sets = [a for s in [*TINY, "sweep.ewc=1,1e30"] for a in ("--set", s)]
    assert main(["run", PERMUTED, *sets, "--out", str(tmp_path / "cli")]) == 0
    assert "DIVERGED" in capsys.readouterr().err


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_a_run_writes_follows_the_umask(tmp_path, umask, mode):
    import os

    from nestlearn.experiment._run import run_experiment

    old = os.umask(umask)
    try:
        out = run_experiment(_tiny("1"), tmp_path / "run", log=[].append, progress=False).directory
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    wrong = {
        str(p.relative_to(out)): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o777 != mode
    }
    assert not wrong, wrong


def test_a_full_disk_is_one_line_exit_3_and_leaves_no_run(tmp_path, capsys, monkeypatch):
    import shutil as sh

    from nestlearn.engine import _checkpoint
    from nestlearn.experiment._cli import EXIT_OPERATING, main

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(_checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=200_000))
    out = tmp_path / "run"
    sets = [a for s in [*TINY, "sweep.ewc=1"] for a in ("--set", s)]
    assert main(["run", PERMUTED, *sets, "--out", str(out)]) == EXIT_OPERATING
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(out) in err, err
    assert not out.exists()  # nothing half-written blocks the rerun


def test_a_file_in_the_way_is_one_line_exit_3(tmp_path, capsys):
    from nestlearn.experiment._cli import EXIT_OPERATING, main

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert (
        main(["run", PERMUTED, *[a for s in TINY for a in ("--set", s)], "--out", str(out)]) == EXIT_OPERATING
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Not a directory" in err and "file" in err, err


def test_resume_and_force_together_is_one_line(capsys):
    from nestlearn.experiment._cli import main

    assert main(["run", PERMUTED, "--resume", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "contradict" in err


def test_resuming_a_run_of_another_version_or_experiment_is_refused_in_one_line(tmp_path, capsys):
    import json

    from nestlearn.experiment._cli import main

    sets = [a for s in TINY for a in ("--set", s)]
    out = tmp_path / "run"
    assert main(["run", PERMUTED, *sets, "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["versions"]["nestlearn"] not in ("", None)
    stored["versions"]["nestlearn"] = "0.0.1"
    (out / "config.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(["run", PERMUTED, *sets, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nestlearn 0.0.1" in err and "--force" in err, err
    assert main(["run", "split_mnist_task_forgetting", *sets, "--out", str(out), "--resume"]) == 2
    assert "holds a run of 'permuted_mnist_forgetting'" in capsys.readouterr().err


def test_every_metric_of_a_diverged_run_is_nan_and_the_others_are_untouched():
    from nestlearn import metrics

    R = np.array([[[0.9, 0.1], [0.6, 0.8]], [[0.9, 0.1], [np.nan, np.nan]]])  # run 1 diverged in task 2
    b = np.array([[0.1, 0.12], [0.1, 0.12]])
    out = metrics.summary(R, b)
    alone = metrics.summary(R[:1], b[:1])
    for name, value in out.items():
        assert np.isnan(value[1]), f"{name} of the diverged run is {value[1]}, not NaN"
        assert value[0] == alone[name][0], name


def test_keep_checkpoints_from_the_command_line(tmp_path, monkeypatch):
    from nestlearn.experiment._cli import main

    monkeypatch.delenv("NESTLEARN_KEEP_CHECKPOINTS", raising=False)
    sets = [a for s in [*TINY, "data.n_tasks=3"] for a in ("--set", s)]
    assert main(["run", PERMUTED, *sets, "--out", str(tmp_path / "run"), "--keep-checkpoints", "2"]) == 0
    monkeypatch.delenv("NESTLEARN_KEEP_CHECKPOINTS", raising=False)  # main set it for its own process
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 3]  # 3 tasks, the last 2 kept


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written to: a read-only tmpfs as root, else a mode-0555 directory."""
    import os
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        yield target
        subprocess.run(["umount", str(target)], capture_output=True)
    else:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)


def test_a_read_only_directory_is_one_line_exit_3(read_only_dir, capsys):
    from nestlearn.experiment._cli import EXIT_OPERATING, main

    out = read_only_dir / "run"
    assert (
        main(["run", PERMUTED, *[a for s in TINY for a in ("--set", s)], "--out", str(out)]) == EXIT_OPERATING
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--out" in err, err
