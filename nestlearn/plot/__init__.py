"""Paper figures of continual-learning runs, matplotlib only: curves, the accuracy matrix, atomic saving,
and live figures of a run in progress from its live log."""

from nestlearn.plot._figures import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    STYLE,
    accuracy_matrix,
    average_accuracy_curve,
    forgetting_curves,
    save_figure,
    style,
)
from nestlearn.plot._live import live_curves, live_series, watch_live
from nestlearn.plot._tradeoff import stability_plasticity

__all__ = [
    "DOUBLE_COLUMN",
    "SINGLE_COLUMN",
    "STYLE",
    "accuracy_matrix",
    "average_accuracy_curve",
    "forgetting_curves",
    "live_curves",
    "live_series",
    "save_figure",
    "stability_plasticity",
    "style",
    "watch_live",
]
