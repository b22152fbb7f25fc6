"""N-way K-shot task families from any labelled data: arrays, a loader's output or a task stream.

:func:`few_shot_tasks` splits the classes of a labelled set into disjoint meta-training and meta-test
classes and returns one :class:`~nestlearn.tasks.FewShotClassification` per side; their ``sample(key,
n_tasks)`` is pure JAX with static shapes, so the meta-trainers of :mod:`nestlearn.meta` draw tasks inside
one compiled ``lax.scan`` and ``vmap`` over seeds. :func:`omniglot_few_shot` and
:func:`mini_imagenet_few_shot` are the two standard image benchmarks (Vinyals et al. 2016; Finn et al.
2017) built on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from nestlearn._errors import ConfigError, DataError
from nestlearn.tasks._data import MnistData
from nestlearn.tasks._formats import ImageData, LabelledImages, load_mini_imagenet, load_omniglot
from nestlearn.tasks._meta import FewShotClassification
from nestlearn.tasks._stream import TaskStream

__all__ = ["few_shot_tasks", "labelled_arrays", "mini_imagenet_few_shot", "omniglot_few_shot"]

# Per-channel statistics of mini-ImageNet's pixels (scaled to [0, 1]), as used by common implementations.
MINI_IMAGENET_MEAN = (0.4728, 0.4487, 0.4031)
MINI_IMAGENET_STD = (0.2744, 0.2663, 0.2806)


def labelled_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` host arrays of a labelled source, every example it holds.

    Accepts an ``(x, y)`` pair, :class:`~nestlearn.tasks.LabelledImages`, :class:`~nestlearn.tasks.ImageData`
    or :class:`~nestlearn.tasks.MnistData` (train and test pooled), or a
    :class:`~nestlearn.tasks.TaskStream` (its training and test pools with their original labels, the
    raw pool arrays: uint8 images stay uint8, task input maps are not applied).
    """
    if isinstance(source, LabelledImages):
        return np.asarray(source.x), np.asarray(source.y)
    if isinstance(source, (ImageData, MnistData)):
        return (
            np.concatenate([np.asarray(source.train_x), np.asarray(source.test_x)]),
            np.concatenate([np.asarray(source.train_y), np.asarray(source.test_y)]),
        )
    if isinstance(source, TaskStream):
        return (
            np.concatenate([np.asarray(source.train_x), np.asarray(source.test_x)]),
            np.concatenate([np.asarray(source.train_y), np.asarray(source.test_y)]),
        )
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return np.asarray(source[0]), np.asarray(source[1])
    raise ConfigError(
        f"source must be an (x, y) pair, LabelledImages, ImageData, MnistData or TaskStream, got {type(source).__name__}"
    )


def few_shot_tasks(
    source,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    meta_test_classes: Sequence[int] | int | None = None,
    meta_train_classes: Sequence[int] | None = None,
    seed: int = 0,
    rotations: int = 1,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    max_per_class: int | None = None,
) -> tuple[FewShotClassification, FewShotClassification]:
    """Meta-training and meta-test N-way K-shot families over disjoint classes of any labelled data.

    The class split: ``meta_test_classes`` as a list is taken as given; as an int ``m`` (default: a fifth
    of the classes, at least ``n_way``) the meta-test classes are the last ``m`` of
    ``np.random.default_rng(seed).permutation(classes)``; the meta-training classes are the others (or
    ``meta_train_classes``, which must not overlap). Classes are the distinct labels of ``source``.

    Args:
      source: an ``(x, y)`` pair or a loader's or stream's data (see :func:`labelled_arrays`).
      n_way, k_shot, k_query: classes per task, support and query images per class.
      meta_test_classes: the held-out labels, or how many to hold out at random.
      meta_train_classes: the meta-training labels (default: all the others).
      seed: seed of the random class split.
      rotations: 4 adds 90/180/270-degree turns of every class as new classes (square images).
      mean, std: per-channel normalisation after uint8 scaling.
      max_per_class: images kept per class (default: as many as the smallest class has, per side).

    Returns:
      ``(meta_train, meta_test)``.

    Raises:
      ConfigError: the class lists overlap or name absent labels, a side has fewer than ``n_way``
        classes or too few images per class, or ``source`` is of an unknown kind.

    Example:
      >>> import jax, numpy as np
      >>> x = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
      >>> train, test = few_shot_tasks((x, np.arange(200) % 20), n_way=3, k_shot=1, k_query=2)
      >>> train.n_classes, test.n_classes, train.sample(jax.random.key(0), 4).support_x.shape
      (16, 4, (4, 3, 8, 8, 1))
    """
    x, y = labelled_arrays(source)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    labels = np.unique(y)
    if isinstance(meta_test_classes, (int, np.integer)) or meta_test_classes is None:
        m = max(n_way, round(labels.size / 5)) if meta_test_classes is None else int(meta_test_classes)
        if not 1 <= m < labels.size:
            raise ConfigError(
                f"meta_test_classes={m} must be in 1..{labels.size - 1} ({labels.size} classes)"
            )
        perm = np.random.default_rng(seed).permutation(labels)
        test = tuple(int(c) for c in np.sort(perm[labels.size - m :]))
    else:
        test = tuple(int(c) for c in meta_test_classes)
    if meta_train_classes is None:
        train = tuple(int(c) for c in labels if int(c) not in set(test))
    else:
        train = tuple(int(c) for c in meta_train_classes)
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ConfigError(f"meta-train and meta-test classes must be disjoint, both hold {overlap[:10]}")
    families = []
    for name, classes in (("meta-train", train), ("meta-test", test)):
        try:
            families.append(
                FewShotClassification.from_arrays(
                    x,
                    y,
                    classes=classes,
                    n_way=n_way,
                    k_shot=k_shot,
                    k_query=k_query,
                    rotations=rotations,
                    mean=mean,
                    std=std,
                    max_per_class=max_per_class,
                )  # fmt: skip
            )
        except ConfigError as e:
            raise ConfigError(f"{name} classes: {e}") from None
    return families[0], families[1]


def omniglot_few_shot(
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    *,
    path: str | os.PathLike | None = None,
    data: LabelledImages | None = None,
    n_train_characters: int = 1200,
    seed: int = 0,
    rotations: int = 4,
) -> tuple[FewShotClassification, FewShotClassification]:
    """Omniglot N-way K-shot (Vinyals et al. 2016; MAML): 1,200 characters to meta-train, the rest to test.

    The 1,623 characters of :func:`~nestlearn.tasks.load_omniglot` (28×28, one channel, 20 drawings each)
    are shuffled by ``np.random.default_rng(seed)``; the first ``n_train_characters`` meta-train, the other
    423 meta-test. With ``rotations=4`` every character also appears turned by 90, 180 and 270 degrees as
    three further classes on its own side (4,800 meta-training classes), as in Matching Networks and
    MAML. Pixels are scaled to [0, 1], not normalised.

    Args:
      n_way, k_shot, k_query: the task shape (MAML: 5- and 20-way, 1 and 5 shots).
      path: the directory holding ``images_background`` and ``images_evaluation``, or
      data: the characters already loaded (exactly one of the two).
      n_train_characters: characters that meta-train.
      seed: seed of the character split.
      rotations: 4 (rotation-augmented classes) or 1.

    Returns:
      ``(meta_train, meta_test)``, inputs ``[.., 28, 28, 1]``.
    """
    if (data is None) == (path is None):
        raise ConfigError("give either data or path (Omniglot's directory), exactly one")
    data = data if data is not None else load_omniglot(path)
    n = data.n_classes
    if not 1 <= n_train_characters < n:
        raise ConfigError(f"n_train_characters={n_train_characters} must be in 1..{n - 1} ({n} characters)")
    perm = np.random.default_rng(seed).permutation(n)
    return few_shot_tasks(
        data,
        n_way=n_way,
        k_shot=k_shot,
        k_query=k_query,
        meta_train_classes=tuple(int(c) for c in np.sort(perm[:n_train_characters])),
        meta_test_classes=tuple(int(c) for c in np.sort(perm[n_train_characters:])),
        rotations=rotations,
    )


def mini_imagenet_few_shot(
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    *,
    path: str | os.PathLike | None = None,
    data: dict[str, LabelledImages] | None = None,
    test_split: str = "test",
    normalise: bool = True,
) -> tuple[FewShotClassification, FewShotClassification]:
    """mini-ImageNet N-way K-shot: meta-train on the 64 ``train`` classes, meta-test on ``test`` (or ``val``).

    The split folders of :func:`~nestlearn.tasks.load_mini_imagenet` (84×84 RGB, 600 images per class)
    are disjoint by construction (Ravi & Larochelle's split). Inputs are normalised per channel with
    ``MINI_IMAGENET_MEAN``/``MINI_IMAGENET_STD`` unless ``normalise=False``.

    Args:
      n_way, k_shot, k_query: the task shape (5-way 1- and 5-shot in MAML, 15 queries per class).
      path: the directory of the ``train``/``val``/``test`` folders, or
      data: the splits already loaded (``{"train": ..., "test": ...}``; exactly one of the two).
      test_split: ``"test"`` or ``"val"``.
      normalise: per-channel normalisation.

    Returns:
      ``(meta_train, meta_test)``, inputs ``[.., 84, 84, 3]``.
    """
    if (data is None) == (path is None):
        raise ConfigError("give either data or path (mini-ImageNet's directory), exactly one")
    if test_split not in ("test", "val"):
        raise ConfigError(f"test_split={test_split!r} is unknown: allowed 'test', 'val'")
    data = data if data is not None else load_mini_imagenet(path, splits=("train", test_split))
    missing = [s for s in ("train", test_split) if s not in data]
    if missing:
        raise ConfigError(f"data has no {missing[0]!r} split (keys: {sorted(data)})")
    stats = dict(mean=MINI_IMAGENET_MEAN, std=MINI_IMAGENET_STD) if normalise else {}
    families = []
    for name in ("train", test_split):
        part = data[name]
        try:
            families.append(
                FewShotClassification.from_arrays(
                    part.x,
                    part.y,
                    classes=np.unique(part.y),
                    n_way=n_way,
                    k_shot=k_shot,
                    k_query=k_query,
                    **stats,
                )  # fmt: skip
            )
        except ConfigError as e:
            raise ConfigError(f"mini-ImageNet {name} split: {e}") from None
    return families[0], families[1]
