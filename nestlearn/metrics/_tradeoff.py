"""The stability–plasticity plane: one point per (strategy, hyperparameter value), seeds as error bars."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from nestlearn.metrics._matrix import forgetting, learning_accuracy

if TYPE_CHECKING:
    import pandas as pd


def tradeoff_points(results: Mapping[str, object], *, swept: Mapping[str, str] | None = None) -> pd.DataFrame:
    r"""Plasticity and stability of every (strategy, hyperparameter value), mean ± s.e.m. over seeds.

    .. math::
      \text{plasticity} = \tfrac{1}{T} \sum_j R_{j,j}, \qquad
      \text{stability} = 1 - \text{forgetting (Chaudhry)}

    Plasticity is how well each new task is learned when it is trained (:func:`learning_accuracy`);
    stability is how much of it is kept (one minus :func:`forgetting`). Seeds whose run diverged are
    counted in ``n_diverged`` and left out of the means; a point whose seeds all diverged keeps NaN means,
    so a plot can mark it rather than silently drop or average it.

    Args:
      results: strategy name -> :class:`~nestlearn.continual.StreamResult` (a sweep's rows carry their
        hyperparameter values in ``result.runs``).
      swept: strategy name -> the key of ``runs`` that was swept (e.g. ``{"ewc": "lam"}``); strategies
        without one give a single point.

    Returns:
      A DataFrame with columns ``strategy, param, value, n_seeds, n_diverged, plasticity, plasticity_sem,
      stability, stability_sem``.
    """
    swept = dict(swept or {})
    rows = []
    for name, result in results.items():
        key = swept.get(name)
        groups = result.groups(key) if key else {(np.nan,): result}
        for (value,), group in groups.items():
            ok = ~group.diverged
            la = learning_accuracy(group.acc_matrix[ok]) if ok.any() else np.array([])
            st = 1.0 - forgetting(group.acc_matrix[ok]) if ok.any() else np.array([])
            rows.append(
                {
                    "strategy": name,
                    "param": key or "",
                    "value": value,
                    "n_seeds": int(group.n_seeds),
                    "n_diverged": int((~ok).sum()),
                    "plasticity": _mean(la),
                    "plasticity_sem": _sem(la),
                    "stability": _mean(st),
                    "stability_sem": _sem(st),
                }
            )
    import pandas as pd  # here, not at import: pandas takes 0.4 s to import

    return pd.DataFrame(rows)


def pareto_front(plasticity: np.ndarray, stability: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes, ordered by plasticity.

    A point is dominated when another is at least as good on both axes and better on one. NaN points
    (all seeds diverged) are never on the front.

    Example:
      >>> pareto_front(np.array([0.9, 0.8, 0.7, 0.85]), np.array([0.5, 0.7, 0.6, 0.4])).tolist()
      [1, 0]
    """
    p, s = np.asarray(plasticity, float), np.asarray(stability, float)
    finite = np.isfinite(p) & np.isfinite(s)
    front = []
    for i in np.flatnonzero(finite):
        others = finite & (p >= p[i]) & (s >= s[i]) & ((p > p[i]) | (s > s[i]))
        if not others.any():
            front.append(i)
    return np.asarray(sorted(front, key=lambda i: p[i]), dtype=int)


def _mean(v: np.ndarray) -> float:
    return float(np.mean(v)) if v.size else float("nan")


def _sem(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
