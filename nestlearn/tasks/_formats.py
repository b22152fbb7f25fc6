"""Loaders for the usual on-disk formats of image datasets, as uint8 NHWC arrays on the host.

Nothing here downloads. Each loader reads the files of a dataset's standard distribution at a path the
user gives and returns :class:`LabelledImages` (one labelled set) or :class:`ImageData` (an official train
and test split), pixels uint8 ``[n, H, W, C]`` and labels int32, class names sorted deterministically:

- :func:`load_cifar10`, :func:`load_cifar100`: the *binary* distribution (``cifar-10-batches-bin``,
  ``cifar-100-binary``); records are read with numpy, no pickle on any path.
- :func:`load_image_folder`: ``root/<class>/*.png|jpg`` trees, classes at any depth (Omniglot's
  ``alphabet/character``), resized with Pillow; :func:`load_omniglot`, :func:`load_mini_imagenet` and
  :func:`load_tiny_imagenet` know their datasets' layouts.
- :func:`load_fashion_mnist`, :func:`load_kmnist`: IDX files, read by :func:`~nestlearn.tasks.read_idx`.

A missing file raises a one-line :class:`~nestlearn.DataError` naming the expected layout and where the
dataset is usually obtained.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from jaxtyping import Int, UInt8

from nestlearn._errors import ConfigError, DataError
from nestlearn.tasks._data import _check_idx_pair, _find_idx, _frozen, read_idx

__all__ = [
    "ImageData",
    "LabelledImages",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_image_folder",
    "load_kmnist",
    "load_mini_imagenet",
    "load_omniglot",
    "load_tiny_imagenet",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImages:
    """A labelled set of images as read-only host arrays.

    Attributes:
      x: pixels, ``[n, H, W, C]`` uint8 (``C = 1`` for grayscale, ``3`` for colour).
      y: labels, ``[n]`` int32 in ``0..len(class_names)-1``.
      class_names: name of each label (a folder's relative path, a dataset's official name).
      source: where the images came from, for run records.
    """

    x: UInt8[np.ndarray, "n h w c"]
    y: Int[np.ndarray, " n"]
    class_names: tuple[str, ...]
    source: str

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """A dataset with its official train/test split (the same classes on both sides).

    Attributes:
      train_x, train_y: training images ``[n, H, W, C]`` uint8 and labels ``[n]`` int32.
      test_x, test_y: the same for the test split.
      class_names: name of each label.
      source: where the data came from.
    """

    train_x: UInt8[np.ndarray, "n h w c"]
    train_y: Int[np.ndarray, " n"]
    test_x: UInt8[np.ndarray, "m h w c"]
    test_y: Int[np.ndarray, " m"]
    class_names: tuple[str, ...]
    source: str

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def train(self) -> LabelledImages:
        return LabelledImages(self.train_x, self.train_y, self.class_names, f"{self.source} (train)")

    @property
    def test(self) -> LabelledImages:
        return LabelledImages(self.test_x, self.test_y, self.class_names, f"{self.source} (test)")


# --------------------------------------------------------------------------------------------- CIFAR

_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR10_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))


def _cifar_dir(path: str | os.PathLike, subdir: str, files: Sequence[str], layout: str) -> Path:
    """The directory holding ``files``: ``path`` itself or ``path/subdir``; a DataError naming the layout."""
    root = Path(path)
    for directory in (root, root / subdir):
        if all((directory / f).is_file() for f in files):
            return directory
    directory = root / subdir if (root / subdir).is_dir() else root
    missing = [f for f in files if not (directory / f).is_file()]
    raise DataError(
        f"{directory} is missing {', '.join(missing)}: expected {layout} (the binary version, "
        f"not the python one, from {_CIFAR_URL})"
    )


def _read_records(file: Path, n_label_bytes: int, n_labels: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Fixed-size records of label bytes then 3072 CHW pixel bytes; returns labels and NHWC images."""
    record = n_label_bytes + _CIFAR_PIXELS
    try:
        raw = np.fromfile(file, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"CIFAR file {file} cannot be read: {e.strerror or e}") from None
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"CIFAR file {file} has {raw.size} bytes, not a positive multiple of its {record}-byte records "
            f"({n_label_bytes} label byte(s) + {_CIFAR_PIXELS} pixels): truncated or not a CIFAR binary file"
        )
    rows = raw.reshape(-1, record)
    labels = []
    for i, high in enumerate(n_labels):
        lab = rows[:, i]
        if lab.max() >= high:
            bad = np.flatnonzero(lab >= high)
            raise DataError(
                f"CIFAR file {file} has label byte {i} = {int(lab[bad[0]])} at record {int(bad[0])} "
                f"(allowed 0..{high - 1}; {bad.size} records in all): not a CIFAR-{n_labels[-1]} binary file"
            )
        labels.append(lab.astype(np.int32))
    chw = rows[:, n_label_bytes:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return (*labels, np.ascontiguousarray(chw.transpose(0, 2, 3, 1)))


def _names(file: Path, n: int, fallback: str) -> tuple[str, ...]:
    """Class names from a text file of one name a line (CIFAR's ``*.txt`` metadata), else numbered."""
    if file.is_file():
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) == n:
            return tuple(names)
    return tuple(f"{fallback}{i}" for i in range(n))


def load_cifar10(path: str | os.PathLike) -> ImageData:
    """CIFAR-10 from its binary distribution (``cifar-10-binary.tar.gz``, unpacked).

    The directory (``path`` or ``path/cifar-10-batches-bin``) holds ``data_batch_1.bin`` ..
    ``data_batch_5.bin`` (10,000 records each, read in that order) and ``test_batch.bin``. A record is 1
    label byte (``0..9``) then 3,072 pixel bytes: the 1,024 red, then green, then blue values of a 32×32
    image, rows top to bottom. Class names come from ``batches.meta.txt`` when present.

    Args:
      path: the unpacked directory.

    Returns:
      50,000 training and 10,000 test images, uint8 ``[n, 32, 32, 3]``.

    Raises:
      DataError: a file is missing, its size is not a multiple of 3,073 bytes, or a label exceeds 9.

    Example:
      >>> data = load_cifar10("~/data/cifar-10-batches-bin")  # doctest: +SKIP
      >>> data.train_x.shape, data.class_names[:2]             # doctest: +SKIP
      ((50000, 32, 32, 3), ('airplane', 'automobile'))
    """
    path = Path(path).expanduser()
    layout = "cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin}"
    directory = _cifar_dir(path, "cifar-10-batches-bin", (*_CIFAR10_FILES, "test_batch.bin"), layout)
    parts = [_read_records(directory / f, 1, (10,)) for f in _CIFAR10_FILES]
    test_y, test_x = _read_records(directory / "test_batch.bin", 1, (10,))
    return ImageData(
        train_x=_frozen(np.concatenate([p[1] for p in parts])),
        train_y=_frozen(np.concatenate([p[0] for p in parts])),
        test_x=_frozen(test_x),
        test_y=_frozen(test_y),
        class_names=_names(directory / "batches.meta.txt", 10, "class_"),
        source=f"CIFAR-10 binary files in {directory}",
    )


def load_cifar100(path: str | os.PathLike, *, label: str = "fine") -> ImageData:
    """CIFAR-100 from its binary distribution (``cifar-100-binary.tar.gz``, unpacked).

    The directory (``path`` or ``path/cifar-100-binary``) holds ``train.bin`` (50,000 records) and
    ``test.bin`` (10,000). A record is 1 coarse label byte (``0..19``), 1 fine label byte (``0..99``),
    then 3,072 pixel bytes (CHW, as CIFAR-10). Class names come from ``fine_label_names.txt`` /
    ``coarse_label_names.txt`` when present.

    Args:
      path: the unpacked directory.
      label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
      Images uint8 ``[n, 32, 32, 3]`` with the chosen labels.

    Raises:
      ConfigError: ``label`` is neither ``"fine"`` nor ``"coarse"``.
      DataError: a file is missing, its size is not a multiple of 3,074 bytes, or a label is out of range.
    """
    if label not in ("fine", "coarse"):
        raise ConfigError(f"label={label!r} is unknown: allowed 'fine', 'coarse'")
    path = Path(path).expanduser()
    layout = "cifar-100-binary/{train.bin, test.bin}"
    directory = _cifar_dir(path, "cifar-100-binary", ("train.bin", "test.bin"), layout)
    which = 1 if label == "fine" else 0
    train = _read_records(directory / "train.bin", 2, (20, 100))
    test = _read_records(directory / "test.bin", 2, (20, 100))
    n = 100 if label == "fine" else 20
    return ImageData(
        train_x=_frozen(train[2]),
        train_y=_frozen(train[which]),
        test_x=_frozen(test[2]),
        test_y=_frozen(test[which]),
        class_names=_names(directory / f"{label}_label_names.txt", n, f"{label}_"),
        source=f"CIFAR-100 binary files in {directory}, {label} labels",
    )


# --------------------------------------------------------------------------------------------- IDX


_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_KMNIST_NAMES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")


def _load_idx_images(path: str | os.PathLike, dataset: str, where: str, names: tuple[str, ...]) -> ImageData:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataError(
            f"{dataset} directory {directory} does not exist: expected train-images-idx3-ubyte[.gz], "
            f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] ({where})"
        )
    try:
        files = _find_idx(directory)
    except DataError as e:
        raise DataError(f"{e} ({dataset}, from {where})") from None
    arrays = {key: read_idx(f) for key, f in files.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays[f"{split}_x"], arrays[f"{split}_y"], files[f"{split}_x"], files[f"{split}_y"])
    return ImageData(
        train_x=_frozen(arrays["train_x"][..., None]),
        train_y=_frozen(arrays["train_y"].astype(np.int32)),
        test_x=_frozen(arrays["test_x"][..., None]),
        test_y=_frozen(arrays["test_y"].astype(np.int32)),
        class_names=names,
        source=f"{dataset} IDX files in {directory}, official train/test split",
    )


def load_fashion_mnist(path: str | os.PathLike) -> ImageData:
    """Fashion-MNIST from its four IDX files (plain or ``.gz``), as uint8 ``[n, 28, 28, 1]``.

    Raises:
      DataError: a file is missing or corrupt (see :func:`~nestlearn.tasks.read_idx`).
    """
    where = "github.com/zalandoresearch/fashion-mnist, data/fashion"
    return _load_idx_images(path, "Fashion-MNIST", where, _FASHION_NAMES)


def load_kmnist(path: str | os.PathLike) -> ImageData:
    """Kuzushiji-MNIST (KMNIST) from its four IDX files (plain or ``.gz``), as uint8 ``[n, 28, 28, 1]``.

    Raises:
      DataError: a file is missing or corrupt (see :func:`~nestlearn.tasks.read_idx`).
    """
    where = "github.com/rois-codh/kmnist, the MNIST-format files"
    return _load_idx_images(path, "KMNIST", where, _KMNIST_NAMES)


# --------------------------------------------------------------------------------------------- folders


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        h, w = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be an int or an (height, width) pair, got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive, got {size!r}")
    return h, w


def _decode(file: Path, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image {file} cannot be decoded: {e}") from None
    return a[..., None] if a.ndim == 2 else a


def _class_dirs(root: Path, depth: int) -> list[Path]:
    level = [root]
    for _ in range(depth):
        level = sorted(d for parent in level for d in parent.iterdir() if d.is_dir())
    return level


def load_image_folder(
    root: str | os.PathLike,
    *,
    size: int | tuple[int, int] | None = None,
    depth: int = 1,
    files: str = "*",
    grayscale: bool = False,
    classes: Sequence[str] | None = None,
    workers: int = 8,
    what: str = "image folder",
    where: str = "",
) -> LabelledImages:
    """Images of a ``root/<class>/<image>`` tree, one class per folder at ``depth`` below ``root``.

    ``depth=1`` reads ``root/cat/*.png``; ``depth=2`` reads Omniglot's ``root/<alphabet>/<character>/``,
    each character a class named ``"<alphabet>/<character>"``. Inside a class folder, ``files`` is a glob
    (``"images/*"`` for Tiny-ImageNet's ``train/<wnid>/images/``); only names ending in a usual image
    extension (png, jpg, jpeg, bmp, gif, ...; any case) count. Classes are sorted by their relative path and
    images by name, so labels and order do not depend on the file system. Images are decoded with Pillow
    (in ``workers`` threads), converted to RGB (or ``L`` with ``grayscale``) and resized with Lanczos
    filtering to ``size`` when their size differs.

    Args:
      root: the tree's root directory.
      size: output ``(height, width)`` or one side for squares; ``None`` keeps the files' size (which must
        then agree).
      depth: how many folder levels down the class folders are (``>= 1``).
      files: glob of a class's images relative to its folder.
      grayscale: one channel instead of three.
      classes: read only these classes (relative paths), labelled in this order; default: every folder.
      workers: decoding threads.
      what, where: the dataset's name and where it is usually obtained, for error messages.

    Returns:
      :class:`LabelledImages`, uint8 ``[n, H, W, C]``.

    Raises:
      ConfigError: a bad ``size``, ``depth`` or ``workers``.
      DataError: ``root`` is missing, holds no class folder or an empty class, a listed class is absent,
        an image cannot be decoded, or (without ``size``) images differ in size.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be an int >= 1, got {depth!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    hw = _check_size(size)
    root = Path(root).expanduser()
    layout = f"{root}/" + "/".join(["<class>"] + ["<sub>"] * (depth - 1)) + f"/{files}.png|jpg"
    hint = f" ({where})" if where else ""
    if not root.is_dir():
        raise DataError(f"{what} {root} does not exist: expected {layout}{hint}")
    found = {d.relative_to(root).as_posix(): d for d in _class_dirs(root, depth)}
    if classes is None:
        names = sorted(found)
    else:
        names = [str(c) for c in classes]
        absent = [c for c in names if c not in found]
        if absent:
            raise DataError(f"{what} {root} has no class folder {absent[0]!r} ({len(absent)} missing)")
    if not names:
        raise DataError(f"{what} {root} holds no class folders: expected {layout}{hint}")
    paths, labels = [], []
    for label, name in enumerate(names):
        imgs = sorted(
            p for p in found[name].glob(files) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not imgs:
            raise DataError(f"{what} class folder {found[name]} holds no images matching {files!r}")
        paths += imgs
        labels += [label] * len(imgs)
    mode = "L" if grayscale else "RGB"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda f: _decode(f, hw, mode), paths))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(p for p, a in zip(paths, arrays) if a.shape != first)
        raise DataError(
            f"{what} images differ in size ({paths[0].name}: {first[:2]}, {odd}: "
            f"{next(a.shape for a in arrays if a.shape != first)[:2]}): pass size= to resize them"
        )
    return LabelledImages(
        x=_frozen(np.stack(arrays)),
        y=_frozen(np.asarray(labels, np.int32)),
        class_names=tuple(names),
        source=f"{what} {root} ({len(names)} classes, {len(paths)} images"
        + (f", resized to {hw[0]}x{hw[1]})" if hw else ")"),
    )


_OMNIGLOT_WHERE = "github.com/brendenlake/omniglot, python/images_background.zip and images_evaluation.zip"


def load_omniglot(
    root: str | os.PathLike,
    *,
    size: int = 28,
    parts: Sequence[str] = ("images_background", "images_evaluation"),
    workers: int = 8,
) -> LabelledImages:
    """Omniglot's 1,623 handwritten characters (50 alphabets, 20 drawings each) as classes.

    Reads ``root/<part>/<alphabet>/<character>/*.png`` for each of ``parts`` (the unzipped
    ``images_background`` (964 characters) and ``images_evaluation`` (659)); a class is named
    ``"<part>/<alphabet>/<character>"``. The 105×105 drawings are resized to ``size`` (28 in MAML and
    Matching Networks) as single-channel images. Omniglot's drawings are black strokes on white; they are
    kept so (invert with ``255 - x`` if a model expects strokes high).

    Returns:
      :class:`LabelledImages`, uint8 ``[n, size, size, 1]``.

    Raises:
      DataError: a part is missing or malformed.
    """
    root = Path(root).expanduser()
    xs, ys, names, offset = [], [], [], 0
    for part in parts:
        data = load_image_folder(
            root / part, size=size, depth=2, grayscale=True, workers=workers, what="Omniglot part",
            where=_OMNIGLOT_WHERE,
        )  # fmt: skip
        xs.append(data.x)
        ys.append(data.y + offset)
        names += [f"{part}/{n}" for n in data.class_names]
        offset += data.n_classes
    return LabelledImages(
        x=_frozen(np.concatenate(xs)),
        y=_frozen(np.concatenate(ys)),
        class_names=tuple(names),
        source=f"Omniglot in {root} ({', '.join(parts)}), {size}x{size}",
    )


def load_mini_imagenet(
    root: str | os.PathLike,
    *,
    size: int = 84,
    splits: Sequence[str] = ("train", "val", "test"),
    workers: int = 8,
) -> dict[str, LabelledImages]:
    """mini-ImageNet (Vinyals et al.; the 64/16/20-class split of Ravi & Larochelle) from split folders.

    Reads ``root/<split>/<wnid>/*.jpg`` for each split, resized to ``size`` (84). The splits' classes are
    disjoint; each split's labels run from 0 in sorted ``wnid`` order.

    Returns:
      ``{split: LabelledImages}``, uint8 ``[n, size, size, 3]``.

    Raises:
      DataError: a split folder is missing or malformed.
    """
    root = Path(root).expanduser()
    where = "images of Ravi & Larochelle's split csv files, arranged as <split>/<wnid>/*.jpg"
    return {
        s: load_image_folder(root / s, size=size, workers=workers, what="mini-ImageNet split", where=where)
        for s in splits
    }


def load_tiny_imagenet(root: str | os.PathLike, *, workers: int = 8) -> ImageData:
    """Tiny-ImageNet-200 (64×64, 200 classes): its ``train`` tree and labelled ``val`` set as the test split.

    Layout of the unzipped ``tiny-imagenet-200.zip`` (``root`` or ``root/tiny-imagenet-200``):
    ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with
    ``val/val_annotations.txt`` (tab-separated file name and ``wnid`` per line; 50 per class). Classes are
    the sorted ``wnid`` s.

    Returns:
      :class:`ImageData`, uint8 ``[n, 64, 64, 3]``.

    Raises:
      DataError: a file is missing, or an annotation names an unknown class or a missing image.
    """
    root = Path(root).expanduser()
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    where = "cs231n.stanford.edu/tiny-imagenet-200.zip"
    need = (root / "train", root / "val" / "images", root / "val" / "val_annotations.txt")
    missing = [p for p in need if not p.exists()]
    if missing:
        raise DataError(
            f"Tiny-ImageNet {root} is missing {missing[0]}: expected train/<wnid>/images/*.JPEG, val/images/"
            f"*.JPEG and val/val_annotations.txt ({where})"
        )
    train = load_image_folder(
        root / "train", size=64, files="images/*", workers=workers, what="Tiny-ImageNet train", where=where
    )
    index = {n: i for i, n in enumerate(train.class_names)}
    files, labels = [], []
    for i, line in enumerate((root / "val" / "val_annotations.txt").read_text().splitlines()):
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise DataError(
                f"Tiny-ImageNet val_annotations.txt line {i + 1} names unknown class {fields[1]!r}"
            )
        files.append(root / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    absent = [f for f in files if not f.is_file()]
    if absent or not files:
        raise DataError(f"Tiny-ImageNet val image {absent[0] if absent else '(none listed)'} is missing")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        val = list(pool.map(lambda f: _decode(f, (64, 64), "RGB"), files))
    return ImageData(
        train_x=train.x,
        train_y=train.y,
        test_x=_frozen(np.stack(val)),
        test_y=_frozen(np.asarray(labels, np.int32)),
        class_names=train.class_names,
        source=f"Tiny-ImageNet-200 in {root}, train and val (as test)",
    )
