"""Throughput and peak memory of the on-disk loaders, on synthetic files of the datasets' full sizes.

Files are written once into ``--dir`` (a temporary directory by default) in exactly each format:

- CIFAR-10 binary: ``data_batch_1..5.bin`` (5 x 10,000 records) + ``test_batch.bin`` (10,000), 175.9 MB;
- CIFAR-100 binary: ``train.bin`` (50,000 records) + ``test.bin`` (10,000), 176.0 MB;
- IDX (Fashion-MNIST/KMNIST layout): 60,000 + 10,000 28x28 images, plain and gzipped;
- an image folder: ``--folder-images`` PNGs (default 10,000) of 84x84 RGB noise-and-gradient images in 100
  class folders, read at their size (no resize) and, separately, resized to 28x28 grayscale.

Each loader then runs ``--repeats`` times in this process (after one warm-up read that fills the page
cache, so the numbers are decode/parse throughput, not disk speed); the table gives the median wall time,
MB/s of file bytes read, images/s and the peak of memory traced by ``tracemalloc`` (numpy reports its
buffers to it) during one load, next to the size of the arrays returned.

Command:  .venv/bin/python benchmarks/loaders.py [--repeats 3] [--folder-images 10000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from nestlearn import tasks

RECORD = 3072


def write_cifar(directory: Path, n_label_bytes: int, files: dict[str, int], rng) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in files.items():
        rec = rng.integers(0, 256, (n, n_label_bytes + RECORD), dtype=np.uint8)
        rec[:, 0] %= 10 if n_label_bytes == 1 else 20
        if n_label_bytes == 2:
            rec[:, 1] %= 100
        rec.tofile(directory / name)


def write_idx(directory: Path, rng, compress: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            a = rng.integers(0, 256 if kind.startswith("images") else 10, shape, dtype=np.uint8)
            raw = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
            name = f"{prefix}-{kind}-ubyte" + (".gz" if compress else "")
            (directory / name).write_bytes(gzip.compress(raw, 6) if compress else raw)


def write_folder(directory: Path, n: int, rng) -> None:
    """PNGs that compress like photographs more than like noise: a gradient plus moderate noise."""
    grad = np.linspace(0, 180, 84, dtype=np.float32)
    for i in range(n):
        cls = directory / f"n{i % 100:08d}"
        cls.mkdir(parents=True, exist_ok=True)
        base = grad[None, :, None] + grad[:, None, None] * 0.3 + rng.integers(0, 60, (84, 84, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(cls / f"{i:06d}.png")


def disk_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def measure(name: str, load, files: list[Path], repeats: int) -> dict:
    load()  # warm-up: page cache, imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = load()
        times.append(time.perf_counter() - t0)
    del out
    tracemalloc.start()
    out = load()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrays = [out.train_x, out.test_x] if hasattr(out, "train_x") else [out.x]
    n_images = sum(a.shape[0] for a in arrays)
    t = statistics.median(times)
    mb = disk_bytes(files) / 1e6
    return {
        "format": name,
        "images": n_images,
        "file MB": mb,
        "s": t,
        "MB/s": mb / t,
        "images/s": n_images / t,
        "peak MiB": peak / 2**20,
        "output MiB": sum(a.nbytes for a in arrays) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder-images", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (kept if given)")
    args = parser.parse_args()
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    root = args.dir or Path(tmp.name)
    rng = np.random.default_rng(0)
    c10, c100 = root / "cifar-10-batches-bin", root / "cifar-100-binary"
    if not (c10 / "test_batch.bin").exists():
        write_cifar(
            c10, 1, {**{f"data_batch_{i}.bin": 10_000 for i in range(1, 6)}, "test_batch.bin": 10_000}, rng
        )
    if not (c100 / "test.bin").exists():
        write_cifar(c100, 2, {"train.bin": 50_000, "test.bin": 10_000}, rng)
    for sub, gz in (("idx", False), ("idx_gz", True)):
        if not (root / sub).exists():
            write_idx(root / sub, rng, gz)
    folder = root / f"folder_{args.folder_images}"
    if not folder.exists():
        t0 = time.perf_counter()
        write_folder(folder, args.folder_images, rng)
        print(f"wrote {args.folder_images} PNGs in {time.perf_counter() - t0:.1f} s")
    pngs = list(folder.rglob("*.png"))
    rows = [
        measure("CIFAR-10 binary", lambda: tasks.load_cifar10(root), list(c10.iterdir()), args.repeats),
        measure("CIFAR-100 binary", lambda: tasks.load_cifar100(root), list(c100.iterdir()), args.repeats),
        measure(
            "IDX (plain)",
            lambda: tasks.load_fashion_mnist(root / "idx"),
            list((root / "idx").iterdir()),
            args.repeats,
        ),
        measure(
            "IDX (gzip)",
            lambda: tasks.load_kmnist(root / "idx_gz"),
            list((root / "idx_gz").iterdir()),
            args.repeats,
        ),
        measure("PNG folder 84x84 RGB", lambda: tasks.load_image_folder(folder), pngs, args.repeats),
        measure(
            "PNG folder -> 28x28 L",
            lambda: tasks.load_image_folder(folder, size=28, grayscale=True),
            pngs,
            args.repeats,
        ),
    ]
    keys = list(rows[0])
    print(" | ".join(f"{k:>22}" if k == "format" else f"{k:>10}" for k in keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(
                f"{v:>22}"
                if k == "format"
                else f"{v:>10.0f}"
                if k in ("images", "images/s")
                else f"{v:>10.2f}"
            )
        print(" | ".join(cells))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
