"""Rebuilds every paper figure from stored results, without retraining.

    python paper/make_figures.py [--runs RUNS_DIR] [--out paper/figures] [--allow-quick]

Each figure reads the run directory of the experiment that produces it, ``RUNS_DIR/<experiment>/``
(what ``nestlearn run <experiment>`` writes by default, or a study through
``nestlearn.experiment.RunDir``), and writes a PDF into ``paper/figures/``. A missing or unfinished run
is an error naming the experiment and the command that produces it; so is a ``--quick`` run, unless
``--allow-quick`` is given. Figures whose results are present are still written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from nestlearn import plot  # noqa: E402
from nestlearn.continual import StreamResult  # noqa: E402
from nestlearn.experiment import RunDir, load_experiment, load_result, swept_key  # noqa: E402

HERE = Path(__file__).resolve().parent


class MissingResults(Exception):
    """The stored results a figure needs are not there (or are those of a quick run)."""


ALLOW_QUICK = False  # set by --allow-quick: figures may be drawn from --quick runs


def finished_run(runs: Path, experiment: str) -> Path:
    """The run directory of a finished, full-size run of ``experiment``, or an error naming how to produce it."""
    rundir = RunDir(runs / experiment)
    if not rundir.complete:
        raise MissingResults(
            f"no finished results of experiment {experiment!r} in {rundir.path}; "
            f"produce them with: nestlearn run {experiment} --out {rundir.path}"
        )
    if rundir.quick and not ALLOW_QUICK:
        raise MissingResults(
            f"the run of {experiment!r} in {rundir.path} is a --quick run; pass --allow-quick to draw from it, "
            f"or produce the full results with: nestlearn run {experiment} --out {rundir.path} --force"
        )
    return rundir.path


def results_of(runs: Path, experiment: str) -> dict[str, StreamResult]:
    """The per-strategy results of a finished run of ``experiment`` under ``runs``."""
    directory = finished_run(runs, experiment)
    names = json.loads((directory / "status.json").read_text())["strategies"]
    return {name: load_result(directory / "results" / f"{name}.npz") for name in names}


def forgetting_panels(results: dict[str, StreamResult], titles: dict[str, str]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(titles), figsize=(plot.DOUBLE_COLUMN, 2.4), sharey=True, squeeze=False)
    for k, (ax, (name, title)) in enumerate(zip(axes[0], titles.items())):
        plot.forgetting_curves(results[name], ax=ax, legend=k == len(titles) - 1)
        ax.set_title(title)
    return fig


def fig_permuted_forgetting(runs: Path) -> plt.Figure:
    results = results_of(runs, "permuted_mnist_forgetting")
    return forgetting_panels(results, {"naive": "Naive fine-tuning", "joint": "Joint training"})


def fig_permuted_average(runs: Path) -> plt.Figure:
    results = results_of(runs, "permuted_mnist_forgetting")
    fig, ax = plt.subplots(figsize=(plot.SINGLE_COLUMN, 2.4))
    for name, r in results.items():
        plot.average_accuracy_curve(r, ax=ax, label=name)
    ax.legend()
    return fig


def fig_permuted_matrices(runs: Path) -> plt.Figure:
    results = results_of(runs, "permuted_mnist_forgetting")
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.9))
    for ax, name in zip(axes, ("naive", "joint")):
        r = results[name]
        plot.accuracy_matrix(r.acc_matrix[~r.diverged], ax=ax, task_names=r.task_names, title=name)
    return fig


def fig_split_scenarios(runs: Path) -> plt.Figure:
    task = results_of(runs, "split_mnist_task_forgetting")
    klass = results_of(runs, "split_mnist_class_forgetting")
    fig, axes = plt.subplots(1, 2, figsize=(plot.DOUBLE_COLUMN, 2.4), sharey=True)
    plot.forgetting_curves(task["naive"], ax=axes[0], legend=False)
    axes[0].set_title("Split MNIST, task-incremental (naive)")
    plot.forgetting_curves(klass["naive"], ax=axes[1])
    axes[1].set_title("Split MNIST, class-incremental (naive)")
    return fig


def fig_stability_plasticity(runs: Path) -> plt.Figure:
    from nestlearn import metrics

    results = results_of(runs, "stability_plasticity")
    swept = {name: swept_key(r) for name, r in results.items() if swept_key(r)}
    fig, ax = plt.subplots(figsize=(plot.DOUBLE_COLUMN * 0.7, 3.4))
    plot.stability_plasticity(metrics.tradeoff_points(results, swept=swept), ax=ax)
    return fig


def experiment_module(name: str):
    """The experiment file ``experiments/<name>.py``, whose figure functions read stored results."""
    return load_experiment(str(HERE.parent / "experiments" / f"{name}.py"))[1]


def fig_loss_of_plasticity(runs: Path) -> plt.Figure:
    directory = finished_run(runs, "loss_of_plasticity")
    return experiment_module("loss_of_plasticity").figure(directory / "results" / "online_regression.npz")


def fig_maml_adaptation(runs: Path) -> plt.Figure:
    directory = finished_run(runs, "maml_sinusoid")
    return experiment_module("maml_sinusoid").adaptation_figure(directory / "results" / "adaptation.npz")


def fig_maml_fits(runs: Path) -> plt.Figure:
    directory = finished_run(runs, "maml_sinusoid")
    return experiment_module("maml_sinusoid").fits_figure(directory / "results" / "adaptation.npz")


def fig_maml_continual(runs: Path) -> plt.Figure:
    directory = finished_run(runs, "maml_continual")
    module = experiment_module("maml_continual")
    return module.figure({name: load_result(directory / "results" / f"{name}.npz") for name in module.STARTS})


def fig_memory(part: str) -> Callable[[Path], plt.Figure]:
    def make(runs: Path) -> plt.Figure:
        directory = finished_run(runs, "memory_recall")
        return getattr(experiment_module("memory_recall"), f"{part}_figure")(directory / "results")

    return make


def fig_experiment(experiment: str) -> Callable[[Path], plt.Figure]:
    """The figure an experiment file draws with its ``figure(results)`` from a finished run."""

    def make(runs: Path) -> plt.Figure:
        directory = finished_run(runs, experiment)
        return experiment_module(experiment).figure(directory / "results")

    return make


def fig_context_switch(runs: Path) -> plt.Figure:
    """The in-context regime switch (issue 12, 6c): old- and new-regime recall per model."""
    directory = finished_run(runs, "context_switch")
    values = json.loads((directory / "status.json").read_text()).get("values")
    return experiment_module("context_switch").figure(directory / "results", values)


def fig_char_lm(runs: Path) -> plt.Figure:
    """The character-level language model (issue 12, 6d): bits per character against context position."""
    directory = finished_run(runs, "char_lm")
    return experiment_module("char_lm").figure(directory / "results")


FIGURES: dict[str, Callable[[Path], plt.Figure]] = {
    "01_permuted_forgetting_curves": fig_permuted_forgetting,
    "01_permuted_average_accuracy": fig_permuted_average,
    "01_permuted_accuracy_matrices": fig_permuted_matrices,
    "01_split_mnist_task_vs_class": fig_split_scenarios,
    "02_stability_plasticity": fig_stability_plasticity,
    "03_loss_of_plasticity": fig_loss_of_plasticity,
    "04_maml_adaptation": fig_maml_adaptation,
    "04_maml_fits": fig_maml_fits,
    "04_maml_continual": fig_maml_continual,
    "06_mqar_state_size": fig_memory("mqar"),
    "06_forgetting_mqar": fig_memory("forgetting"),
    "06_two_languages": fig_memory("languages"),
    "06_memory_zoo": fig_experiment("memory_zoo"),
    "06_passkey": fig_experiment("passkey"),
    "07_context_switch": fig_context_switch,
    "07_char_lm": fig_char_lm,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder holding one run directory per experiment"
    )
    p.add_argument("--out", type=Path, default=HERE / "figures")
    p.add_argument("--only", nargs="*", default=None, help="names of the figures to build (default: all)")
    p.add_argument("--allow-quick", action="store_true", help="draw figures from --quick runs too")
    args = p.parse_args(argv)
    global ALLOW_QUICK
    ALLOW_QUICK = args.allow_quick
    missing = []
    for name, make in FIGURES.items():
        if args.only and name not in args.only:
            continue
        try:
            with plot.style():
                fig = make(args.runs)
                plot.save_figure(fig, args.out / name, formats=("pdf",))
                plt.close(fig)
            print(f"wrote {args.out / name}.pdf")
        except MissingResults as e:
            missing.append(f"{name}: {e}")
    for line in missing:
        print(f"make_figures: error: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
