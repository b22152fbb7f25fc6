"""Continual-learning benchmarks on CIFAR: split CIFAR-10/100 in three scenarios, incremental CIFAR-100.

Every builder reads the binary distribution with :func:`~nestlearn.tasks.load_cifar10` /
:func:`~nestlearn.tasks.load_cifar100` (or takes an :class:`~nestlearn.tasks.ImageData` already loaded)
and returns a :class:`~nestlearn.tasks.TaskStream` from :func:`~nestlearn.tasks.stream_from_pool`: the
pixels stay on device as uint8 ``[n, 32, 32, 3]`` (150 MB for CIFAR's 50,000 training images, a quarter of
float32), and each batch is scaled, normalised with the dataset's per-channel mean and standard deviation
and, for training, augmented (random 32×32 crop of the image zero-padded by 4 pixels, horizontal flip with
probability 1/2) inside the compiled program, per run under ``vmap`` from the run's key. Evaluation is
never augmented.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from nestlearn._errors import ConfigError
from nestlearn.tasks._arrays import SCENARIOS, stream_from_pool
from nestlearn.tasks._formats import ImageData, load_cifar10, load_cifar100
from nestlearn.tasks._stream import TaskStream

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "channel_stats", "incremental_cifar100",
           "split_cifar10", "split_cifar100"]  # fmt: skip

# Per-channel mean and standard deviation of the training images, pixels scaled to [0, 1] (the values
# that channel_stats gives on the official training sets; Mammoth and Avalanche normalise with these).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of uint8 images ``[n, H, W, C]`` scaled to [0, 1].

    Accumulates in float64 one image block at a time, so 50,000 CIFAR images need no float copy.
    """
    x = np.asarray(x)
    c = x.shape[-1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, x.shape[0], 4096):
        block = x[start : start + 4096].reshape(-1, c).astype(np.float64) / 255.0
        total += block.sum(0)
        sq += (block**2).sum(0)
        count += block.shape[0]
    mean = total / count
    return mean, np.sqrt(np.maximum(sq / count - mean**2, 0.0))


def _data(data: ImageData | None, path, loader, **kw) -> ImageData:
    if (data is None) == (path is None):
        raise ConfigError("give either data or path (the directory of the binary files), exactly one")
    return data if data is not None else loader(path, **kw)


def _order(class_order: Sequence[int] | None, n: int) -> np.ndarray:
    if class_order is None:
        return np.arange(n)
    order = np.asarray(class_order)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ConfigError(f"class_order must be a permutation of 0..{n - 1}, got {list(order)[:8]}...")
    return order


def _split(
    data: ImageData, scenario: str, n_tasks: int, class_order, name: str, mean, std, augment: bool
) -> TaskStream:
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario={scenario!r} is unknown: allowed {', '.join(map(repr, SCENARIOS))}")
    n = data.n_classes
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1 or n % n_tasks:
        raise ConfigError(f"n_tasks={n_tasks!r} must divide the {n} classes of {name} evenly")
    per = n // n_tasks
    order = _order(class_order, n)
    groups = [order[t * per : (t + 1) * per] for t in range(n_tasks)]
    return stream_from_pool(
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        task_classes=groups,
        scenario=scenario,
        n_labels=n,
        mean=mean,
        std=std,
        crop_padding=4 if augment else 0,
        flip=augment,
        name=name,
    )


def split_cifar10(
    scenario: str = "class",
    n_tasks: int = 5,
    *,
    path: str | os.PathLike | None = None,
    data: ImageData | None = None,
    class_order: Sequence[int] | None = None,
    augment: bool = True,
) -> TaskStream:
    """Split CIFAR-10: five tasks of two classes, ``{2t, 2t+1}`` (airplane/automobile, bird/cat, ...).

    Scenarios as in :func:`~nestlearn.tasks.split_mnist`: ``"task"`` (10 units, each task masked to its
    two), ``"domain"`` (2 units: the task's smaller class is 0) and ``"class"`` (10 units, all usable). The
    setting of GEM, DER++ and Mammoth (``seq-cifar10``): 50,000 training and 10,000 test images,
    normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, crop-and-flip augmentation in training.

    Args:
      scenario: ``"task"``, ``"domain"`` or ``"class"``.
      n_tasks: tasks, dividing 10 (5 by default; 2 gives five classes per task).
      path: the binary distribution (see :func:`~nestlearn.tasks.load_cifar10`), or
      data: the images already loaded (exactly one of the two).
      class_order: a permutation of the classes; task ``t`` takes the next ``10 / n_tasks`` of it.
      augment: crop-and-flip augmentation of training batches.

    Returns:
      The stream, inputs ``[batch, 32, 32, 3]``.

    Raises:
      ConfigError: unknown scenario, ``n_tasks`` not dividing 10, both or neither of ``path`` and ``data``.
      DataError: the files are missing or corrupt.
    """
    data = _data(data, path, load_cifar10)
    return _split(data, scenario, n_tasks, class_order, "split_cifar10", CIFAR10_MEAN, CIFAR10_STD, augment)


def split_cifar100(
    scenario: str = "class",
    n_tasks: int = 10,
    *,
    path: str | os.PathLike | None = None,
    data: ImageData | None = None,
    class_order: Sequence[int] | None = None,
    augment: bool = True,
) -> TaskStream:
    """Split CIFAR-100: ``n_tasks`` tasks (10 or 20 usually) of ``100 / n_tasks`` fine classes each.

    Task ``t`` holds classes ``class_order[t*k : (t+1)*k]`` (label order by default; iCaRL-style
    benchmarks shuffle it with a fixed seed: pass ``np.random.default_rng(1993).permutation(100)``).
    Scenarios, normalisation (:data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`) and augmentation as in
    :func:`split_cifar10`; in ``"domain"`` the ``i``-th smallest class of a task is label ``i``.

    Args:
      scenario: ``"task"``, ``"domain"`` or ``"class"``.
      n_tasks: tasks, dividing 100.
      path, data: the binary distribution's directory or the loaded fine-label data (exactly one).
      class_order: a permutation of the 100 classes.
      augment: crop-and-flip augmentation of training batches.

    Returns:
      The stream, inputs ``[batch, 32, 32, 3]``.
    """
    data = _data(data, path, load_cifar100)
    return _split(
        data, scenario, n_tasks, class_order, "split_cifar100", CIFAR100_MEAN, CIFAR100_STD, augment
    )


def incremental_cifar100(
    classes_per_task: int = 5,
    *,
    path: str | os.PathLike | None = None,
    data: ImageData | None = None,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
    augment: bool = True,
) -> TaskStream:
    """Incremental CIFAR-100 for loss of plasticity (Dohare et al. 2024): classes arrive a few at a time.

    Task ``t`` trains and tests on every class seen so far, the first ``(t + 1) * classes_per_task`` of
    the class order (20 tasks for the default 5), through one 100-unit head (class-incremental). A
    network that keeps its plasticity should keep improving as classes are added; Dohare et al. compare
    continual training against a network re-initialised at each increase.

    Args:
      classes_per_task: classes added per task, dividing 100.
      path, data: the binary distribution's directory or the loaded fine-label data (exactly one).
      class_order: the order in which classes arrive, or
      seed: draw it as ``np.random.default_rng(seed).permutation(100)`` (label order if neither).
      augment: crop-and-flip augmentation of training batches.

    Returns:
      The stream; ``train_n`` grows by ``classes_per_task * 500`` per task.

    Reference: S. Dohare et al., "Loss of plasticity in deep continual learning", Nature 632, 2024.
    """
    data = _data(data, path, load_cifar100)
    n = data.n_classes
    if (
        isinstance(classes_per_task, bool)
        or not isinstance(classes_per_task, int)
        or classes_per_task < 1
        or n % classes_per_task
    ):
        raise ConfigError(f"classes_per_task={classes_per_task!r} must divide the {n} classes evenly")
    if class_order is not None and seed is not None:
        raise ConfigError("give class_order or seed, not both")
    order = _order(np.random.default_rng(seed).permutation(n) if seed is not None else class_order, n)
    n_tasks = n // classes_per_task
    groups = [order[: (t + 1) * classes_per_task] for t in range(n_tasks)]
    return stream_from_pool(
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        task_classes=groups,
        scenario="class",
        n_labels=n,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        crop_padding=4 if augment else 0,
        flip=augment,
        name="incremental_cifar100",
        task_names=tuple(f"{(t + 1) * classes_per_task} classes" for t in range(n_tasks)),
    )
