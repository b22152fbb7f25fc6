"""The stability–plasticity points, the Pareto front and their plot, against hand computations."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nestlearn import metrics, plot  # noqa: E402
from nestlearn.continual import StreamResult  # noqa: E402


def result(matrices, runs, diverged=None):
    r = np.asarray(matrices, np.float64)
    s, t = r.shape[:2]
    return StreamResult(
        acc_matrix=r, acc_init=np.full((s, t), 0.1), curve_steps=np.arange(t + 1), curve_task=np.arange(-1, t),
        curve_acc=np.zeros((s, t + 1, t)), train_loss=np.zeros((s, t + 1)),
        diverged_step=np.asarray(diverged if diverged is not None else [-1] * s), steps_per_task=1,
        task_names=tuple(str(j) for j in range(t)), runs=tuple(runs),
    )  # fmt: skip


# Two tasks. R = [[a, .], [f, d]]: plasticity = (a + d) / 2, forgetting = a - f, stability = 1 - (a - f).
A = [[0.9, 0.1], [0.5, 0.8]]  # plasticity 0.85, stability 0.6
B = [[0.7, 0.1], [0.6, 0.7]]  # plasticity 0.70, stability 0.9
C = [[0.8, 0.1], [0.6, 0.9]]  # plasticity 0.85, stability 0.8


def test_points_are_means_and_sems_over_seeds_per_value():
    ewc = result(
        [A, C, B, B],
        [
            {"lam": 1.0, "seed": 0},
            {"lam": 1.0, "seed": 1},
            {"lam": 10.0, "seed": 0},
            {"lam": 10.0, "seed": 1},
        ],
    )
    naive = result([A, A], [{"seed": 0}, {"seed": 1}])
    pts = metrics.tradeoff_points({"naive": naive, "ewc": ewc}, swept={"ewc": "lam"})
    row = pts[(pts.strategy == "ewc") & (pts.value == 1.0)].iloc[0]
    np.testing.assert_allclose(row.plasticity, 0.85)
    np.testing.assert_allclose(row.stability, 0.7)  # mean of 0.6 and 0.8
    np.testing.assert_allclose(row.stability_sem, np.std([0.6, 0.8], ddof=1) / np.sqrt(2))
    row = pts[(pts.strategy == "ewc") & (pts.value == 10.0)].iloc[0]
    np.testing.assert_allclose(
        [row.plasticity, row.stability, row.stability_sem], [0.7, 0.9, 0.0], atol=1e-12
    )
    assert pts[pts.strategy == "naive"].iloc[0].param == ""


def test_diverged_seeds_are_counted_not_averaged():
    ewc = result(
        [A, [[np.nan, np.nan], [np.nan, np.nan]]],
        [{"lam": 1.0, "seed": 0}, {"lam": 1.0, "seed": 1}],
        diverged=[-1, 7],
    )
    pts = metrics.tradeoff_points({"ewc": ewc}, swept={"ewc": "lam"})
    assert pts.iloc[0].n_diverged == 1 and pts.iloc[0].n_seeds == 2
    np.testing.assert_allclose([pts.iloc[0].plasticity, pts.iloc[0].stability], [0.85, 0.6])


def test_pareto_front():
    p = np.array([0.85, 0.70, 0.85, 0.6, np.nan])
    s = np.array([0.60, 0.90, 0.80, 0.95, 1.0])
    # (0.85, 0.6) is dominated by (0.85, 0.8); the NaN point is never on the front.
    assert metrics.pareto_front(p, s).tolist() == [3, 1, 2]


def test_plot_draws_the_points_and_the_front():
    ewc = result([A, B], [{"lam": 1.0, "seed": 0}, {"lam": 10.0, "seed": 0}])
    joint = result([C], [{"seed": 0}])
    pts = metrics.tradeoff_points({"ewc": ewc, "joint": joint}, swept={"ewc": "lam"})
    fig, ax = plt.subplots()
    plot.stability_plasticity(pts, ax=ax)
    front = [line for line in ax.lines if line.get_gid() == "pareto-front"][0]
    # Points: ewc (0.85, 0.6), (0.7, 0.9); joint (0.85, 0.8). Front: (0.7, 0.9) then (0.85, 0.8).
    np.testing.assert_allclose(front.get_xdata(), [0.7, 0.85])
    np.testing.assert_allclose(front.get_ydata(), [0.9, 0.8])
    labels = ax.get_legend_handles_labels()[1]
    assert "ewc" in labels and "joint" in labels and "Pareto front" in labels
    assert {t.get_text() for t in ax.texts} == {"1", "10"}
    plt.close(fig)
