"""Run directories: atomic writes, the resolved config, and results as tidy tables."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nestlearn import metrics
from nestlearn.continual import StreamResult


def atomic_write(path: Path, write: Any, mode: str = "w") -> Path:
    """Writes ``path`` through a temporary file in the same directory and ``os.replace``.

    ``write`` is a string/bytes, or a callable taking the open file. A reader never sees a half-written
    file, and a failure leaves any previous version untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            if callable(write):
                write(f)
            else:
                f.write(write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_result(path: Path, result: StreamResult) -> Path:
    """Saves a :class:`StreamResult` as an ``.npz`` of its arrays (atomically)."""
    arrays = {
        "acc_matrix": result.acc_matrix,
        "acc_init": result.acc_init,
        "curve_steps": result.curve_steps,
        "curve_task": result.curve_task,
        "curve_acc": result.curve_acc,
        "train_loss": result.train_loss,
        **({"train_acc": result.train_acc} if result.train_acc is not None else {}),
        "diverged_step": result.diverged_step,
        "steps_per_task": np.asarray(result.steps_per_task),
        "task_names": np.asarray(result.task_names),
        "runs": np.asarray(json.dumps(list(result.runs))),
        **{f"norm/{k}": v for k, v in (result.norms or {}).items()},
    }
    return atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


def load_result(path: Path) -> StreamResult:
    """Reads a result written by :func:`save_result`."""
    with np.load(path) as z:
        return StreamResult(
            acc_matrix=z["acc_matrix"],
            acc_init=z["acc_init"],
            curve_steps=z["curve_steps"],
            curve_task=z["curve_task"],
            curve_acc=z["curve_acc"],
            train_loss=z["train_loss"],
            train_acc=z["train_acc"] if "train_acc" in z.files else None,
            diverged_step=z["diverged_step"],
            steps_per_task=int(z["steps_per_task"]),
            task_names=tuple(str(n) for n in z["task_names"]),
            runs=tuple(json.loads(str(z["runs"]))) if "runs" in z.files else (),
            norms={k.removeprefix("norm/"): z[k] for k in z.files if k.startswith("norm/")} or None,
        )


def tidy_tables(results: dict[str, StreamResult]) -> dict[str, pd.DataFrame]:
    """Long-format tables of every strategy's results: one row per observation, named columns.

    Every table has a column per key of ``result.runs`` (the seed, and in a sweep the hyperparameters).

    Returns:
      ``accuracy_matrix`` (strategy, seed, trained_task, eval_task, accuracy), ``curves`` (strategy,
      seed, point, step, trained_task, eval_task, accuracy, diverged), ``summary`` (strategy, seed, one
      column per metric of :func:`nestlearn.metrics.summary`, diverged_step). A diverged seed keeps its rows
      with ``diverged`` set, and its summary metrics are NaN, so no average can silently include it.
    """
    acc_rows, curve_frames, summary_rows = [], [], []
    for name, r in results.items():
        s, t = r.acc_matrix.shape[:2]
        run_cols = pd.DataFrame(list(r.runs))
        si, ti, tj = np.meshgrid(np.arange(s), np.arange(t), np.arange(t), indexing="ij")
        acc_rows.append(
            pd.DataFrame(
                {
                    "strategy": name,
                    **{c: run_cols[c].to_numpy()[si.ravel()] for c in run_cols},
                    "trained_task": ti.ravel(),
                    "eval_task": tj.ravel(),
                    "accuracy": r.acc_matrix.ravel(),
                }
            )
        )
        p = r.curve_steps.shape[0]
        si, pi, tj = np.meshgrid(np.arange(s), np.arange(p), np.arange(t), indexing="ij")
        curve_frames.append(
            pd.DataFrame(
                {
                    "strategy": name,
                    **{c: run_cols[c].to_numpy()[si.ravel()] for c in run_cols},
                    "point": pi.ravel(),
                    "step": r.curve_steps[pi.ravel()],
                    "trained_task": r.curve_task[pi.ravel()],
                    "eval_task": tj.ravel(),
                    "accuracy": r.curve_acc.ravel(),
                    "diverged": r.diverged[si.ravel()],
                }
            )
        )
        if t >= 2:
            summ = metrics.summary(r.acc_matrix, r.acc_init)
        else:
            summ = {"average_accuracy": metrics.average_accuracy(r.acc_matrix)}
        for k in range(s):
            row = {"strategy": name, **r.runs[k], "diverged_step": int(r.diverged_step[k])}
            row.update({m: (np.nan if r.diverged[k] else float(v[k])) for m, v in summ.items()})
            summary_rows.append(row)
    return {
        "accuracy_matrix": pd.concat(acc_rows, ignore_index=True),
        "curves": pd.concat(curve_frames, ignore_index=True),
        "summary": pd.DataFrame(summary_rows),
    }


def write_tables(directory: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Writes each table as CSV (atomically); pandas reads them back with ``pd.read_csv``."""
    return [
        atomic_write(Path(directory) / f"{name}.csv", df.to_csv(index=False)) for name, df in tables.items()
    ]
