"""The figures plot the numbers they claim: seed means, s.e.m. bands, boundaries, exclusions, matrix cells."""

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nestlearn import plot  # noqa: E402
from nestlearn.continual._result import StreamResult  # noqa: E402

S, T, SPT = 3, 3, 10
STEPS = np.array([0, 5, 10, 15, 20, 25, 30])
CURVE_TASK = np.array([-1, 0, 0, 1, 1, 2, 2])
NAMES = ("A", "B", "C")


def _acc(seed=0):
    return np.random.default_rng(seed).uniform(0.05, 0.95, size=(S, len(STEPS), T))


def _result(acc=None, diverged_step=(-1, -1, -1)):
    acc = _acc() if acc is None else acc
    n = acc.shape[0]
    ends = [2, 4, 6]  # the points at steps 10, 20, 30 close tasks 0, 1, 2
    return StreamResult(
        acc_matrix=acc[:, ends, :],
        acc_init=acc[:, 0, :],
        curve_steps=STEPS,
        curve_task=CURVE_TASK,
        curve_acc=acc,
        train_loss=np.zeros((n, len(STEPS))),
        diverged_step=np.asarray(diverged_step),
        steps_per_task=SPT,
        task_names=NAMES,
    )


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    def no_show(*args, **kwargs):
        raise AssertionError("plotting code must never call plt.show")

    monkeypatch.setattr(plt, "show", no_show)
    yield
    plt.close("all")


def _line(ax, label):
    (line,) = [line for line in ax.lines if line.get_label() == label]
    return line


def _band(ax, label):
    (band,) = [c for c in ax.collections if c.get_gid() == f"{label}:band"]
    return band


def _band_limits(band, xs):
    """Lowest and highest band vertex at each x."""
    vertices = band.get_paths()[0].vertices
    lo = np.array([vertices[np.isclose(vertices[:, 0], x), 1].min() for x in xs])
    hi = np.array([vertices[np.isclose(vertices[:, 0], x), 1].max() for x in xs])
    return lo, hi


def _boundaries(ax):
    return sorted(float(line.get_xdata()[0]) for line in ax.lines if line.get_gid() == "nestlearn:boundary")


# ---------------------------------------------------------------- forgetting_curves


def test_forgetting_curve_is_seed_mean_from_its_training_onward():
    acc = _acc()
    ax = plot.forgetting_curves(_result(acc))
    # Task 1 ("B") is trained at points 3, 4 (curve_task 1); its curve starts one point earlier, at step 10.
    line = _line(ax, "B")
    np.testing.assert_array_equal(line.get_xdata(), [10, 15, 20, 25, 30])
    np.testing.assert_allclose(line.get_ydata(), acc[:, 2:, 1].mean(axis=0), rtol=0, atol=1e-15)
    # Hand check of the first point: the mean of three numbers.
    assert line.get_ydata()[0] == pytest.approx((acc[0, 2, 1] + acc[1, 2, 1] + acc[2, 2, 1]) / 3, abs=1e-15)
    # Task 0 starts at step 0 (the point before training), task 2 at step 20 (the end of task 1).
    assert _line(ax, "A").get_xdata()[0] == 0
    np.testing.assert_array_equal(_line(ax, "C").get_xdata(), [20, 25, 30])
    np.testing.assert_allclose(_line(ax, "C").get_ydata(), acc[:, 4:, 2].mean(axis=0), rtol=0, atol=1e-15)


def test_forgetting_band_is_mean_plus_minus_sem():
    acc = _acc()
    ax = plot.forgetting_curves(_result(acc))
    values = acc[:, 2:, 1]
    mean = values.mean(axis=0)
    sem = values.std(axis=0, ddof=1) / np.sqrt(3)
    # By hand at the first point: sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n).
    x = values[:, 0]
    assert sem[0] == pytest.approx(np.sqrt(((x - x.mean()) ** 2).sum() / 2) / np.sqrt(3), abs=1e-15)
    lo, hi = _band_limits(_band(ax, "B"), [10, 15, 20, 25, 30])
    np.testing.assert_allclose(lo, mean - sem, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, mean + sem, rtol=0, atol=1e-12)
    # The band takes the line's colour.
    np.testing.assert_allclose(
        _band(ax, "B").get_facecolor()[0][:3], matplotlib.colors.to_rgb(_line(ax, "B").get_color())
    )


def test_boundaries_axes_and_legend():
    ax = plot.forgetting_curves(_result())
    assert _boundaries(ax) == [10.0, 20.0]
    for line in ax.lines:
        if line.get_gid() == "nestlearn:boundary":
            assert line.get_linestyle() == "--"
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(NAMES)
    assert len(ax.texts) == 0  # no divergence note when nothing diverged


def test_diverged_seed_excluded_and_announced():
    acc = _acc()
    acc[1, 3:] = np.nan  # seed 1's loss blew up at step 12
    acc[1, :3] = 0.0  # and its earlier, finite points must not count either
    ax = plot.forgetting_curves(_result(acc, diverged_step=(-1, 12, -1)))
    kept = acc[[0, 2]]
    line = _line(ax, "A")
    np.testing.assert_allclose(line.get_ydata(), kept[:, :, 0].mean(axis=0), rtol=0, atol=1e-15)
    lo, hi = _band_limits(_band(ax, "A"), STEPS)
    sem = kept[:, :, 0].std(axis=0, ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(hi - lo, 2 * sem, rtol=0, atol=1e-12)
    (note,) = ax.texts
    assert note.get_text() == "1 of 3 seeds diverged (excluded)"


def test_all_diverged_draws_only_the_note():
    ax = plot.forgetting_curves(_result(diverged_step=(3, 4, 5)))
    assert len(ax.lines) == 0 and len(ax.collections) == 0
    assert ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == ["3 of 3 seeds diverged (excluded)"]


def test_single_seed_has_no_band():
    acc = _acc()[:1]
    ax = plot.forgetting_curves(_result(acc, diverged_step=(-1,)))
    assert len([line for line in ax.lines if line.get_gid() != "nestlearn:boundary"]) == T
    assert len(ax.collections) == 0
    np.testing.assert_allclose(_line(ax, "A").get_ydata(), acc[0, :, 0])


def test_task_subset_prefix_colours_and_shared_axes():
    fig, ax = plt.subplots()
    result = _result()
    out = plot.forgetting_curves(result, ax=ax, tasks=[2], label_prefix="naive ", color_cycle=["#112233"])
    assert out is ax
    assert _line(ax, "naive C").get_color() == "#112233"
    plot.forgetting_curves(_result(diverged_step=(-1, 7, -1)), ax=ax, tasks=[0, 2], label_prefix="EWC ")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["naive C", "EWC A", "EWC C"]
    assert _boundaries(ax) == [10.0, 20.0]  # not drawn twice
    assert [t.get_text() for t in ax.texts] == ["EWC: 1 of 3 seeds diverged (excluded)"]
    with pytest.raises(ValueError, match="task index 3"):
        plot.forgetting_curves(result, tasks=[3])


def test_curve_shape_mismatch_raises():
    bad = _result()
    bad = StreamResult(**{**bad.__dict__, "curve_steps": STEPS[:-1]})
    with pytest.raises(ValueError, match=r"curve_steps"):
        plot.forgetting_curves(bad)


# ---------------------------------------------------------------- average_accuracy_curve


def _seen_mean_by_hand(acc):
    """[S, P]: tasks <= current (task 0 before training)."""
    out = np.empty(acc.shape[:2])
    for p, c in enumerate(CURVE_TASK):
        out[:, p] = acc[:, p, : max(c, 0) + 1].mean(axis=-1)
    return out


def test_average_accuracy_curve_values():
    acc = _acc()
    ax = plot.average_accuracy_curve(_result(acc), label="naive")
    line = _line(ax, "naive")
    np.testing.assert_array_equal(line.get_xdata(), STEPS)
    by_hand = _seen_mean_by_hand(acc)
    # Point 3 (step 15, training task 1): mean over tasks 0 and 1, then over seeds.
    assert by_hand[:, 3].mean() == pytest.approx(acc[:, 3, :2].sum() / 6, abs=1e-15)
    np.testing.assert_allclose(line.get_ydata(), by_hand.mean(axis=0), rtol=0, atol=1e-15)
    lo, hi = _band_limits(_band(ax, "naive"), STEPS)
    sem = by_hand.std(axis=0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(lo, by_hand.mean(axis=0) - sem, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, by_hand.mean(axis=0) + sem, rtol=0, atol=1e-12)
    assert _boundaries(ax) == [10.0, 20.0]
    assert ax.get_ylim() == (0.0, 1.0)


def test_average_accuracy_curves_compare_on_one_axes():
    naive, joint = _acc(0), _acc(1)
    joint[1, 4:] = np.nan
    fig, ax = plt.subplots()
    plot.average_accuracy_curve(_result(naive), ax=ax, label="naive")
    plot.average_accuracy_curve(_result(joint, diverged_step=(-1, 22, -1)), ax=ax, label="joint")
    assert _line(ax, "naive").get_color() != _line(ax, "joint").get_color()
    np.testing.assert_allclose(
        _line(ax, "joint").get_ydata(), _seen_mean_by_hand(joint[[0, 2]]).mean(axis=0), rtol=0, atol=1e-15
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["naive", "joint"]
    assert _boundaries(ax) == [10.0, 20.0]
    assert [t.get_text() for t in ax.texts] == ["joint: 1 of 3 seeds diverged (excluded)"]


# ---------------------------------------------------------------- accuracy_matrix


def test_accuracy_matrix_image_and_cells():
    rng = np.random.default_rng(3)
    R = rng.uniform(size=(4, T, T))
    R[:, 0, 0] = 0.95  # light cell
    R[:, 2, 0] = 0.05  # dark cell
    ax = plot.accuracy_matrix(R, task_names=NAMES, title="naive")
    (image,) = ax.images
    np.testing.assert_allclose(image.get_array(), R.mean(axis=0), rtol=0, atol=1e-15)
    assert image.get_clim() == (0.0, 1.0)
    mean = R.mean(axis=0)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(cells) == T * T
    for (i, j), text in cells.items():
        assert text.get_text() == f"{mean[i, j]:.2f}"
    assert cells[(0, 0)].get_text() == "0.95" and cells[(0, 0)].get_color() == "black"
    assert cells[(2, 0)].get_text() == "0.05" and cells[(2, 0)].get_color() == "white"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(NAMES)
    assert ax.get_xlabel() == "Evaluated on task" and ax.get_ylabel() == "After training task"
    assert ax.get_title() == "naive"
    (colorbar_axes,) = ax.child_axes  # the colorbar, inset beside the image
    assert colorbar_axes.get_ylim() == (0.0, 1.0)
    assert colorbar_axes.get_ylabel() == "Accuracy"


def test_accuracy_matrix_single_and_errors():
    R = np.array([[0.9, 0.1], [0.6, 0.8]])
    ax = plot.accuracy_matrix(R)
    assert [t.get_text() for t in ax.texts] == ["0.90", "0.10", "0.60", "0.80"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        plot.accuracy_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="task names"):
        plot.accuracy_matrix(R, task_names=["A"])


# ---------------------------------------------------------------- style and save_figure


def test_every_text_is_at_least_7pt_and_single_column_wide():
    ax = plot.forgetting_curves(_result(diverged_step=(-1, 3, -1)))
    fig = ax.figure
    assert fig.get_size_inches()[0] == pytest.approx(plot.SINGLE_COLUMN)
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert sizes and min(sizes) >= 7
    assert not ax.spines["top"].get_visible() and not ax.spines["right"].get_visible()


def test_style_is_scoped():
    before = matplotlib.rcParams["font.size"]
    with plot.style():
        assert matplotlib.rcParams["font.size"] == plot.STYLE["font.size"]
        assert matplotlib.rcParams["axes.spines.top"] is False
    assert matplotlib.rcParams["font.size"] == before
    font_keys = [
        k for k in plot.STYLE if k == "font.size" or k.endswith(("labelsize", "titlesize", "fontsize"))
    ]
    assert len(font_keys) >= 6 and all(plot.STYLE[k] >= 7 for k in font_keys)


def test_save_figure_writes_pdf_and_png_atomically(tmp_path):
    ax = plot.accuracy_matrix(np.eye(3))
    out_dir = tmp_path / "paper" / "figures"  # does not exist yet
    paths = plot.save_figure(ax.figure, out_dir / "matrix")
    assert paths == [out_dir / "matrix.pdf", out_dir / "matrix.png"]
    assert sorted(os.listdir(out_dir)) == ["matrix.pdf", "matrix.png"]  # no temp files left
    pdf, png = (p.read_bytes() for p in paths)
    assert len(pdf) > 1000 and pdf.startswith(b"%PDF-")
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType fonts, not Type 3
    # The same figure rebuilt gives the same PDF bytes (no creation date), and replaces the file in place;
    # a stem ending in one of the formats is not doubled.
    again = plot.save_figure(plot.accuracy_matrix(np.eye(3)).figure, out_dir / "matrix.pdf", formats=["pdf"])
    assert again == [out_dir / "matrix.pdf"]
    assert again[0].read_bytes() == pdf
    assert sorted(os.listdir(out_dir)) == ["matrix.pdf", "matrix.png"]


def test_save_figure_failure_leaves_nothing(tmp_path, monkeypatch):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="unsupported"):
        plot.save_figure(fig, tmp_path / "x", formats=("pdf", "nope"))
    assert os.listdir(tmp_path) == []

    def broken(fh, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot.save_figure(fig, tmp_path / "x")
    assert os.listdir(tmp_path) == []


def test_legend_can_be_turned_off_for_side_by_side_panels():
    fig, ax = plt.subplots()
    plot.forgetting_curves(_result(), ax=ax, legend=False)
    assert ax.get_legend() is None and len(ax.get_legend_handles_labels()[1]) == 3
    plt.close(fig)
