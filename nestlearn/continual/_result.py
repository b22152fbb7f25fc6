"""What a run of a stream returns: accuracy matrices and step-resolved curves, as numpy arrays."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """Results of running one stream for ``S`` seeds (or sweep points).

    Attributes:
      acc_matrix: ``R[s, i, j]``, accuracy on task ``j`` after training task ``i``, ``[S, T, T]``.
      acc_init: accuracy on each task before any training, ``b[s, j]``, ``[S, T]``.
      curve_steps: global training step of each evaluation point, ``[P]``; the first point is step 0
        (before training), then at the configured points inside each task and once at each task's end.
      curve_task: the task being trained at each point, ``[P]`` (``-1`` for the point before training).
      curve_acc: accuracy on every task at every point, ``[S, P, T]``.
      train_loss: mean training loss between consecutive evaluation points, ``[S, P]`` (NaN at point 0).
      train_acc: mean accuracy on the training batches over the same spans, each batch scored before
        the update it drives (online accuracy, the plasticity measure of online streams), ``[S, P]``.
      diverged_step: first global step whose loss or update was NaN or inf (or whose loss passed the
        blow-up threshold), ``-1`` if the run stayed healthy, ``[S]``. A diverged run's accuracies from
        that step on are NaN: it has no score.
      steps_per_task: number of optimizer steps on each task.
      task_names: one name per task.
      runs: what distinguishes each row: its seed and, in a sweep, its hyperparameter values.
      norms: telemetry per span between evaluation points, ``[S, P]`` each (NaN at point 0 and after a
        run diverged): ``"param_norm"``, the global L2 norm of the parameters at the span's end, and
        ``"chunk_update_norm"``, the norm of the parameters' change over the span; ``None`` when not
        recorded.
    """

    acc_matrix: np.ndarray
    acc_init: np.ndarray
    curve_steps: np.ndarray
    curve_task: np.ndarray
    curve_acc: np.ndarray
    train_loss: np.ndarray
    diverged_step: np.ndarray
    steps_per_task: int
    task_names: tuple[str, ...]
    runs: tuple[dict, ...] = ()
    train_acc: np.ndarray | None = None
    norms: dict | None = None

    def __post_init__(self):
        if not self.runs:
            object.__setattr__(self, "runs", tuple({"seed": s} for s in range(self.acc_matrix.shape[0])))
        if len(self.runs) != self.acc_matrix.shape[0]:
            raise ValueError(f"{len(self.runs)} run descriptions for {self.acc_matrix.shape[0]} rows")

    @property
    def n_seeds(self) -> int:
        return self.acc_matrix.shape[0]

    @property
    def n_tasks(self) -> int:
        return self.acc_matrix.shape[1]

    def select(self, **conditions) -> StreamResult:
        """The rows whose run matches every ``key=value`` given, e.g. ``result.select(lam=100.0)``."""
        rows = [i for i, r in enumerate(self.runs) if all(r.get(k) == v for k, v in conditions.items())]
        if not rows:
            raise KeyError(f"no run matches {conditions}; runs look like {self.runs[0]}")
        pick = np.asarray(rows)
        return dataclasses.replace(
            self,
            acc_matrix=self.acc_matrix[pick],
            acc_init=self.acc_init[pick],
            curve_acc=self.curve_acc[pick],
            train_loss=self.train_loss[pick],
            train_acc=None if self.train_acc is None else self.train_acc[pick],
            norms=None if self.norms is None else {k: v[pick] for k, v in self.norms.items()},
            diverged_step=self.diverged_step[pick],
            runs=tuple(self.runs[i] for i in rows),
        )

    def groups(self, *keys: str) -> dict[tuple, StreamResult]:
        """Splits the rows by the values of ``keys`` (e.g. the swept hyperparameters), in run order."""
        values = dict.fromkeys(tuple(r[k] for k in keys) for r in self.runs)
        return {v: self.select(**dict(zip(keys, v))) for v in values}

    @property
    def diverged(self) -> np.ndarray:
        """Boolean ``[S]``: which seeds produced a NaN or inf loss."""
        return self.diverged_step >= 0
