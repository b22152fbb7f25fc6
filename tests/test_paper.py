"""paper/make_figures.py rebuilds figures from stored results only, and names what is missing."""

import importlib.util
from pathlib import Path

import jax
import pytest

from nestlearn import continual
from nestlearn.experiment import (
    ExperimentConfig,
    RunDir,
    load_experiment,
    override,
    run_experiment,
    run_study,
)

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.stream=split_digits", "data.n_tasks=2", "seeds=2", "model.hidden=8", "train.steps_per_task=4",
        "train.batch_size=8", "train.evals_per_task=2"]  # fmt: skip


def load(path: Path):
    """An experiment file, or (not one) the paper script."""
    if path.parent.name == "experiments":
        return load_experiment(str(path))[1]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet(message):
    del message


def script(runs: Path, name: str, sets: list[str]) -> RunDir:
    """Runs a script experiment at a tiny size through the public API, as the CLI does."""
    module = load(REPO / "experiments" / f"{name}.py")
    config = override(module.CONFIG, sets)
    return run_study(module.run, config, runs / name, experiment=name, log=quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for name in ("permuted_mnist_forgetting", "split_mnist_task_forgetting", "split_mnist_class_forgetting"):
        run_experiment(
            override(ExperimentConfig(), TINY), runs / name, experiment=name, log=quiet, make_figures=False
        )
    sweep = override(ExperimentConfig(), [*TINY, "strategies=naive,joint,l2init", "sweep.l2init=0.001,0.1"])
    run_experiment(
        sweep, runs / "stability_plasticity", experiment="stability_plasticity", log=quiet, make_figures=False
    )
    script(runs, "loss_of_plasticity", ["steps=200", "seeds=0,1", "bin=100"])
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam raises a float to its int32 step count
        k10 = "runs=maml/k10,fomaml/k10,reptile/k10,metasgd/k10,pretrained/k10"
        script(runs, "maml_sinusoid", ["n_iters=4", "chunk=2", "seeds=0,1", k10])
        script(runs, "maml_continual", ["n_iters=2", "seeds=0,1"])
    write_memory_recall_results(runs / "memory_recall")
    write_zoo_and_passkey_results(runs)
    write_hope_b_results(runs)
    return runs


def write_hope_b_results(runs: Path) -> None:
    """Result tables in context_switch's and char_lm's layouts (tests/test_hope_experiments_b.py runs them)."""
    import json

    import pandas as pd

    models = ("hope", "transformer")
    results = runs / "context_switch" / "results"
    results.mkdir(parents=True)
    rows = [{"model": m, "seed": s, "params": 1000, "width": 8, "acc_old": 0.2 + 0.1 * s, "acc_new": 0.9,
             "diverged_step": -1} for m in models for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "context_switch.csv", index=False)
    rows = [{"model": m, "seed": s, "step": t, "acc_old": 0.1 * t, "acc_new": 0.2 * t}
            for m in models for s in (0, 1) for t in (0, 1, 2)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "context_switch_curves.csv", index=False)
    (runs / "context_switch" / "status.json").write_text(json.dumps({"complete": True, "values": 6}))
    results = runs / "char_lm" / "results"
    results.mkdir(parents=True)
    rows = [{"model": m, "seed": s, "width": 8, "params": 1000, "val_bpc": 3.0, "val_ppl": 8.0, "windows": 8,
             "diverged_step": -1} for m in models for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "char_lm.csv", index=False)
    rows = [{"model": m, "seed": s, "position": p, "bpc": 3.0 - p / 64} for m in models for s in (0, 1)
            for p in (0, 32)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "char_lm_positions.csv", index=False)
    rows = [{"model": m, "seed": s, "step": t, "train_bpc": 4.0 - t / 100} for m in models for s in (0, 1)
            for t in (100, 200)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "char_lm_curves.csv", index=False)
    (runs / "char_lm" / "status.json").write_text(json.dumps({"complete": True}))


def write_memory_recall_results(directory: Path) -> None:
    """Result tables in memory_recall's layout (its training is minutes per model, too slow here)."""
    import json

    import pandas as pd

    results = directory / "results"
    results.mkdir(parents=True)
    rows = [{"model": m, "width": w, "length": length, "pairs": p, "state_size": w * w * (length if m == "transformer" else 1),
             "seed": s, "eval_acc": 0.5 + 0.1 * s, "diverged_step": -1}
            for m in ("transformer", "deltanet") for w in (16, 32) for length, p in ((64, 4), (128, 8)) for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "mqar.csv", index=False)
    rows = [{"model": m, "width": 32, "seed": s, "acc_reassigned": 0.3, "acc_untouched": 0.6, "diverged_step": -1}
            for m in ("linear_attention", "deltanet") for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "forgetting.csv", index=False)
    rows = [{"model": m, "seed": s, "step": t, "acc_a": 0.5, "acc_b": 0.1 * t / 50}
            for m in ("transformer", "hope_cms_off") for s in (0, 1) for t in (0, 50, 100)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "languages.csv", index=False)
    rows = [{"model": m, "seed": s, "a_after_a": 0.5, "a_after_b": 0.3, "b_after_b": 0.5, "optimal_a": 0.7,
             "optimal_b": 0.7, "diverged_step": -1} for m in ("transformer", "hope_cms_off") for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(results / "languages_summary.csv", index=False)
    (directory / "status.json").write_text(json.dumps({"complete": True}))


def write_zoo_and_passkey_results(runs: Path) -> None:
    """Result tables in memory_zoo's and passkey's layouts (their training is minutes per model)."""
    import json

    import pandas as pd

    for name in ("memory_zoo", "passkey"):
        (runs / name / "results").mkdir(parents=True)
        (runs / name / "status.json").write_text(json.dumps({"complete": True}))
    rows = [{"task": t, "model": m, "seed": s, "learning_rate": 0.01, "acc": 0.5 + 0.1 * s, "acc_once": 0.6,
             "acc_rewritten": float("nan") if t == "mqar" else 0.3, "diverged_step": -1, "state_size": 1600,
             "params": 30000, "d_model": 32, "heads": 2, "memory_hidden": 0, "state_grows": False}
            for t in ("mqar", "forgetting_mqar") for m in ("deltanet", "hope") for s in (0, 1)]  # fmt: skip
    pd.DataFrame(rows).to_csv(runs / "memory_zoo" / "results" / "zoo.csv", index=False)
    rows = [{"task": t, "model": m, "seed": s, "learning_rate": 0.01, "train_length": 32, "factor": f,
             "eval_length": 32 * f, "acc": 0.9 / f, "diverged_step": -1, "state_size": 1600,
             "state_size_at_length": 1600 * f}
            for t in ("multikey", "passkey") for m in ("deltanet", "transformer") for s in (0, 1) for f in (1, 2, 4)]  # fmt: skip
    pd.DataFrame(rows).to_csv(runs / "passkey" / "results" / "passkey.csv", index=False)


@pytest.mark.slow  # its fixture runs every experiment at quick size (minutes): `make test-all` runs it
def test_every_figure_is_built_from_stored_results_without_training(runs, tmp_path, monkeypatch):
    module = load(REPO / "paper" / "make_figures.py")
    monkeypatch.setattr(continual.Learner, "run", lambda *a, **k: pytest.fail("make_figures must not train"))
    monkeypatch.setattr(
        continual.Learner, "run_task", lambda *a, **k: pytest.fail("make_figures must not train")
    )
    monkeypatch.setattr(continual, "run_online_regression", lambda *a, **k: pytest.fail("must not train"))
    assert module.main(["--runs", str(runs), "--out", str(tmp_path / "figs")]) == 0
    assert len(module.FIGURES) == 16
    for name in module.FIGURES:
        pdf = tmp_path / "figs" / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-", name


def test_a_missing_run_is_named_with_the_command_that_produces_it(tmp_path, capsys):
    module = load(REPO / "paper" / "make_figures.py")
    partial = tmp_path / "runs"  # one experiment's run only (the `runs` fixture trains them all: minutes)
    run_experiment(
        override(ExperimentConfig(), TINY), partial / "permuted_mnist_forgetting",
        experiment="permuted_mnist_forgetting", log=quiet, make_figures=False,
    )  # fmt: skip
    assert module.main(["--runs", str(partial), "--out", str(tmp_path / "figs")]) == 1
    err = capsys.readouterr().err
    assert "'split_mnist_task_forgetting'" in err and "nestlearn run split_mnist_task_forgetting" in err
    assert "nestlearn run loss_of_plasticity" in err and "nestlearn run stability_plasticity" in err
    assert "nestlearn run maml_sinusoid" in err and "nestlearn run maml_continual" in err
    assert (tmp_path / "figs" / "01_permuted_forgetting_curves.pdf").exists()  # the others were still built
    assert not (tmp_path / "figs" / "01_split_mnist_task_vs_class.pdf").exists()
