r"""Continual-learning metrics of the accuracy matrix, one function per convention.

Every function takes ``R[..., i, j]``, the accuracy on task ``j`` after training task ``i`` for ``T`` tasks,
and, where needed, ``b[..., j]``, the accuracy on task ``j`` before any training. Leading axes (seeds, sweep
points) broadcast and are kept in the output, so a ``[S, T, T]`` matrix gives ``[S]`` metrics. Inputs are
converted to float64 numpy arrays; outputs are float64 numpy arrays (0-d for a single matrix). NaNs (from a
diverged run) propagate.

Frameworks disagree on forgetting and backward transfer; each function's docstring names its convention
and who uses it. On the worked example of ``REFERENCES.md`` they give ACC 0.7575, BWT -0.1867, FWT 0.0333,
forgetting 0.2167 (Chaudhry), 0.1867 (Avalanche), 0.2333 (Mammoth) and Continuum BWT -0.1033.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "backward_transfer_continuum",
    "forgetting",
    "forgetting_avalanche",
    "forgetting_mammoth",
    "forward_transfer",
    "learning_accuracy",
    "summary",
]


def _check_matrix(R, min_tasks: int, metric: str) -> np.ndarray:
    """``R`` as a float64 array, after checking that it is ``[..., T, T]`` with ``T >= min_tasks``."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim < 2 or R.shape[-1] != R.shape[-2]:
        raise ValueError(
            f"{metric}: the accuracy matrix R must be square in its last two axes, [..., T, T]; "
            f"got shape {R.shape}"
        )
    if R.shape[-1] < min_tasks:
        raise ValueError(
            f"{metric} needs at least {min_tasks} task{'s' if min_tasks > 1 else ''} (T >= {min_tasks}); "
            f"got R of shape {R.shape}"
        )
    return R


def _check_init(b, n_tasks: int, metric: str) -> np.ndarray:
    """``b`` as a float64 array, after checking that its last axis has ``T`` entries."""
    b = np.asarray(b, dtype=np.float64)
    if b.ndim < 1 or b.shape[-1] != n_tasks:
        raise ValueError(
            f"{metric}: the initial accuracies b must be [..., T] with T = {n_tasks} (from R); "
            f"got shape {b.shape}"
        )
    return b


def average_accuracy(R) -> np.ndarray:
    r"""Average accuracy (ACC): mean accuracy over all tasks after training the last one.

    .. math::
      \mathrm{ACC} = \frac{1}{T} \sum_{j=0}^{T-1} R_{T-1, j}

    Tasks are weighted equally, as in GEM and most papers since; frameworks that pool every test example
    of the stream (Avalanche's stream accuracy) weight tasks by their test-set size instead, which differs
    when tasks have unequal sizes.

    Args:
      R: accuracy matrix ``[..., T, T]``, ``R[..., i, j]`` = accuracy on task ``j`` after training task ``i``.

    Returns:
      ACC, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
      >>> round(float(metrics.average_accuracy(R)), 4)
      0.7

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017
    """
    R = _check_matrix(R, 1, "average_accuracy")
    return np.asarray(R[..., -1, :].mean(axis=-1))


def learning_accuracy(R) -> np.ndarray:
    r"""Learning accuracy (LA): mean accuracy on each task right after training it, the plasticity side.

    .. math::
      \mathrm{LA} = \frac{1}{T} \sum_{j=0}^{T-1} R_{j, j}

    A learner that loses plasticity has a falling diagonal even when it forgets nothing; ACC mixes the two
    effects, LA isolates the first: ``ACC = LA + (T-1)/T * BWT``.

    Args:
      R: accuracy matrix ``[..., T, T]``.

    Returns:
      LA, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
      >>> round(float(metrics.learning_accuracy(R)), 4)
      0.85

    References:
      Riemer et al., `Learning to Learn without Forgetting by Maximizing Transfer and Minimizing
      Interference <https://arxiv.org/abs/1810.11910>`_, 2019
    """
    R = _check_matrix(R, 1, "learning_accuracy")
    return np.asarray(np.diagonal(R, axis1=-2, axis2=-1).mean(axis=-1))


def backward_transfer(R) -> np.ndarray:
    r"""Backward transfer (BWT) of GEM: final minus just-trained accuracy, over all but the last task.

    .. math::
      \mathrm{BWT} = \frac{1}{T-1} \sum_{j=0}^{T-2} \left( R_{T-1, j} - R_{j, j} \right)

    Negative values mean forgetting. Avalanche's BWT is the same number (it is minus
    :func:`forgetting_avalanche`); Continuum averages over every later row instead, see
    :func:`backward_transfer_continuum`.

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.

    Returns:
      BWT, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
      >>> round(float(metrics.backward_transfer(R)), 4)
      -0.3

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017
    """
    R = _check_matrix(R, 2, "backward_transfer")
    diag = np.diagonal(R, axis1=-2, axis2=-1)
    return np.asarray((R[..., -1, :-1] - diag[..., :-1]).mean(axis=-1))


def forward_transfer(R, b) -> np.ndarray:
    r"""Forward transfer (FWT) of GEM: accuracy on a task just before training it, minus its initial accuracy.

    .. math::
      \mathrm{FWT} = \frac{1}{T-1} \sum_{j=1}^{T-1} \left( R_{j-1, j} - b_j \right)

    ``b`` is the accuracy of the untrained model (GEM uses a model at random initialization), so FWT
    measures zero-shot gains from earlier tasks. Only meaningful when a task can be evaluated before it is
    trained (task-incremental heads or a shared label space).

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.
      b: accuracy on each task before any training, ``[..., T]``; leading axes broadcast against ``R``'s.

    Returns:
      FWT, the broadcast of ``R``'s and ``b``'s leading shapes.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.2], [0.6, 0.8]])
      >>> round(float(metrics.forward_transfer(R, b=np.array([0.1, 0.1]))), 4)
      0.1

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017
    """
    R = _check_matrix(R, 2, "forward_transfer")
    b = _check_init(b, R.shape[-1], "forward_transfer")
    before = np.diagonal(R, offset=1, axis1=-2, axis2=-1)  # R[..., j-1, j] for j = 1..T-1
    return np.asarray((before - b[..., 1:]).mean(axis=-1))


def forgetting(R) -> np.ndarray:
    r"""Forgetting of Chaudhry et al. (2018): best earlier accuracy minus final accuracy.

    .. math::
      F = \frac{1}{T-1} \sum_{j=0}^{T-2} \left( \max_{l \in [j, T-2]} R_{l, j} - R_{T-1, j} \right)

    The max runs over the rows from the one that trained task ``j`` to the one before last, so a task that
    improves at the end gives a negative term and ``F`` can be negative. FACIL and Continuum implement this
    convention; Avalanche and Mammoth use others, see :func:`forgetting_avalanche` and
    :func:`forgetting_mammoth`.

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.

    Returns:
      Forgetting, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1, 0.1], [0.95, 0.8, 0.1], [0.6, 0.85, 0.7]])
      >>> round(float(metrics.forgetting(R)), 4)
      0.15

    References:
      Chaudhry et al., `Riemannian Walk for Incremental Learning: Understanding Forgetting and
      Intransigence <https://arxiv.org/abs/1801.10112>`_, 2018
    """
    R = _check_matrix(R, 2, "forgetting")
    T = R.shape[-1]
    rows = np.arange(T)[:, None]
    cols = np.arange(T)[None, :]
    seen = (rows >= cols) & (rows <= T - 2)  # l in [j, T-2]
    best = np.where(seen, R, -np.inf)[..., :-1].max(axis=-2)  # [..., T-1] over columns j < T-1
    return np.asarray((best - R[..., -1, :-1]).mean(axis=-1))


def forgetting_avalanche(R) -> np.ndarray:
    r"""Forgetting as Avalanche computes it: accuracy just after training a task minus final accuracy.

    .. math::
      F_{\mathrm{avl}} = \frac{1}{T-1} \sum_{j=0}^{T-2} \left( R_{j, j} - R_{T-1, j} \right)
      = -\mathrm{BWT}

    Unlike :func:`forgetting` it ignores any improvement between training a task and the end, so it equals
    minus GEM's :func:`backward_transfer`. Terms can be negative.

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.

    Returns:
      Forgetting, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1, 0.1], [0.95, 0.8, 0.1], [0.6, 0.85, 0.7]])
      >>> round(float(metrics.forgetting_avalanche(R)), 4)
      0.125

    References:
      Lomonaco et al., `Avalanche: an End-to-End Library for Continual Learning
      <https://arxiv.org/abs/2104.00405>`_, 2021
    """
    R = _check_matrix(R, 2, "forgetting_avalanche")
    diag = np.diagonal(R, axis1=-2, axis2=-1)
    return np.asarray((diag[..., :-1] - R[..., -1, :-1]).mean(axis=-1))


def forgetting_mammoth(R) -> np.ndarray:
    r"""Forgetting as Mammoth computes it: best accuracy over every row from training onward, final included.

    .. math::
      F_{\mathrm{mam}} = \frac{1}{T-1} \sum_{j=0}^{T-2}
      \left( \max_{l \in [j, T-1]} R_{l, j} - R_{T-1, j} \right)

    Because the max includes the last row, each term is ``>= 0`` and so is the mean. Mammoth keeps only the
    accuracies of tasks already seen (zeros elsewhere) and takes the max over all rows; for non-negative
    accuracies that is the max over ``l >= j`` used here, so ``R``'s upper triangle (accuracies before a task
    is trained) never enters.

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.

    Returns:
      Forgetting, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1, 0.1], [0.95, 0.8, 0.1], [0.6, 0.85, 0.7]])
      >>> round(float(metrics.forgetting_mammoth(R)), 4)
      0.175

    References:
      Buzzega et al., `Dark Experience for General Continual Learning: a Strong, Simple Baseline
      <https://arxiv.org/abs/2004.07211>`_, 2020
    """
    R = _check_matrix(R, 2, "forgetting_mammoth")
    T = R.shape[-1]
    seen = np.arange(T)[:, None] >= np.arange(T)[None, :]  # l >= j
    best = np.where(seen, R, -np.inf)[..., :-1].max(axis=-2)
    return np.asarray((best - R[..., -1, :-1]).mean(axis=-1))


def backward_transfer_continuum(R) -> np.ndarray:
    r"""Backward transfer as Continuum computes it: averaged over every later row, not just the last.

    .. math::
      \mathrm{BWT}_{\mathrm{ctm}} = \frac{2}{T(T-1)} \sum_{i=1}^{T-1} \sum_{j=0}^{i-1}
      \left( R_{i, j} - R_{j, j} \right)

    It averages all ``T(T-1)/2`` lower-triangle pairs, so forgetting early in the stream counts even if the
    task recovers later; GEM's :func:`backward_transfer` uses only the last row.

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.

    Returns:
      BWT, shape ``[...]``.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
      >>> round(float(metrics.backward_transfer_continuum(R)), 4)
      -0.3

    References:
      Douillard & Lesort, `Continuum: Simple Management of Complex Continual Learning Scenarios
      <https://arxiv.org/abs/2102.06253>`_, 2021
    """
    R = _check_matrix(R, 2, "backward_transfer_continuum")
    T = R.shape[-1]
    lower = np.arange(T)[:, None] > np.arange(T)[None, :]  # i > j
    diag = np.diagonal(R, axis1=-2, axis2=-1)
    delta = R - diag[..., None, :]  # R[i, j] - R[j, j]
    return np.asarray(delta[..., lower].mean(axis=-1))


def summary(R, b=None) -> dict[str, np.ndarray]:
    r"""Every metric of this module at once, keyed by function name.

    .. math::
      \{\mathrm{ACC}, \mathrm{LA}, \mathrm{BWT}, \mathrm{FWT}, F, F_{\mathrm{avl}}, F_{\mathrm{mam}},
      \mathrm{BWT}_{\mathrm{ctm}}\}

    Args:
      R: accuracy matrix ``[..., T, T]`` with ``T >= 2``.
      b: accuracy on each task before any training, ``[..., T]``; without it ``forward_transfer`` is left
        out.

    Returns:
      A dict from metric name to its value, each of shape ``[...]``. A run whose matrix holds a NaN (a
      diverged run) gets NaN for *every* metric, also those whose entries predate the divergence (forward
      transfer reads only entries above the diagonal), so a diverged run is never summarised.

    Examples:
      >>> import numpy as np
      >>> from nestlearn import metrics
      >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
      >>> {k: round(float(v), 4) for k, v in metrics.summary(R).items()}["backward_transfer"]
      -0.3

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017; Chaudhry et al., `Riemannian Walk for Incremental
      Learning <https://arxiv.org/abs/1801.10112>`_, 2018
    """
    R = _check_matrix(R, 2, "summary")
    out = {
        "average_accuracy": average_accuracy(R),
        "learning_accuracy": learning_accuracy(R),
        "backward_transfer": backward_transfer(R),
    }
    if b is not None:
        out["forward_transfer"] = forward_transfer(R, b)
    out["forgetting"] = forgetting(R)
    out["forgetting_avalanche"] = forgetting_avalanche(R)
    out["forgetting_mammoth"] = forgetting_mammoth(R)
    out["backward_transfer_continuum"] = backward_transfer_continuum(R)
    diverged = np.isnan(R).any(axis=(-2, -1))  # a diverged run's matrix holds NaN after its divergence
    return {k: np.where(diverged, np.nan, v) for k, v in out.items()}
