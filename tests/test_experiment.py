"""The CLI and run directories: clear one-line errors that write nothing, tidy tables, exact resume."""

import dataclasses
import gzip
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pandas as pd
import pytest
from conftest import xla_flags

from nestlearn import ConfigError, continual, metrics, nn, tasks
from nestlearn.experiment import (
    ExperimentConfig,
    RunDir,
    from_dict,
    load_result,
    override,
    read_live,
    run_experiment,
    run_study,
)
from nestlearn.experiment._cli import main

REPO = Path(__file__).resolve().parents[1]
# A small permuted-MNIST run: 4 tasks x 2 strategies, 2 seeds, a narrow MLP.
SMALL = [
    "--set", "data.n_tasks=4", "--set", "seeds=2", "--set", "model.hidden=32",
    "--set", "train.epochs=1", "--set", "train.evals_per_task=2",
]  # fmt: skip


def cli(args, capsys):
    rc = main(["run", "permuted_mnist_forgetting", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["train.batch_size=abc"], "train.batch_size: expected an integer, got 'abc'"),
        (["optim.lr=0"], "optim.lr must be positive, got 0.0"),
        (["optim.lr=-0.1"], "optim.lr must be positive"),
        (["train.batch_size=0"], "train.batch_size must be positive, got 0"),
        (["train.steps_per_task=-5"], "train.steps_per_task must be positive"),
        (["train.epochs=0"], "train.epochs must be positive"),
        (["seeds=0"], "seeds must be positive"),
        (["strategies=naive,ewk"], "strategies: 'ewk' is not one of 'naive', 'joint', 'ewc'"),
        (["data.stream=split_mnist", "data.n_tasks=6"], "n_tasks"),
        (["optim.reset_per_task=maybe"], "optim.reset_per_task: expected true or false"),
        # Checked by the learner before the run directory is made: strengths and sweeps of every strategy.
        (["strategies=naive,ewc", "ewc.lam=-5"], "EWC.lam must be finite and non-negative, got -5.0"),
        (["strategies=ewc", "ewc.lam=nan"], "ewc.lam must be a finite number, got nan"),
        (["strategies=si", "sweep.si=1,-1"], "SI.c must be finite and non-negative, got -1.0"),
    ],
)
def test_bad_config_gets_one_line_error_and_writes_nothing(tmp_path, capsys, sets, expected):
    out = tmp_path / "run"
    rc, err = cli([*[a for s in sets for a in ("--set", s)], "--out", str(out)], capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("nestlearn: error: ") and expected in err[0]
    assert not out.exists()


def test_task_count_error_names_the_allowed_range(tmp_path, capsys):
    rc, err = cli(
        ["--set", "data.stream=split_mnist", "--set", "data.n_tasks=6", "--out", str(tmp_path / "r")], capsys
    )
    assert rc == 2 and "6" in err[0] and "5" in err[0]


def write_idx(path: Path, array: np.ndarray, *, truncate: int = 0) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def test_missing_idx_file_is_named(tmp_path, capsys):
    idx = tmp_path / "mnist"
    idx.mkdir()
    rng = np.random.default_rng(0)
    write_idx(idx / "train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)))
    write_idx(idx / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(idx / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)))
    rc, err = cli(["--set", f"data.mnist_path={idx}", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "t10k-labels-idx1-ubyte" in err[0] and len(err) == 1
    assert not (tmp_path / "run").exists()


def test_corrupt_idx_file_is_named(tmp_path, capsys):
    idx = tmp_path / "mnist"
    idx.mkdir()
    rng = np.random.default_rng(0)
    write_idx(idx / "train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)), truncate=100)
    write_idx(idx / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(idx / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)))
    (idx / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(10))
    )
    rc, err = cli(["--set", f"data.mnist_path={idx}", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "train-images-idx3-ubyte" in err[0] and len(err) == 1
    assert not (tmp_path / "run").exists()


def test_existing_directory_needs_resume_or_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = cli(["--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err[0] and "--resume" in err[0] and "--force" in err[0]
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_experiment_lists_the_known_ones(capsys):
    assert main(["run", "no_such_experiment"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no_such_experiment'" in err and "permuted_mnist_forgetting" in err


def test_run_directory_holds_config_tables_arrays_and_figures(tmp_path):
    config = override(
        ExperimentConfig(),
        ["data.stream=split_digits", "data.scenario=task", "data.n_tasks=3", "seeds=2", "model.hidden=16",
         "train.steps_per_task=12", "train.batch_size=16", "train.evals_per_task=3"],
    )  # fmt: skip
    out = run_experiment(config, tmp_path / "run", experiment="test", log=lambda m: None)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert from_dict(ExperimentConfig, stored["config"]) == config
    for name in ("naive", "joint"):
        r = load_result(tmp_path / "run" / "results" / f"{name}.npz")
        np.testing.assert_array_equal(r.acc_matrix, out.results[name].acc_matrix)
        table = pd.read_csv(out.tables["accuracy_matrix"]).query("strategy == @name")
        pivot = table.pivot_table(index=["seed", "trained_task"], columns="eval_task", values="accuracy")
        np.testing.assert_allclose(pivot.to_numpy().reshape(2, 3, 3), r.acc_matrix, atol=1e-6)
        summary = pd.read_csv(out.tables["summary"]).query("strategy == @name").sort_values("seed")
        np.testing.assert_allclose(
            summary["backward_transfer"], metrics.backward_transfer(r.acc_matrix), atol=1e-6
        )
        np.testing.assert_allclose(
            summary["forward_transfer"], metrics.forward_transfer(r.acc_matrix, r.acc_init), atol=1e-6
        )
        curves = pd.read_csv(out.tables["curves"]).query("strategy == @name")
        # 1 point before training + 3 per task (steps 4, 8, 12 of each task), 3 tasks evaluated at each.
        assert len(curves) == 2 * (1 + 3 * 3) * 3
        assert sorted(curves["step"].unique()) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    names = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    for stem in ("forgetting_curves", "average_accuracy", "accuracy_matrix_naive", "accuracy_matrix_joint"):
        assert f"{stem}.pdf" in names and f"{stem}.png" in names
    assert json.loads((tmp_path / "run" / "status.json").read_text())["complete"] is True
    # The live log, written as the run went: per strategy a section of lines, one per chunk (3 per task,
    # at the global steps of the curve), and the accuracy of every run on every task after each task.
    lines = read_live(tmp_path / "run" / "live.jsonl", arrays=True)
    assert lines[-1]["kind"] == "end"
    for name in ("naive", "joint"):
        mine = [x for x in lines if x.get("section") == name]
        assert [x["step"] for x in mine if x["kind"] == "chunk"] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
        evals = [x for x in mine if x["kind"] == "eval"]
        assert [x["step"] for x in evals] == [0, 12, 24, 36]
        np.testing.assert_allclose(evals[0]["acc"], out.results[name].acc_init, atol=1e-6)
        for t in range(3):
            np.testing.assert_allclose(evals[t + 1]["acc"], out.results[name].acc_matrix[:, t], atol=1e-6)


def test_resume_with_a_different_config_is_refused(tmp_path):
    config = override(ExperimentConfig(), ["data.stream=split_digits", "data.n_tasks=2", "seeds=1",
                                           "train.steps_per_task=4", "strategies=naive"])  # fmt: skip
    run_experiment(config, tmp_path / "run", log=lambda m: None, make_figures=False)
    changed = override(config, ["optim.lr=0.5"])
    with pytest.raises(Exception, match=r"optim.lr \(0.01 stored, 0.5 now\)"):
        run_experiment(changed, tmp_path / "run", resume=True, log=lambda m: None)


def _cli_process(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "nestlearn.experiment._cli",
        "run",
        "permuted_mnist_forgetting",
        *SMALL,
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished_checkpoints(out: Path) -> list[int]:
    # Finished = Orbax's step directory and its manifest (written just after Orbax's rename): a kill in
    # between leaves an unfinished checkpoint, which a resume sets aside as damaged.
    ckpt = out / "checkpoints"
    return (
        sorted(
            int(p.name)
            for p in ckpt.iterdir()
            if p.name.isdigit() and (p / "nestlearn-manifest.json").exists()
        )
        if ckpt.is_dir()
        else []
    )


def test_sigkill_mid_stream_then_resume_gives_identical_results(tmp_path):
    reference = _cli_process(tmp_path / "ref")
    killed = _cli_process(tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 2 for s in _finished_checkpoints(tmp_path / "killed")):
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = _finished_checkpoints(tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL and 2 <= max(done) < 8, done  # 8 = 4 tasks x 2 strategies
    assert not (tmp_path / "killed" / "status.json").exists()

    resumed = _cli_process(tmp_path / "killed", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed after task {max(done) % 4 or 4}/4" in err or "already complete" in err
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err
    for name in ("naive", "joint"):
        a = np.load(tmp_path / "ref" / "results" / f"{name}.npz")
        b = np.load(tmp_path / "killed" / "results" / f"{name}.npz")
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ref" / "results" / "curves.csv"),
        pd.read_csv(tmp_path / "killed" / "results" / "curves.csv"),
    )


def test_strategy_sections_and_a_sweep_in_one_program(tmp_path):
    config = override(
        ExperimentConfig(),
        ["data.stream=split_digits", "data.scenario=task", "data.n_tasks=2", "seeds=2", "model.hidden=16",
         "train.steps_per_task=10", "train.batch_size=16", "train.evals_per_task=1", "strategies=naive,ewc",
         "sweep.ewc=0,1000", "ewc.fisher_samples=64"],
    )  # fmt: skip
    out = run_experiment(config, tmp_path / "run", log=lambda m: None, make_figures=False)
    ewc = out.results["ewc"]
    assert [r["lam"] for r in ewc.runs] == [0.0, 0.0, 1000.0, 1000.0]
    # EWC with lam = 0 is naive fine-tuning: same seeds, same accuracy matrices.
    np.testing.assert_allclose(ewc.select(lam=0.0).acc_matrix, out.results["naive"].acc_matrix, atol=1e-6)
    assert not np.allclose(ewc.select(lam=1000.0).acc_matrix, out.results["naive"].acc_matrix)
    summary = pd.read_csv(out.tables["summary"])
    assert sorted(summary.query("strategy == 'ewc'")["lam"].unique()) == [0.0, 1000.0]


def test_a_sweep_of_a_strategy_not_run_is_refused(capsys):
    rc, err = cli(["--set", "sweep.ewc=1,10", "--set", "strategies=naive"], capsys)
    assert rc == 2 and "sweep.ewc is set but 'ewc' is not in strategies" in err[0]


SCRIPTS = [
    "loss_of_plasticity", "orthogonal_regression", "maml_sinusoid", "maml_continual", "memory_recall", "cms_streams",
]  # fmt: skip
LOP_TINY = ["--set", "steps=200", "--set", "bin=100", "--set", "seeds=0"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_key_of_a_script_experiment_is_named_and_nothing_written(tmp_path, capsys, name):
    out = tmp_path / "run"
    assert main(["run", name, "--set", "no_such_key=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nestlearn: error: unknown config key 'no_such_key'"), err
    assert not out.exists()


def test_set_and_quick_on_a_script_experiment_change_its_config(tmp_path, capsys):
    out = tmp_path / "run"
    # --quick applies the experiment's QUICK overrides (bin 4000, seeds 0,1), then --set wins over them
    assert main(["run", "loss_of_plasticity", "--quick", *LOP_TINY, "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["experiment"] == "loss_of_plasticity" and stored["quick"] is True
    assert stored["config"] == {"steps": 200, "bin": 100, "seeds": [0]}
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is True and status["quick"] is True
    table = pd.read_csv(out / "results" / "online_regression.csv")
    assert sorted(table["bin_end"].unique()) == [100, 200] and table["seed"].unique().tolist() == [0]
    assert len(table) == 3 * 2  # 3 methods x 2 bins x 1 seed
    assert (out / "figures" / "loss_of_plasticity.pdf").exists()
    # a bad value is named; so is a resume that changes the config
    capsys.readouterr()
    assert (
        main(["run", "loss_of_plasticity", "--set", "bin=300", *LOP_TINY[:2], "--out", str(tmp_path / "x")])
        == 2
    )
    assert "steps (200) must be a positive multiple of bin (300)" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "loss_of_plasticity",
                "--quick",
                *LOP_TINY,
                "--set",
                "seeds=0,1",
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 2
    )
    assert "seeds ([0] stored, [0, 1] now)" in capsys.readouterr().err


def _script_process(name: str, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NESTLEARN_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "nestlearn.experiment._cli", "run", name, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # a minute of subprocesses; the continual run's SIGKILL drill above stays in `make test`
def test_sigkill_of_a_script_experiment_then_resume_gives_identical_results(tmp_path):
    sets = ["--quick", "--set", "steps=2000", "--set", "bin=100", "--set", "seeds=0,1"]  # 20 bins per method
    reference = _script_process("loss_of_plasticity", tmp_path / "ref", *sets)
    killed = _script_process("loss_of_plasticity", tmp_path / "killed", *sets)
    second = tmp_path / "killed" / "checkpoints" / "continual_backprop"  # the second of three methods
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 3 for s in _finished_checkpoints_in(second)):
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = max(_finished_checkpoints_in(second))
    assert killed.returncode == -signal.SIGKILL and 3 <= done < 20, done
    assert not (tmp_path / "killed" / "status.json").exists()

    resumed = _script_process("loss_of_plasticity", tmp_path / "killed", *sets, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "[backprop] resuming after bin 20/20" in err and "[continual_backprop] resuming after bin" in err
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err
    a = np.load(tmp_path / "ref" / "results" / "online_regression.npz")
    b = np.load(tmp_path / "killed" / "results" / "online_regression.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ref" / "results" / "online_regression.csv"),
        pd.read_csv(tmp_path / "killed" / "results" / "online_regression.csv"),
    )


def _finished_checkpoints_in(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A study's own config: a narrow MLP of its own on split digits, two strategies, a few steps."""

    hidden: int = 8
    seeds: tuple[int, ...] = (0, 1)
    steps_per_task: int = 6


def study(config: StudyConfig, rundir: RunDir) -> None:
    """A study in Python: its own model and strategies, writing a run directory as the CLI does."""
    stream = tasks.split_digits("task", 2, seed=0)

    def model(rngs):
        return nn.MLP(stream.input_dim, (config.hidden,), stream.n_classes, rngs=rngs)

    train = continual.TrainConfig(steps_per_task=config.steps_per_task, batch_size=8, evals_per_task=2)
    results = {}
    for name, strategy in (("naive", continual.Naive()), ("joint", continual.Joint())):
        if rundir.done(name):
            results[name] = rundir.load_result(name)
            continue
        results[name] = continual.Learner(model, optax.sgd(0.1), strategy, train).run(
            stream, list(config.seeds)
        )
        rundir.save_result(name, results[name])
        rundir.mark_done(name)
    rundir.write_tidy_tables(results)
    rundir.mark_complete(strategies=list(results))


def make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "paper" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_python_study_writes_a_run_directory_that_paper_figures_read(tmp_path, capsys):
    runs = tmp_path / "runs"
    rundir = run_study(study, StudyConfig(), runs / "permuted_mnist_forgetting", experiment="my_study")
    assert (
        rundir.complete
        and not rundir.quick
        and rundir.config == {"hidden": 8, "seeds": [0, 1], "steps_per_task": 6}
    )
    summary = rundir.read_table("summary")
    assert sorted(summary["strategy"].unique()) == ["joint", "naive"] and sorted(summary["seed"]) == [
        0,
        0,
        1,
        1,
    ]
    # resume: the config must match, and finished parts are read back, not retrained
    with pytest.raises(ConfigError, match=r"hidden \(8 stored, 16 now\)"):
        run_study(study, StudyConfig(hidden=16), rundir.path, resume=True)
    before = rundir.load_result("naive").acc_matrix
    with pytest.raises(ConfigError, match="already exists"):
        run_study(study, StudyConfig(), rundir.path)
    run_study(study, StudyConfig(), rundir.path, resume=True)
    np.testing.assert_array_equal(rundir.load_result("naive").acc_matrix, before)
    # the paper script reads it like a CLI run
    figures = make_figures()
    only = ["--runs", str(runs), "--out", str(tmp_path / "figs"), "--only", "01_permuted_forgetting_curves"]
    assert figures.main(only) == 0
    assert (tmp_path / "figs" / "01_permuted_forgetting_curves.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_quick_run_is_refused_by_the_paper_script_unless_allowed(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_study(study, StudyConfig(), runs / "permuted_mnist_forgetting", experiment="x", quick=True)
    assert RunDir(runs / "permuted_mnist_forgetting").quick
    figures = make_figures()
    only = ["--runs", str(runs), "--only", "01_permuted_forgetting_curves"]
    assert figures.main([*only, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "is a --quick run" in err and "--allow-quick" in err
    assert not (tmp_path / "refused" / "01_permuted_forgetting_curves.pdf").exists()
    assert figures.main([*only, "--out", str(tmp_path / "allowed"), "--allow-quick"]) == 0
    assert (tmp_path / "allowed" / "01_permuted_forgetting_curves.pdf").exists()
