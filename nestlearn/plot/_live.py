"""Figures of a run in progress, drawn from its live log (``<rundir>/live.jsonl``), and a notebook watcher."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from nestlearn.plot._figures import DOUBLE_COLUMN, _mean_with_band, style

LIVE_FILE = "live.jsonl"  # nestlearn.experiment's name for it (imported lazily: experiment imports plot)


def _read(path: Path) -> list[dict]:
    from nestlearn.experiment._livelog import read_live

    return read_live(path / LIVE_FILE if path.is_dir() else path, arrays=True)


def _records(source: str | os.PathLike | Sequence[dict]) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        return _read(Path(source))
    return [dict(r) for r in source]


def live_series(
    source: str | os.PathLike | Sequence[dict], *, section: str | None = None
) -> dict[str, np.ndarray]:
    """The arrays of a live log's section: training loss per chunk and accuracy per evaluation point.

    Args:
      source: a ``live.jsonl`` path, its run directory, or records from :func:`nestlearn.experiment.read_live`.
      section: which section's lines (``None``: the last section that wrote a line).

    Returns:
      ``{"section", "runs", "chunk_step" [C], "loss" [runs, C], "train_acc" [runs, C],
      "diverged" [runs], "eval_step" [E], "eval_task" [E], "eval_acc" [runs, E, tasks]}``. A run is
      marked diverged if any of its chunk lines says so; its values stay in the arrays.
    """
    records = _records(source)
    if section is None:
        sections = [r.get("section") for r in records if r.get("kind") in ("chunk", "eval")]
        section = sections[-1] if sections else None
    chunks = [r for r in records if r.get("kind") == "chunk" and r.get("section") == section]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("section") == section]
    runs = (chunks or evals or [{"runs": []}])[-1]["runs"]
    n = len(runs) or (len(np.atleast_1d(chunks[-1]["loss"])) if chunks else 0)

    def column(rec: dict, key: str) -> np.ndarray:
        value = rec.get(key)
        out = np.full(n, np.nan)
        if value is not None:
            v = np.asarray([np.nan if x is None else x for x in np.atleast_1d(value)], np.float64)
            out[: min(n, v.size)] = v[:n]
        return out

    diverged = np.zeros(n, bool)
    for r in chunks:
        if r.get("diverged") is not None:
            diverged[: len(r["diverged"])] |= np.asarray(r["diverged"], bool)[:n]
    n_tasks = max((np.asarray(r["acc"]).shape[-1] for r in evals), default=0)
    eval_acc = np.full((n, len(evals), n_tasks), np.nan)
    for e, r in enumerate(evals):
        a = np.asarray(r["acc"], np.float64)
        eval_acc[: a.shape[0], e, : a.shape[1]] = a[:n]
    return {
        "section": section,
        "runs": list(runs),
        "chunk_step": np.asarray([r["step"] for r in chunks], np.int64),
        "loss": np.stack([column(r, "loss") for r in chunks], 1) if chunks else np.zeros((n, 0)),
        "train_acc": np.stack([column(r, "acc") for r in chunks], 1) if chunks else np.zeros((n, 0)),
        "diverged": diverged,
        "eval_step": np.asarray([r["step"] for r in evals], np.int64),
        "eval_task": np.asarray([r.get("task", -1) for r in evals], np.int64),
        "eval_acc": eval_acc,
    }


def live_curves(
    source: str | os.PathLike | Sequence[dict],
    *,
    section: str | None = None,
    task_names: Sequence[str] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Training loss and the forgetting curves of a run so far, from its live log.

    Left: the chunk-mean training loss against the global step, mean over the healthy runs with a band
    of one standard error. Right: the accuracy on each task at every evaluation point logged so far
    (:meth:`nestlearn.experiment.LiveLog.evaluation`), mean over the healthy runs; each task's curve
    starts at the evaluation before its training, as :func:`nestlearn.plot.forgetting_curves` draws it.
    Diverged runs are left out and counted in the title.

    Args:
      source: a ``live.jsonl`` path, its run directory, or records from :func:`nestlearn.experiment.read_live`.
      section: the section to draw (``None``: the latest).
      task_names: legend names of the tasks (default ``task 0``, ``task 1``, ...).
      fig: a figure to redraw into (cleared first), e.g. the one a notebook is showing.

    Returns:
      The figure: ``fig.axes[0]`` the loss, ``fig.axes[1]`` the accuracies.

    Example:
      >>> import tempfile
      >>> from nestlearn.experiment import LiveLog
      >>> with LiveLog(tempfile.mkdtemp(), runs=[0, 1], tensorboard=False) as live:
      ...     _ = live.chunk(step=10, loss=[1.0, 1.2])
      ...     _ = live.evaluation(step=10, acc=[[0.9, 0.1], [0.8, 0.2]], task=0)
      >>> fig = live_curves(live.path)
      >>> fig.axes[1].lines[0].get_ydata()
      array([0.85])
    """
    s = live_series(source, section=section)
    keep = ~s["diverged"]
    with style():
        if fig is None:
            fig = plt.figure(figsize=(DOUBLE_COLUMN, 2.2))
        fig.clear()
        ax_loss, ax_acc = fig.subplots(1, 2)
        if keep.any() and s["chunk_step"].size:
            _mean_with_band(ax_loss, s["chunk_step"], s["loss"][keep], "loss")
        ax_loss.set_xlabel("Training step")
        ax_loss.set_ylabel("Training loss")
        n_tasks = s["eval_acc"].shape[2]
        names = list(task_names) if task_names is not None else [f"task {j}" for j in range(n_tasks)]
        if len(names) < n_tasks:
            raise ValueError(f"{len(names)} task names for {n_tasks} tasks")
        steps, tasks = s["eval_step"], s["eval_task"]
        for j in range(n_tasks):
            # Task j's curve: from the evaluation at the end of task j - 1 (task -1: before training) on.
            sel = np.flatnonzero(tasks >= j - 1)
            if keep.any() and sel.size:
                mean = np.nanmean(s["eval_acc"][keep][:, sel, j], 0)
                ax_acc.plot(steps[sel], mean, marker="o", markersize=2, label=names[j])
        ax_acc.set_ylim(0, 1)
        ax_acc.set_xlabel("Training step")
        ax_acc.set_ylabel("Accuracy")
        if n_tasks:
            ax_acc.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        title = s["section"] or "run"
        if (~keep).any():
            title += f" · {int((~keep).sum())} of {keep.size} runs diverged (excluded)"
        fig.suptitle(title)
    return fig


def watch_live(
    source: str | os.PathLike,
    *,
    every: float = 5.0,
    section: str | None = None,
    until: Callable[[], bool] | None = None,
    timeout: float | None = None,
    task_names: Sequence[str] | None = None,
) -> Figure:
    """Redraws :func:`live_curves` in a Jupyter output cell every ``every`` seconds while a run writes its log.

    Run it in a notebook cell while the run goes in another process (or a background thread): the figure
    updates in place (IPython ``display(..., display_id=True)``). It stops when the log's last line is
    the ``end`` line :meth:`nestlearn.experiment.LiveLog.close` writes, when ``until()`` returns true,
    after ``timeout`` seconds, or on interrupt (the kernel's stop button).

    Returns:
      The last figure drawn.
    """
    from IPython.display import display

    path = Path(source)
    path = path / LIVE_FILE if path.is_dir() else path
    start = time.monotonic()
    fig = plt.figure(figsize=(DOUBLE_COLUMN, 2.2))
    handle = None
    try:
        while True:
            records = _read(path) if path.exists() else []
            if records:
                live_curves(records, section=section, task_names=task_names, fig=fig)
                handle = display(fig, display_id=True) if handle is None else handle
                handle.update(fig)
            done = bool(records) and records[-1].get("kind") == "end"
            if (
                done
                or (until is not None and until())
                or (timeout is not None and time.monotonic() - start > timeout)
            ):
                break
            time.sleep(every)
    except KeyboardInterrupt:
        pass
    plt.close(fig)
    return fig
