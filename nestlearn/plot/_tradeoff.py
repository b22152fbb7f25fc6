"""The stability–plasticity picture: strategies swept along their hyperparameter, with the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes

from nestlearn.metrics._tradeoff import pareto_front
from nestlearn.plot._figures import _axes, style

if TYPE_CHECKING:
    import pandas as pd

_REFERENCE_MARKERS = {"naive": ("v", "0.35"), "joint": ("*", "0.1")}


def stability_plasticity(
    points: pd.DataFrame,
    *,
    ax: Axes | None = None,
    references: Sequence[str] = ("naive", "joint"),
    legend: bool = True,
) -> Axes:
    r"""Plasticity against stability, one marker per (strategy, value), error bars of one s.e.m.

    .. math::
      x = \tfrac{1}{T}\sum_j R_{j,j}, \qquad y = 1 - \text{forgetting}

    Each strategy's points are joined in the order of its swept value (the first and last values are
    written next to their points), so the line shows where the hyperparameter moves it on the plane.
    ``references`` (naive fine-tuning, joint training) are drawn as single grey markers. The dashed line is
    the Pareto front of every point shown. Points whose seeds all diverged cannot be placed: the legend
    entry of their strategy says how many diverged.

    Args:
      points: the output of :func:`nestlearn.metrics.tradeoff_points`.
      ax: axes to draw on; a new single-column figure if ``None``.
      references: strategy names drawn as reference markers rather than swept curves.
      legend: draw the legend (turn off for all but one of several panels).

    Returns:
      The axes drawn on.

    References:
      Mermillod, Bugaiska & Bonin, `The stability-plasticity dilemma
      <https://doi.org/10.3389/fpsyg.2013.00504>`_, 2013
    """
    with style():
        ax = _axes(ax, figsize=(3.3, 2.8))
        for name, group in points.groupby("strategy", sort=False):
            group = group.sort_values("value")
            diverged = int(group["n_diverged"].sum())
            label = name + (f" ({diverged} diverged runs excluded)" if diverged else "")
            if name in references:
                marker, color = _REFERENCE_MARKERS.get(name, ("s", "0.4"))
                ax.errorbar(
                    group["plasticity"], group["stability"], xerr=group["plasticity_sem"],
                    yerr=group["stability_sem"], fmt=marker, color=color, markersize=6, label=label, zorder=3,
                )  # fmt: skip
                continue
            line = ax.errorbar(
                group["plasticity"], group["stability"], xerr=group["plasticity_sem"],
                yerr=group["stability_sem"], fmt="o-", markersize=3, linewidth=1, capsize=0, label=label,
            )  # fmt: skip
            finite = group[np.isfinite(group["plasticity"]) & np.isfinite(group["stability"])]
            if len(finite) > 1 and group["param"].iloc[0]:
                for row in (finite.iloc[0], finite.iloc[-1]):
                    ax.annotate(
                        f"{row['value']:g}", (row["plasticity"], row["stability"]), xytext=(3, 3),
                        textcoords="offset points", fontsize=7, color=line.lines[0].get_color(),
                    )  # fmt: skip
        front = pareto_front(points["plasticity"].to_numpy(), points["stability"].to_numpy())
        if front.size > 1:
            ax.plot(
                points["plasticity"].to_numpy()[front], points["stability"].to_numpy()[front], "--",
                color="0.5", linewidth=0.8, zorder=1, label="Pareto front", gid="pareto-front",
            )  # fmt: skip
        ax.set_xlabel("Plasticity (mean accuracy on each task after learning it)")
        ax.set_ylabel("Stability (1 − forgetting)")
        if legend:
            ax.legend(loc="best")
    return ax
