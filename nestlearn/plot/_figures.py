r"""Paper figures of continual-learning runs: forgetting curves, average accuracy and the accuracy matrix.

Matplotlib only, object-oriented: every function draws on the ``ax`` it is given (or a new single-column
figure) and returns the axes; nothing calls ``plt.show``. Curves are the mean over seeds with a shaded
band of one standard error, ``std(ddof=1) / sqrt(n)``; seeds whose loss went NaN or inf
(``StreamResult.diverged``) are left out and the axes say how many.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nestlearn.continual._result import StreamResult

__all__ = [
    "DOUBLE_COLUMN",
    "SINGLE_COLUMN",
    "STYLE",
    "accuracy_matrix",
    "average_accuracy_curve",
    "forgetting_curves",
    "save_figure",
    "style",
]

SINGLE_COLUMN = 3.3
"""Width in inches of a single-column figure (two-column paper layouts)."""

DOUBLE_COLUMN = 6.8
"""Width in inches of a figure spanning both columns."""

STYLE: dict[str, object] = {
    "figure.figsize": (SINGLE_COLUMN, 2.3),
    "figure.dpi": 150,
    "figure.constrained_layout.use": True,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 3,
    "ytick.major.size": 3,
    "legend.frameon": False,
    "legend.handlelength": 1.5,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}
"""Matplotlib rc settings for paper figures: fonts of 7-8 pt, no top or right spines, TrueType in PDFs."""

_BOUNDARY_GID = "nestlearn:boundary"
_DIVERGED_GID = "nestlearn:diverged"
_BAND_ALPHA = 0.2
_MIN_FONT = 7


def style():
    r"""Context manager that applies :data:`STYLE`, the paper rc settings, inside its block.

    .. math::
      \text{font sizes} \in [7, 8]\ \text{pt}, \quad \text{width} = 3.3\ \text{in (single column)}

    Every plotting function of this module draws inside it; use it around your own figure code so that
    extra panels, titles and annotations match.

    Returns:
      A context manager (``matplotlib.rc_context``) that restores the previous settings on exit.

    Examples:
      >>> import matplotlib.pyplot as plt
      >>> from nestlearn import plot
      >>> with plot.style():
      ...     fig, ax = plt.subplots(figsize=(plot.DOUBLE_COLUMN, 2.0))
      >>> ax.spines["top"].get_visible()
      False

    References:
      Rougier, Droettboom & Bourne, `Ten Simple Rules for Better Figures
      <https://doi.org/10.1371/journal.pcbi.1003833>`_, 2014
    """
    return mpl.rc_context(STYLE)


def _axes(ax: Axes | None, figsize: tuple[float, float] | None = None) -> Axes:
    """``ax``, or a new figure's axes; called inside :func:`style`, so new axes already carry the style."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    else:
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return ax


def _mean_sem(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean over axis 0 and its standard error ``std(ddof=1) / sqrt(n)``; no error with one row."""
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, None
    return mean, values.std(axis=0, ddof=1) / np.sqrt(n)


def _mean_with_band(ax: Axes, x: np.ndarray, values: np.ndarray, label: str, color=None) -> None:
    """Plots the seed mean of ``values`` (``[n, len(x)]``) and, for ``n >= 2``, a band of one s.e.m."""
    mean, sem = _mean_sem(values)
    (line,) = ax.plot(x, mean, color=color, label=label, gid=f"{label}:mean", zorder=2.5)
    if sem is not None:
        band = ax.fill_between(
            x, mean - sem, mean + sem, color=line.get_color(), alpha=_BAND_ALPHA, linewidth=0, zorder=2
        )
        band.set_gid(f"{label}:band")


def _boundaries(ax: Axes, steps_per_task: int, n_tasks: int) -> None:
    """Dashed vertical lines at every task boundary not already on ``ax``."""
    drawn = {float(line.get_xdata()[0]) for line in ax.lines if line.get_gid() == _BOUNDARY_GID}
    for k in range(1, n_tasks):
        x = float(k * steps_per_task)
        if x not in drawn:
            ax.axvline(x, color="0.6", linestyle="--", linewidth=0.6, zorder=1, gid=_BOUNDARY_GID)


def _note_diverged(ax: Axes, n_diverged: int, n_seeds: int, prefix: str) -> None:
    """Says, right-aligned below the x-axis label, how many seeds were excluded; one line per call.

    Below the axes the note cannot collide with a title set later or with the curves near accuracy 1.
    """
    message = f"{n_diverged} of {n_seeds} seeds diverged (excluded)"
    prefix = prefix.strip().rstrip(":")
    if prefix:
        message = f"{prefix}: {message}"
    for text in ax.texts:
        if text.get_gid() == _DIVERGED_GID:
            text.set_text(f"{text.get_text()}\n{message}")
            return
    ax.annotate(
        message,
        xy=(1, 0),
        xycoords=("axes fraction", ax.xaxis.label),  # x: the axes' right edge; y: the x label's bottom
        xytext=(0, -2),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=_MIN_FONT,
        color="#b2182b",
        gid=_DIVERGED_GID,
    )


def _curves(result: StreamResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``curve_steps``, ``curve_task`` and ``curve_acc`` as arrays, after checking their shapes agree."""
    steps = np.asarray(result.curve_steps)
    task = np.asarray(result.curve_task)
    acc = np.asarray(result.curve_acc, dtype=np.float64)
    n_seeds, n_tasks = result.n_seeds, result.n_tasks
    if acc.ndim != 3 or acc.shape[0] != n_seeds or acc.shape[2] != n_tasks:
        raise ValueError(
            f"curve_acc must be [S, P, T] = [{n_seeds}, P, {n_tasks}] to match acc_matrix; got {acc.shape}"
        )
    if steps.shape != (acc.shape[1],) or task.shape != (acc.shape[1],):
        raise ValueError(
            f"curve_steps and curve_task must be [P] with P = {acc.shape[1]}; "
            f"got {steps.shape} and {task.shape}"
        )
    if np.asarray(result.diverged).shape != (n_seeds,):
        raise ValueError(f"diverged_step must be [S] = [{n_seeds}]; got {np.shape(result.diverged_step)}")
    return steps, task, acc


def _finish_curve_axes(ax: Axes, ylabel: str) -> None:
    ax.set_ylim(0, 1)
    ax.margins(x=0)
    ax.set_xlabel("Training step")
    ax.set_ylabel(ylabel)


def forgetting_curves(
    result: StreamResult,
    *,
    ax: Axes | None = None,
    tasks: Iterable[int] | None = None,
    label_prefix: str = "",
    color_cycle: Sequence | None = None,
    legend: bool = True,
) -> Axes:
    r"""Accuracy on each task over training, mean over seeds with a band of one standard error.

    .. math::
      \bar a_j(t) = \frac{1}{n} \sum_{s \notin \mathrm{diverged}} a_{s, j}(t), \qquad
      \mathrm{sem}_j(t) = \frac{\mathrm{std}_s(a_{s, j}(t))}{\sqrt{n}} \ (\mathrm{ddof} = 1)

    Task ``j``'s curve starts at the evaluation point just before its training (the end of task ``j - 1``,
    or step 0) and runs to the end, so its rise and later decay are both visible. Dashed vertical lines
    mark the task boundaries (multiples of ``steps_per_task``). Diverged seeds are excluded and a note
    below the x-axis label says how many; if every seed diverged only the annotation is drawn. There is
    no band with a single seed.

    Args:
      result: a :class:`~nestlearn.continual._result.StreamResult` of ``S`` seeds and ``T`` tasks.
      ax: axes to draw on; a new single-column figure if ``None``.
      tasks: indices of the tasks to draw; all by default.
      label_prefix: prepended to each task name in the legend (to put two strategies on one axes).
      color_cycle: colours for tasks ``0, 1, ...`` (repeated if short); matplotlib's cycle by default.
      legend: draw the legend of task names (right of the axes); turn off for all but one of several
        side-by-side panels.

    Returns:
      The axes drawn on.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import plot
      >>> from nestlearn.continual._result import StreamResult
      >>> S, T, P = 2, 2, 5
      >>> result = StreamResult(
      ...     acc_matrix=np.full((S, T, T), 0.5), acc_init=np.full((S, T), 0.1),
      ...     curve_steps=np.array([0, 5, 10, 15, 20]), curve_task=np.array([-1, 0, 0, 1, 1]),
      ...     curve_acc=np.random.default_rng(0).uniform(size=(S, P, T)), train_loss=np.zeros((S, P)),
      ...     diverged_step=np.array([-1, 12]), steps_per_task=10, task_names=("A", "B"))
      >>> ax = plot.forgetting_curves(result)
      >>> ax.get_legend_handles_labels()[1], ax.texts[0].get_text()
      (['A', 'B'], '1 of 2 seeds diverged (excluded)')

    References:
      van de Ven, Tuytelaars & Tolias, `Three types of incremental learning
      <https://doi.org/10.1038/s42256-022-00568-3>`_, 2022
    """
    steps, curve_task, acc = _curves(result)
    n_seeds, n_tasks = result.n_seeds, result.n_tasks
    tasks = list(range(n_tasks)) if tasks is None else [int(j) for j in tasks]
    for j in tasks:
        if not 0 <= j < n_tasks:
            raise ValueError(f"task index {j} out of range for {n_tasks} tasks")
    names = tuple(result.task_names) or tuple(str(j) for j in range(n_tasks))
    if len(names) != n_tasks:
        raise ValueError(f"{len(names)} task names for {n_tasks} tasks: {names}")
    keep = ~np.asarray(result.diverged)
    n_diverged = int(n_seeds - keep.sum())

    with style():
        colors = (
            list(color_cycle)
            if color_cycle is not None
            else mpl.rcParams["axes.prop_cycle"].by_key()["color"]
        )
        if not colors:
            raise ValueError("color_cycle is empty")
        ax = _axes(ax)
        if keep.any():
            _boundaries(ax, result.steps_per_task, n_tasks)
            for j in tasks:
                trained = np.flatnonzero(curve_task >= j)
                if trained.size == 0:  # the run stopped before task j
                    continue
                start = max(int(trained[0]) - 1, 0)
                label = f"{label_prefix}{names[j]}"
                _mean_with_band(ax, steps[start:], acc[keep, start:, j], label, colors[j % len(colors)])
            if legend and ax.get_legend_handles_labels()[1]:
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        if n_diverged:
            _note_diverged(ax, n_diverged, n_seeds, label_prefix)
        _finish_curve_axes(ax, "Accuracy")
    return ax


def _seen_average(curve_task: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Mean accuracy over tasks ``j <= max(curve_task, 0)`` at each point, ``[S, P]``."""
    current = np.maximum(curve_task, 0)
    seen = np.arange(acc.shape[-1])[None, :] <= current[:, None]  # [P, T]
    return np.where(seen, acc, 0.0).sum(axis=-1) / seen.sum(axis=-1)


def average_accuracy_curve(result: StreamResult, *, ax: Axes | None = None, label: str | None = None) -> Axes:
    r"""Average accuracy over the tasks seen so far, over training, mean over seeds with an s.e.m. band.

    .. math::
      A_s(t) = \frac{1}{c(t) + 1} \sum_{j=0}^{c(t)} a_{s, j}(t)

    where ``c(t)`` is the task being trained at point ``t`` (the ``-1`` point before training counts as
    task 0, so the curve starts at task 0's initial accuracy). At the end of the stream this is ACC. Call it
    once per strategy on one axes to compare them (e.g. naive fine-tuning against joint training); each
    call takes the next colour. Diverged seeds are excluded and counted in an annotation, as in
    :func:`forgetting_curves`.

    Args:
      result: a :class:`~nestlearn.continual._result.StreamResult`.
      ax: axes to draw on; a new single-column figure if ``None``.
      label: legend entry for this curve; no legend entry if ``None``.

    Returns:
      The axes drawn on.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import plot
      >>> from nestlearn.continual._result import StreamResult
      >>> acc = np.array([[[0.1, 0.1], [0.9, 0.1], [0.8, 0.7]]])  # one seed, points at steps 0, 10, 20
      >>> result = StreamResult(
      ...     acc_matrix=acc[:, 1:], acc_init=acc[:, 0], curve_steps=np.array([0, 10, 20]),
      ...     curve_task=np.array([-1, 0, 1]), curve_acc=acc, train_loss=np.zeros((1, 3)),
      ...     diverged_step=np.array([-1]), steps_per_task=10, task_names=("A", "B"))
      >>> ax = plot.average_accuracy_curve(result, label="naive")
      >>> [round(float(y), 2) for y in ax.lines[-1].get_ydata()]
      [0.1, 0.9, 0.75]

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017
    """
    steps, curve_task, acc = _curves(result)
    keep = ~np.asarray(result.diverged)
    n_diverged = int(result.n_seeds - keep.sum())
    with style():
        ax = _axes(ax)
        if keep.any():
            _boundaries(ax, result.steps_per_task, result.n_tasks)
            values = _seen_average(curve_task, acc[keep])
            _mean_with_band(ax, steps, values, label if label is not None else "_nolegend_")
            if label is not None:
                ax.legend(loc="lower left")
        if n_diverged:
            _note_diverged(ax, n_diverged, result.n_seeds, label or "")
        _finish_curve_axes(ax, "Average accuracy (seen tasks)")
    return ax


def _text_color(rgba) -> str:
    """Black on light cells, white on dark ones (by relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def accuracy_matrix(
    R, *, ax: Axes | None = None, task_names: Sequence[str] | None = None, title: str | None = None
) -> Axes:
    r"""Heatmap of the accuracy matrix, each cell annotated with its value.

    .. math::
      \text{cell}(i, j) = R_{i, j} \ \text{or, for } R \in [S, T, T], \ \frac{1}{S} \sum_s R_{s, i, j}

    Rows are "after training task ``i``", columns "evaluated on task ``j``"; the lower triangle shows
    forgetting, the upper triangle accuracy before a task is trained. The colour scale is fixed to
    ``[0, 1]`` so figures compare; annotations have two decimals, in black or white for contrast. A NaN
    seed makes every cell NaN: pass ``result.acc_matrix[~result.diverged]`` to leave diverged seeds out.

    Args:
      R: accuracy matrix ``[T, T]``, or ``[S, T, T]`` (averaged over ``S``).
      ax: axes to draw on; a new single-column figure if ``None``.
      task_names: one label per task; ``0, 1, ...`` by default.
      title: axes title.

    Returns:
      The axes drawn on.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import plot
      >>> ax = plot.accuracy_matrix(np.array([[0.9, 0.1], [0.6, 0.8]]), task_names=["A", "B"])
      >>> [t.get_text() for t in ax.texts]
      ['0.90', '0.10', '0.60', '0.80']

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim not in (2, 3) or R.shape[-1] != R.shape[-2]:
        raise ValueError(f"R must be [T, T] or [S, T, T], square in its last two axes; got shape {R.shape}")
    if R.ndim == 3:
        R = R.mean(axis=0)
    n_tasks = R.shape[-1]
    names = [str(j) for j in range(n_tasks)] if task_names is None else [str(n) for n in task_names]
    if len(names) != n_tasks:
        raise ValueError(f"{len(names)} task names for {n_tasks} tasks: {names}")

    with style():
        width = SINGLE_COLUMN if n_tasks <= 8 else min(DOUBLE_COLUMN, 0.9 + 0.4 * n_tasks)
        ax = _axes(ax, figsize=(width, 0.85 * width))
        image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", aspect="auto")
        for spine in ax.spines.values():
            spine.set_visible(False)
        for i in range(n_tasks):
            for j in range(n_tasks):
                value = R[i, j]
                text = "–" if np.isnan(value) else f"{value:.2f}"
                color = "black" if np.isnan(value) else _text_color(image.cmap(image.norm(value)))
                ax.text(j, i, text, ha="center", va="center", fontsize=_MIN_FONT, color=color)
        ax.set_xticks(range(n_tasks), names, rotation=45 if max(map(len, names)) > 3 else 0)
        ax.set_yticks(range(n_tasks), names)
        ax.tick_params(length=0)
        ax.set_xlabel("Evaluated on task")
        ax.set_ylabel("After training task")
        if title is not None:
            ax.set_title(title)
        # A colorbar inset beside the image: as tall as the image, and stable under constrained layout.
        colorbar = ax.figure.colorbar(image, cax=ax.inset_axes((1.04, 0.0, 0.05, 1.0)))
        colorbar.set_label("Accuracy")
        colorbar.outline.set_linewidth(0.6)
    return ax


_DETERMINISTIC_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def save_figure(
    fig: Figure, path_stem: str | os.PathLike, formats: Sequence[str] = ("pdf", "png"), dpi: int = 200
) -> list[pathlib.Path]:
    r"""Writes ``fig`` once per format, each atomically: to a temporary file beside it, then ``os.replace``.

    .. math::
      \texttt{path\_stem} \mapsto \{\texttt{path\_stem.fmt} : \texttt{fmt} \in \texttt{formats}\}

    A reader never sees a half-written figure, and a failed save leaves no temporary file behind. Parent
    directories are created. A stem that already ends in one of ``formats`` (``fig.png``) has that suffix
    dropped. Fonts go into PDFs as TrueType (Type 42), which publishers ask for, and PDFs and SVGs carry no
    creation date, so rebuilding a figure rewrites the same bytes.

    Args:
      fig: the figure.
      path_stem: path without extension, e.g. ``paper/figures/forgetting``.
      formats: file formats, each one matplotlib can write (``pdf``, ``png``, ``svg``, ...).
      dpi: resolution of raster formats.

    Returns:
      The paths written, one per format, in order.

    Examples:
      >>> import tempfile, pathlib
      >>> import matplotlib.pyplot as plt
      >>> from nestlearn import plot
      >>> fig, ax = plt.subplots()
      >>> out = pathlib.Path(tempfile.mkdtemp()) / "figs" / "demo"
      >>> [p.name for p in plot.save_figure(fig, out)]
      ['demo.pdf', 'demo.png']

    References:
      POSIX ``rename(2)``: the replacement of the destination is atomic.
    """
    if isinstance(formats, str):
        formats = (formats,)
    formats = [str(f).lower().lstrip(".") for f in formats]
    if not formats:
        raise ValueError("formats is empty")
    supported = fig.canvas.get_supported_filetypes()
    unknown = [f for f in formats if f not in supported]
    if unknown:
        raise ValueError(f"unsupported figure formats {unknown}; matplotlib writes {sorted(supported)}")
    stem = pathlib.Path(path_stem)
    if stem.suffix.lower().lstrip(".") in formats:
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)

    paths = []
    for fmt in formats:
        final = stem.with_name(f"{stem.name}.{fmt}")
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        try:
            with os.fdopen(fd, "wb") as fh, style():  # style: pdf.fonttype 42 is read at save time
                fig.savefig(
                    fh,
                    format=fmt,
                    dpi=dpi,
                    bbox_inches="tight",
                    pad_inches=0.02,
                    metadata=_DETERMINISTIC_METADATA.get(fmt),
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        paths.append(final)
    return paths
