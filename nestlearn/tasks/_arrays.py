"""Task streams from a user's own arrays: per-task sets, or one pool with per-task classes or rows.

:func:`stream_from_pool` is the general constructor: one training pool and one test pool, and for each
task either the classes it holds (``task_classes``) or the rows it uses (``train_rows``/``test_rows``), in
one of the three scenarios of van de Ven et al. :func:`stream_from_tasks` takes a list of
``(x_train, y_train, x_test, y_test)`` per task and pools them. Both validate everything on the host
(shapes, dtypes, label ranges, finiteness) and raise a :class:`~nestlearn.ConfigError` or
:class:`~nestlearn.DataError` naming the argument and the offending value, so a stream they return runs on
the engine and every strategy.

Inputs are flat ``[n, d]`` (the stream hands models ``[batch, d]``) or images ``[n, H, W, C]`` (or
``[n, H, W]``, one channel; models get ``[batch, H, W, C]``). uint8 pixels stay uint8 on device and are
scaled to ``[0, 1]`` and normalised inside the compiled program; any other real dtype is stored as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from nestlearn._errors import ConfigError, DataError
from nestlearn.tasks._stream import TaskStream

__all__ = ["stream_from_pool", "stream_from_tasks"]

SCENARIOS = ("task", "domain", "class")


def _inputs(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name} must hold real numbers (uint8 pixels or floats), got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
        raise DataError(
            f"{name} has integer dtype {x.dtype}: give uint8 pixels (0..255) or floats (cast with .astype)"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim not in (2, 4):
        raise DataError(
            f"{name} has shape {x.shape}: expected [n, d] features or [n, H, W, C] / [n, H, W] images"
        )
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f"{name} has shape {x.shape}: it holds no examples or no features")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"{name} holds a non-finite value {x[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )
    return x if x.dtype == np.uint8 else x.astype(np.float32)


def _labels(name: str, y, n: int, n_labels: int | None) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must hold integer labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise DataError(f"{name} has shape {y.shape}: expected ({n},), one label per example")
    if y.min() < 0 or (n_labels is not None and y.max() >= n_labels):
        bad = np.flatnonzero((y < 0) | (y >= (n_labels if n_labels is not None else np.inf)))
        high = f"0..{n_labels - 1}" if n_labels is not None else ">= 0"
        raise DataError(f"{name} has label {int(y[bad[0]])} at index {int(bad[0])}, outside {high}")
    return y.astype(np.int32)


def _norm(name: str, value, n: int) -> jnp.ndarray | None:
    if value is None:
        return None
    v = np.asarray(value, np.float64)
    if v.ndim == 0:
        v = np.full((n,), float(v))
    if v.shape != (n,):
        raise ConfigError(f"{name} has shape {v.shape}: expected a scalar or ({n},), one per channel/feature")
    if not np.isfinite(v).all() or (name == "std" and (v <= 0).any()):
        raise ConfigError(
            f"{name} must be finite{' and positive' if name == 'std' else ''}, got {v.tolist()}"
        )
    return jnp.asarray(v, jnp.float32)


def _pad(rows: list[np.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    width = max(r.size for r in rows)
    out = np.zeros((len(rows), width), np.int32)
    for t, r in enumerate(rows):
        out[t, : r.size] = r
    return jnp.asarray(out), jnp.asarray(np.array([r.size for r in rows], np.int32))


def _row_lists(name: str, rows, n_tasks: int | None, n: int) -> list[np.ndarray]:
    rows = [np.asarray(r) for r in rows]
    if n_tasks is not None and len(rows) != n_tasks:
        raise ConfigError(f"{name} has {len(rows)} entries, expected one per task ({n_tasks})")
    for t, r in enumerate(rows):
        if r.ndim != 1 or not (np.issubdtype(r.dtype, np.integer) or r.size == 0):
            raise ConfigError(
                f"{name}[{t}] must be a 1-d list of integer row indices, got {r.dtype} {r.shape}"
            )
        if r.size == 0:
            raise DataError(f"{name}[{t}] is empty: every task needs at least one example")
        if r.min() < 0 or r.max() >= n:
            bad = r[(r < 0) | (r >= n)][0]
            raise ConfigError(f"{name}[{t}] has row {int(bad)}, outside the pool's 0..{n - 1}")
    return [r.astype(np.int32) for r in rows]


def stream_from_pool(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    task_classes: Sequence[Sequence[int]] | None = None,
    train_rows: Sequence[Sequence[int]] | None = None,
    test_rows: Sequence[Sequence[int]] | None = None,
    scenario: str = "class",
    n_labels: int | None = None,
    mean=None,
    std=None,
    crop_padding: int = 0,
    flip: bool = False,
    name: str = "stream",
    task_names: Sequence[str] | None = None,
) -> TaskStream:
    """A :class:`TaskStream` over one pool of examples, each task a subset of the pool's rows.

    Give either ``task_classes`` (task ``t`` uses every pool row whose label is in ``task_classes[t]``,
    in pool order) or ``train_rows`` and ``test_rows`` (task ``t`` uses exactly those rows; its classes
    are the labels found in them). The scenario decides outputs and labels (van de Ven et al. 2022):

    - ``"class"``: one head of ``n_labels`` units, all usable in every task; labels stay as given.
    - ``"task"``: ``n_labels`` units, task ``t`` may use only its classes (its ``class_mask`` row);
      labels stay as given.
    - ``"domain"``: as many units as the largest task has classes; the ``i``-th smallest class of a
      task is label ``i`` (split MNIST's digit ``d`` becomes ``d % 2``).

    Tasks differ in size: ``train_idx``/``test_idx`` are padded with row 0 to the largest task and
    ``train_n``/``test_n`` count the valid rows.

    Args:
      train_x: training pool, ``[n, d]`` features or ``[n, H, W, C]`` / ``[n, H, W]`` images; uint8 (kept
        as uint8 on device, scaled to ``[0, 1]`` on use) or float.
      train_y: ``[n]`` integer labels in ``0..n_labels-1``.
      test_x, test_y: the test pool, same trailing shape.
      task_classes: the classes of each task (disjoint or not).
      train_rows, test_rows: instead of ``task_classes``, the pool rows of each task.
      scenario: ``"class"``, ``"task"`` or ``"domain"``.
      n_labels: number of labels (default: one more than the largest label of either pool).
      mean, std: normalisation after scaling, per channel (images) or feature (flat), or a scalar.
      crop_padding, flip: training augmentation of an image stream (see :meth:`TaskStream.augment`).
      name: the stream's name; ``task_names``: one per task (default ``"0/1"``-style class lists).

    Returns:
      The stream on the default device.

    Raises:
      ConfigError: a bad scenario, both or neither of ``task_classes`` and the row lists, a class outside
        ``0..n_labels-1``, a row outside the pool, mismatched list lengths, bad ``mean``/``std``, or
        augmentation asked of a flat stream.
      DataError: inputs or labels of the wrong shape, dtype or range, non-finite inputs, pools whose
        examples differ in shape, or a task with no training or no test example.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.normal(size=(60, 5)).astype(np.float32), np.arange(60) % 6
      >>> stream = stream_from_pool(x, y, x, y, task_classes=[(0, 1), (2, 3), (4, 5)], scenario="task")
      >>> stream.n_tasks, stream.input_shape, int(stream.train_n[0])
      (3, (5,), 20)
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario={scenario!r} is unknown: allowed {', '.join(map(repr, SCENARIOS))}")
    train_x, test_x = _inputs("train_x", train_x), _inputs("test_x", test_x)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"train_x examples have shape {train_x.shape[1:]} but test_x examples {test_x.shape[1:]}"
        )
    if n_labels is not None and (
        isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 1
    ):
        raise ConfigError(f"n_labels must be a positive int, got {n_labels!r}")
    train_y = _labels("train_y", train_y, train_x.shape[0], n_labels)
    test_y = _labels("test_y", test_y, test_x.shape[0], n_labels)
    if n_labels is None:
        n_labels = int(max(train_y.max(), test_y.max())) + 1
    n_labels = int(n_labels)

    if (task_classes is None) == (train_rows is None and test_rows is None):
        raise ConfigError("give either task_classes or train_rows and test_rows (not both, not neither)")
    if task_classes is not None:
        classes = []
        for t, cs in enumerate(task_classes):
            cs = np.unique(np.asarray(cs, np.int64).ravel())
            if cs.size == 0 or cs.min() < 0 or cs.max() >= n_labels:
                raise ConfigError(
                    f"task_classes[{t}] = {cs.tolist()} must be non-empty classes in 0..{n_labels - 1}"
                )
            classes.append(cs)
        tr = [np.flatnonzero(np.isin(train_y, cs)).astype(np.int32) for cs in classes]
        te = [np.flatnonzero(np.isin(test_y, cs)).astype(np.int32) for cs in classes]
        for t, (a, b) in enumerate(zip(tr, te)):
            if a.size == 0 or b.size == 0:
                raise DataError(
                    f"task {t} (classes {classes[t].tolist()}) has {a.size} training and {b.size} test examples; "
                    "each task needs at least one of each"
                )
    else:
        if train_rows is None or test_rows is None:
            raise ConfigError("train_rows and test_rows must be given together")
        tr = _row_lists("train_rows", train_rows, None, train_x.shape[0])
        te = _row_lists("test_rows", test_rows, len(tr), test_x.shape[0])
        classes = [np.unique(np.concatenate([train_y[a], test_y[b]])) for a, b in zip(tr, te)]
    n_tasks = len(classes)
    if n_tasks == 0:
        raise ConfigError("a stream needs at least one task")

    labels = np.arange(n_labels)
    if scenario == "domain":
        n_classes = max(c.size for c in classes)
        label_map = np.zeros((n_tasks, n_labels), np.int32)
        for t, cs in enumerate(classes):
            label_map[t, cs] = np.arange(cs.size)
        class_mask = np.ones((n_tasks, n_classes), bool)
    else:
        n_classes = n_labels
        label_map = np.broadcast_to(labels, (n_tasks, n_labels)).astype(np.int32)
        if scenario == "task":
            class_mask = np.stack([np.isin(labels, cs) for cs in classes])
        else:
            class_mask = np.ones((n_tasks, n_labels), bool)

    image = train_x.ndim == 4
    channels = train_x.shape[-1] if image else train_x.shape[1]
    if (crop_padding or flip) and not image:
        raise ConfigError("crop_padding and flip augment images: the pool is flat [n, d]")
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
        raise ConfigError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
    if (mean is None) != (std is None):
        raise ConfigError("give mean and std together")
    if task_names is None:
        task_names = tuple(
            "/".join(str(c) for c in cs) if cs.size <= 4 else f"{cs[0]}..{cs[-1]}" for cs in classes
        )
    elif len(task_names) != n_tasks:
        raise ConfigError(f"task_names has {len(task_names)} entries, expected one per task ({n_tasks})")
    train_idx, train_n = _pad(tr)
    test_idx, test_n = _pad(te)
    return TaskStream(
        train_x=jnp.asarray(train_x),
        train_y=jnp.asarray(train_y),
        test_x=jnp.asarray(test_x),
        test_y=jnp.asarray(test_y),
        train_idx=train_idx,
        train_n=train_n,
        test_idx=test_idx,
        test_n=test_n,
        feature_idx=None,
        feature_w=None,
        label_map=jnp.asarray(label_map),
        class_mask=jnp.asarray(class_mask),
        name=f"{name}/{scenario}",
        task_names=tuple(str(n) for n in task_names),
        n_classes=int(n_classes),
        mean=_norm("mean", mean, channels),
        std=_norm("std", std, channels),
        image_shape=tuple(int(s) for s in train_x.shape[1:]) if image else (),
        crop_padding=int(crop_padding),
        flip=bool(flip),
    )


def stream_from_tasks(
    tasks: Sequence[tuple],
    *,
    scenario: str = "class",
    n_labels: int | None = None,
    mean=None,
    std=None,
    crop_padding: int = 0,
    flip: bool = False,
    name: str = "stream",
    task_names: Sequence[str] | None = None,
) -> TaskStream:
    """A :class:`TaskStream` from one ``(x_train, y_train, x_test, y_test)`` tuple per task.

    The tasks' arrays are concatenated into one training and one test pool (task order, then row order)
    and task ``t`` uses exactly its own rows, as :func:`stream_from_pool` with ``train_rows``/``test_rows``.
    Labels are in one label space shared by all tasks: give ``0, 1`` in two tasks and the ``"class"``
    scenario treats them as the same classes; use ``"domain"`` when each task's labels are its own
    ``0..k-1``, or ``"task"`` for a head masked to each task's labels.

    Args:
      tasks: per task ``(x_train, y_train, x_test, y_test)``; all inputs share one trailing shape and dtype
        kind (uint8 everywhere or real numbers everywhere).
      scenario, n_labels, mean, std, crop_padding, flip, name, task_names: as in :func:`stream_from_pool`.

    Returns:
      The stream.

    Raises:
      ConfigError: no task, a task that is not a 4-tuple, or anything :func:`stream_from_pool` rejects.
      DataError: a task's arrays have the wrong shape, dtype or labels (the message names ``tasks[t]``).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> def task(lo):
      ...     x = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
      ...     return x, np.array([lo, lo + 1] * 4), x[:4], np.array([lo, lo + 1] * 2)
      >>> stream = stream_from_tasks([task(0), task(2)], scenario="domain")
      >>> stream.n_tasks, stream.input_shape, stream.n_classes
      (2, (4, 4, 3), 2)
    """
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("tasks is empty: a stream needs at least one task")
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for t, task in enumerate(tasks):
        if not isinstance(task, (tuple, list)) or len(task) != 4:
            raise ConfigError(f"tasks[{t}] must be a tuple (x_train, y_train, x_test, y_test)")
        x_tr, y_tr = _inputs(f"tasks[{t}] x_train", task[0]), task[1]
        x_te, y_te = _inputs(f"tasks[{t}] x_test", task[2]), task[3]
        for what, x in (("x_train", x_tr), ("x_test", x_te)):
            ref = xs_tr[0] if xs_tr else x_tr
            if x.shape[1:] != ref.shape[1:] or x.dtype != ref.dtype:
                raise DataError(
                    f"tasks[{t}] {what} has examples {x.shape[1:]} {x.dtype}, but tasks[0] x_train has "
                    f"{ref.shape[1:]} {ref.dtype}: every task must share one shape and dtype"
                )
        ys_tr.append(_labels(f"tasks[{t}] y_train", y_tr, x_tr.shape[0], n_labels))
        ys_te.append(_labels(f"tasks[{t}] y_test", y_te, x_te.shape[0], n_labels))
        xs_tr.append(x_tr)
        xs_te.append(x_te)
    bounds = lambda xs: np.cumsum([0] + [x.shape[0] for x in xs])
    b_tr, b_te = bounds(xs_tr), bounds(xs_te)
    return stream_from_pool(
        np.concatenate(xs_tr),
        np.concatenate(ys_tr),
        np.concatenate(xs_te),
        np.concatenate(ys_te),
        train_rows=[np.arange(b_tr[t], b_tr[t + 1]) for t in range(len(tasks))],
        test_rows=[np.arange(b_te[t], b_te[t + 1]) for t in range(len(tasks))],
        scenario=scenario,
        n_labels=n_labels,
        mean=mean,
        std=std,
        crop_padding=crop_padding,
        flip=flip,
        name=name,
        task_names=task_names,
    )
