"""Shared pieces of the image experiments (split_cifar100, omniglot_fewshot, mini_imagenet_fewshot).

Synthetic datasets written in exactly the real on-disk formats, so ``--quick`` runs and the tests go
through the real loaders of :mod:`nestlearn.tasks` on a machine without the data: CIFAR-100's binary
records, Omniglot's ``images_background``/``images_evaluation`` trees of PNGs and mini-ImageNet's
``train``/``val``/``test`` trees of JPEGs. Each class is a fixed random low-frequency pattern plus
per-image noise (and a small random shift), so the classes are learnable but not trivially identical
images. Results on these files are labelled synthetic everywhere: they are not comparable with the
published numbers.

Not an experiment itself (the leading underscore keeps it out of ``nestlearn list``): the experiment
files load it with :func:`sibling`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

SYNTHETIC = "synthetic"


def sibling(name: str) -> ModuleType:
    """Imports ``experiments/<name>.py`` next to this file (experiment files are loaded by path)."""
    key = f"nestlearn_experiment_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def prepare(root: str | Path, write) -> Path:
    """``root`` holding synthetic files: written by ``write(root)`` unless an earlier call finished there.

    A finished write leaves ``root/SYNTHETIC`` (so a resumed run reuses the files); a ``root`` that exists
    and is not empty but has no such marker is refused, so real data are never written over.
    """
    from nestlearn import ConfigError

    root = Path(root).expanduser()
    marker = root / "SYNTHETIC"
    if marker.is_file():
        return root
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"synthetic=true would write synthetic images into {root}, which is not empty and was not "
            "written by a synthetic run: give a new directory, or synthetic=false to read it"
        )
    write(root)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("synthetic images with learnable class patterns, not a real dataset\n")
    return root


def class_patterns(
    rng: np.random.Generator, n_classes: int, side: int, channels: int, cells: int
) -> np.ndarray:
    """One pattern per class: ``cells × cells`` random levels in [0, 255] upsampled to ``side`` (float)."""
    coarse = rng.uniform(0, 255, (n_classes, cells, cells, channels))
    rep = -(-side // cells)
    big = coarse.repeat(rep, axis=1).repeat(rep, axis=2)
    return big[:, :side, :side]


def noisy_images(
    rng: np.random.Generator, pattern: np.ndarray, n: int, noise: float, max_shift: int
) -> np.ndarray:
    """``n`` uint8 copies of ``pattern`` ``[H, W, C]``, each shifted by up to ``max_shift`` pixels
    (wrapping) and with Gaussian pixel noise of standard deviation ``noise``."""
    out = np.empty((n, *pattern.shape), np.uint8)
    for i in range(n):
        dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
        img = np.roll(pattern, (int(dy), int(dx)), axis=(0, 1)) + rng.normal(0, noise, pattern.shape)
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def write_cifar100(
    root: str | Path,
    *,
    train_per_class: int = 20,
    test_per_class: int = 10,
    seed: int = 0,
    noise: float = 40.0,
) -> Path:
    """Writes a synthetic CIFAR-100 in the binary distribution's format; returns ``root``.

    ``root/cifar-100-binary/train.bin`` and ``test.bin``: records of 1 coarse label byte (``fine // 5``),
    1 fine label byte (0..99) and 3,072 pixel bytes (the red, green and blue 32×32 planes, rows top to
    bottom), ``train_per_class`` and ``test_per_class`` records per fine class, classes interleaved.
    """
    rng = np.random.default_rng(seed)
    half = class_patterns(rng, 100, 32, 3, 4)[:, :, :16]
    patterns = np.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric: flips keep the class
    directory = Path(root) / "cifar-100-binary"
    directory.mkdir(parents=True, exist_ok=True)
    for name, per in (("train.bin", train_per_class), ("test.bin", test_per_class)):
        images = np.stack(
            [noisy_images(rng, patterns[c], per, noise, 3) for c in range(100)], 1
        )  # [per, 100]
        fine = np.tile(np.arange(100, dtype=np.uint8), per)
        hwc = images.reshape(-1, 32, 32, 3)
        chw = hwc.transpose(0, 3, 1, 2).reshape(len(fine), -1)
        records = np.concatenate([(fine // 5)[:, None], fine[:, None], chw], axis=1).astype(np.uint8)
        tmp = directory / (name + ".tmp")
        records.tofile(tmp)
        tmp.replace(directory / name)
    return Path(root)


def _write_png_tree(root: Path, classes: list[str], images: np.ndarray, suffix: str) -> None:
    from PIL import Image

    for name, imgs in zip(classes, images):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            image = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            options = {"quality": 95} if suffix == ".jpg" else {}
            image.save(folder / f"{i:04d}{suffix}", **options)


def write_omniglot(
    root: str | Path,
    *,
    background: int = 30,
    evaluation: int = 10,
    drawings: int = 20,
    alphabets: int = 5,
    seed: int = 0,
    noise: float = 30.0,
) -> Path:
    """Writes a synthetic Omniglot: ``root/images_{background,evaluation}/<alphabet>/<character>/*.png``.

    Characters (``background`` + ``evaluation`` of them, spread over ``alphabets`` alphabets per part)
    are 105×105 grayscale PNGs, ``drawings`` per character: a random 7×7 black-on-white stroke pattern,
    shifted by up to 3 pixels, with pixel noise.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for part, n in (("images_background", background), ("images_evaluation", evaluation)):
        strokes = rng.random((n, 7, 7, 1)) < 0.35
        patterns = np.where(strokes, 0.0, 255.0).repeat(15, axis=1).repeat(15, axis=2)
        images = np.stack([noisy_images(rng, patterns[c], drawings, noise, 3) for c in range(n)])
        names = [f"Alphabet_{c % alphabets:02d}/character{c:03d}" for c in range(n)]
        _write_png_tree(root / part, names, images, ".png")
    return root


def write_mini_imagenet(
    root: str | Path,
    *,
    classes: tuple[int, int, int] = (16, 4, 8),
    per_class: int = 30,
    side: int = 84,
    seed: int = 0,
    noise: float = 30.0,
) -> Path:
    """Writes a synthetic mini-ImageNet: ``root/{train,val,test}/<wnid>/*.jpg``, 84×84 RGB JPEGs.

    ``classes`` gives the number of classes of the train, val and test splits (the real split has 64, 16
    and 20, 600 images each); each class is a random 6×6 colour pattern with shifts and noise, and the
    class names are made-up WordNet-like ids, disjoint across splits.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    offset = 0
    for split, n in zip(("train", "val", "test"), classes):
        patterns = class_patterns(rng, n, side, 3, 6)
        images = np.stack([noisy_images(rng, patterns[c], per_class, noise, 4) for c in range(n)])
        names = [f"n{90000000 + offset + c:08d}" for c in range(n)]
        _write_png_tree(root / split, names, images, ".jpg")
        offset += n
    return root


def sem(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Standard error of the mean, ``std(ddof=1) / sqrt(n)`` (0 for a single value)."""
    values = np.asarray(values, np.float64)
    n = values.shape[axis]
    if n < 2:
        return np.zeros(np.delete(values.shape, axis))
    return values.std(axis=axis, ddof=1) / np.sqrt(n)
