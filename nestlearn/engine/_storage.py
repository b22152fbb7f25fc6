"""The one path layer every run-directory write goes through: local disks and object stores alike.

A path is local (``/tmp/run``, ``runs/x``: a :class:`pathlib.Path`) or a URI that ``etils.epath``
understands (``gs://bucket/run`` on Google Cloud Storage, ``s3://``, ``az://``: an ``epath.Path``, which
reaches the store through TensorFlow's gfile when it is installed and through ``fsspec`` otherwise,
``gcsfs`` for ``gs://``). Orbax takes the same paths for its checkpoints.

Writes are atomic where the filesystem allows it:

* local: a temporary file beside the target, then ``os.replace`` (a reader never sees half a file, a
  failure leaves the previous version);
* object stores: a single object becomes visible only once its upload completes, so writing the object
  directly is already atomic; what an object store cannot do atomically is rename a *directory* (a
  move copies object by object), which is why a damaged checkpoint is moved aside only after it has
  been found damaged, and why the checkpoint's manifest, not a rename, marks a step as finished.

In a multi-process run (:mod:`nestlearn.engine._distributed`) only process 0 writes: :func:`write`,
:func:`rmtree` and :func:`move` do nothing on the other processes, so every file is written once.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

AnyPath = Any  # a pathlib.Path or an etils.epath.Path


def is_uri(p: str | os.PathLike) -> bool:
    """Whether ``p`` names a location through a URI scheme (``gs://``, ``s3://``, ...), not a local path."""
    return "://" in (p if isinstance(p, str) else getattr(p, "_path_str", None) or os.fspath(p))


def path(p: str | os.PathLike) -> AnyPath:
    """``p`` as a path object: :class:`pathlib.Path` for a local path, ``etils.epath.Path`` for a URI.

    Example:
      >>> path("runs/x").as_posix(), str(path("gs://bucket/run") / "results")
      ('runs/x', 'gs://bucket/run/results')
    """
    if isinstance(p, Path):
        return p
    if is_uri(p):
        from etils import epath

        return epath.Path(p if isinstance(p, str) else str(p))
    return Path(p)


def _primary() -> bool:
    from nestlearn.engine._distributed import is_primary

    return is_primary()


def write(target: str | os.PathLike, data: str | bytes | Callable[[IO], Any], mode: str = "w") -> AnyPath:
    """Writes ``target`` atomically where the filesystem allows (module docstring); only process 0 writes.

    Args:
      target: the file.
      data: a string or bytes, or a callable that writes to the open file.
      mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Returns:
      The path written.
    """
    target = path(target)
    if not _primary():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(f):
        data(f) if callable(data) else f.write(data)

    if is_uri(target):
        # The whole content first, then one object in one write: a failure while producing it leaves
        # the previous object untouched (a remote file closed after an error would be uploaded half).
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        fill(buffer)
        with target.open(mode) as f:  # one object: visible only once its upload completes
            f.write(buffer.getvalue())
        return target
    tmp = str(target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode) as f:
            fill(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_bytes(p: str | os.PathLike) -> bytes:
    """The bytes of a file, local or remote."""
    return path(p).read_bytes()


def files(directory: str | os.PathLike) -> Iterator[tuple[str, AnyPath]]:
    """Every file under ``directory``, as ``(relative POSIX name, path)``, sorted by name."""
    directory = path(directory)
    if not is_uri(directory):
        for p in sorted(directory.rglob("*")):
            if p.is_file():
                yield p.relative_to(directory).as_posix(), p
        return

    def walk(d, prefix):  # iterdir, not walk(): fsspec's walk drops the scheme from the roots it yields
        for p in sorted(d.iterdir(), key=lambda p: p.name):
            if p.is_dir():
                yield from walk(p, f"{prefix}{p.name}/")
            else:
                yield f"{prefix}{p.name}", p

    yield from sorted(walk(directory, ""), key=lambda x: x[0])


def size(p: str | os.PathLike) -> int:
    """A file's size in bytes."""
    stat = path(p).stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length  # os.stat_result or epath's


def rmtree(p: str | os.PathLike) -> None:
    """Removes a directory tree (process 0 only)."""
    p = path(p)
    if not _primary():
        return
    if is_uri(p):
        p.rmtree()
    else:
        shutil.rmtree(p)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves a file or directory (process 0 only); on an object store a directory moves object by object."""
    src, dst = path(src), path(dst)
    if not _primary():
        return
    if is_uri(src):
        src.rename(dst)
    else:
        shutil.move(str(src), str(dst))
